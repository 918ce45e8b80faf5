"""Smoke runs of the solver experiments: files are written and the numbers make sense."""

import json
import math

import pytest

from experiments import _common, bench_solvers, hypergrad_accuracy


def _rows(data, problem, method):
    rows = [r for r in data["rows"] if r["problem"] == problem and r["method"] == method]
    return sorted(rows, key=lambda r: r["budget"])


def _summary(path):
    summary = json.loads((path / "summary.json").read_text())
    assert summary["smoke"] is True and summary["seconds"] > 0
    for row in summary["rows"]:
        assert set(row) == {"what", "result", "target"} and all(row.values())
    return summary


def test_hypergrad_accuracy_smoke(tmp_path):
    hypergrad_accuracy.main(["--smoke", "--out", str(tmp_path), "--no-progress"])
    data = json.loads((tmp_path / "hypergrad_accuracy.json").read_text())
    assert (tmp_path / "hypergrad_accuracy.png").stat().st_size > 0
    assert (tmp_path / "hypergrad_accuracy.csv").read_text().startswith("problem,method")

    problems = data["problems"]
    assert set(problems) == {"ridge", "logistic"}
    # The logistic reference: Newton converged, and central finite differences agree with it.
    assert problems["logistic"]["fd_vs_reference_rel_diff"] < 1e-6
    assert problems["logistic"]["inner_grad_norm_at_reference"] < 1e-10
    for row in data["rows"]:
        assert math.isfinite(row["rel_error"]) and row["rel_error"] >= 0
        assert row["cost"] >= 1

    for name, info in problems.items():
        d = int(info["data"].split("d=")[1].split(",")[0])
        for method in hypergrad_accuracy.METHODS:
            assert _rows(data, name, method), (name, method)
        # Smoke budgets (32) exceed d: CG and GMRES solve the d x d system to rounding, and the
        # counted HVPs are CG's iterations (GMRES also pays the true residual at each restart).
        (cg,) = _rows(data, name, "implicit-cg")
        assert cg["budget"] >= d and cg["rel_error"] < 1e-10
        assert cg["cost"] == cg["iterations"] <= cg["budget"]
        (gmres,) = _rows(data, name, "implicit-gmres")
        assert gmres["rel_error"] < 1e-10 and gmres["cost"] > gmres["iterations"]
        # Neumann with a few terms is far from the answer but improves on the zero guess.
        (neumann,) = _rows(data, name, "implicit-neumann")
        assert 1e-3 < neumann["rel_error"] < 1
        first, last = _rows(data, name, "unrolled")
        assert first["budget"] < last["budget"] and last["rel_error"] < first["rel_error"]

    # On ridge, Truncated(K) of gradient descent with step 1/lambda_max at the (converged)
    # solution is the K-term Neumann series with the same step.
    (neumann,) = _rows(data, "ridge", "implicit-neumann")
    (truncated,) = _rows(data, "ridge", "truncated")
    assert truncated["budget"] == neumann["budget"]
    assert abs(truncated["rel_error"] - neumann["rel_error"]) < 1e-5

    summary = _summary(tmp_path)
    assert len(summary["rows"]) == len(hypergrad_accuracy.METHODS)
    cg_row = summary["rows"][0]
    assert cg_row["what"].startswith("implicit, CG") and cg_row["result"].endswith("HVPs")


def test_bench_solvers_smoke(tmp_path):
    bench_solvers.main(["--smoke", "--out", str(tmp_path), "--no-progress"])
    data = json.loads((tmp_path / "bench_solvers.json").read_text())
    assert (tmp_path / "bench_solvers.png").stat().st_size > 0
    assert (tmp_path / "bench_solvers.csv").exists()

    implicit = data["implicit_vs_jaxopt"]
    methods = {r["method"]: r for r in implicit["rows"]}
    assert set(methods) == {bench_solvers.OURS_SYM, bench_solvers.OURS_NONSYM, "jaxopt"}
    for r in methods.values():
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["ratio_vs_jaxopt"] > 0
        # Same solver, same 30 CG iterations: the same hypergradient as jaxopt.
        assert r["hypergrad_rel_diff_vs_jaxopt"] < 1e-4
    stats = implicit["solvers_cg_stats"]
    assert stats["iterations"] == 30 and not stats["converged"]
    assert abs(stats["residual"] - implicit["solvers_cg_true_residual"]) < 1e-2
    assert implicit["cg_solution_rel_diff_ours_vs_jax_scipy"] < 1e-4

    unrolled = data["unrolled_memory"]
    assert "temp_size_in_bytes" in next(iter(unrolled["memory_analysis_fields"].values()))
    plain, ckpt = unrolled["rows"]
    # Checkpointing keeps sqrt(T)-spaced states instead of all T: less memory, same answer.
    assert plain["temp_bytes"] > 2 * ckpt["temp_bytes"] > 0
    assert unrolled["memory_ratio"] == plain["temp_bytes"] / ckpt["temp_bytes"]
    assert unrolled["hypergrad_rel_diff"] < 1e-4
    assert plain["median_ms"] > 0 and ckpt["median_ms"] > 0

    rows = _summary(tmp_path)["rows"]
    assert [r["target"] for r in rows] == ["<= 1.05x", ">= 10x", "<= 1.6x"]
    assert rows[1]["result"].startswith(f"{unrolled['memory_ratio']:.3g}x")


def test_paired_ratio_and_verdict():
    # Round 2 ran under load for both calls: the per-round ratio ignores it.
    times = {"a": {"times_ms": [2.0, 20.0, 2.2]}, "b": {"times_ms": [1.0, 10.0, 1.0]}}
    assert _common.paired_ratio(times, "a", "b") == 2.0
    assert _common.verdict(1.02, "<= 1.05") == "met"
    assert _common.verdict(2.1, "<= 1.05") == "missed: 2x over"
    assert _common.verdict(2.5, ">= 10") == "missed: 4x short"
    with pytest.raises(ValueError, match="target"):
        _common.verdict(1.0, "== 1")
