"""``experiments.bench_scale``: the smoke run's outputs, parameter counts and CLI errors."""

import json
import math

import jax
import pytest

from experiments import bench_scale


def test_smoke_writes_tables_plots_and_flat_vs_growing_memory(tmp_path):
    result = bench_scale.main(["--smoke", "--out", str(tmp_path), "--no-progress"])
    for name in (
        "bench_scale.json",
        "bench_scale.csv",
        "memory_vs_steps.csv",
        "summary.json",
        "time_memory_vs_params.png",
        "memory_vs_inner_steps.png",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    data = json.loads((tmp_path / "bench_scale.json").read_text())
    assert set(data) == {"args", "device", "scale", "memory_vs_steps"}
    rows = {r["method"]: r for r in data["scale"]}
    assert set(rows) == {"plain", "inner-only", "implicit", "unrolled"}
    for r in rows.values():
        assert r["ms"] > 0 and math.isfinite(r["time_ratio"]) and r["temp_bytes"] > 0
        assert r["skipped"] == 0
    assert rows["plain"]["time_ratio"] == 1.0 and rows["plain"]["mem_ratio"] == 1.0
    # CG with tol=0 runs every iteration it is given; the step was applied.
    assert rows["implicit"]["linear_iterations"] == 3
    assert rows["implicit"]["status"] in ("SUCCESS", "LINEAR_SOLVE_FAILED")
    # The implicit step needs more temporary memory than the plain loop (the CG vectors).
    assert rows["implicit"]["temp_bytes"] > rows["plain"]["temp_bytes"]
    # Memory vs inner steps (2 and 8): flat for implicit and the plain loop, growing for unrolled.
    mem = {(r["method"], r["inner_steps"]): r["temp_bytes"] for r in data["memory_vs_steps"]}
    assert mem[("implicit", 8)] == mem[("implicit", 2)]
    assert mem[("plain", 8)] == mem[("plain", 2)]
    assert mem[("unrolled", 8)] > 1.5 * mem[("unrolled", 2)]
    # The timing part's compilation at n = 2 is the memory table's n = 2 entry.
    assert mem[("implicit", 2)] == rows["implicit"]["temp_bytes"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["experiment"] == "bench_scale" and summary["smoke"] is True
    whats = [r["what"] for r in summary["rows"]]
    assert any("implicit outer step" in w for w in whats)
    growth_row = summary["rows"][-1]
    assert growth_row["result"].startswith("unrolled") and "flat: implicit" in growth_row["result"]
    assert result["summary"] == summary["rows"]


@pytest.mark.parametrize("target", [1e4, 1e5, 1e6, 1e7])
def test_widths_hit_the_requested_parameter_counts(target):
    for model, count in (("mlp", bench_scale.mlp_count), ("resnet", bench_scale.resnet_count)):
        n = count(bench_scale.width_for(model, target))
        assert abs(math.log(n / target)) < 0.1, (model, n)


def test_resnet_count_is_the_models_parameter_count():
    from flax import nnx

    for width in (2, 5):
        model = nnx.eval_shape(lambda w=width: bench_scale.ResNet(w, rngs=nnx.Rngs(0)))
        _, params, _ = nnx.split(model, nnx.Param, ...)
        n = sum(a.size for a in jax.tree.leaves(params))
        assert n == bench_scale.resnet_count(width)


def _has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


NO_GPU = pytest.mark.skipif(_has_gpu(), reason="a GPU is present: --device gpu would run")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sizes", "abc"], "comma-separated numbers"),
        (["--sizes", "10"], "counts >= 100"),
        (["--methods", "implicit,newton"], "unknown method 'newton'"),
        pytest.param(["--device", "gpu"], "--device gpu: JAX finds no GPU", marks=NO_GPU),
    ],
)
def test_bad_options_are_parser_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_scale.main(argv)
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_smoke_on_the_resnet_threads_batchnorm(tmp_path):
    """The stateful ResNet through every method (slow: its steps compile for minutes on a CPU)."""
    argv = ["--smoke", "--out", str(tmp_path), "--no-progress"]
    data = bench_scale.main([*argv, "--models", "resnet"])
    rows = {r["method"]: r for r in data["scale"]}
    assert set(rows) >= {"plain", "implicit", "unrolled"}
    assert all(r["model"] == "resnet" and r["skipped"] == 0 for r in rows.values())
