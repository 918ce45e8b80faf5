"""Smoke runs of the solver experiments: files are written and the numbers make sense."""

import json
import math

from experiments import bench_solvers, hypergrad_accuracy


def _rows(data, problem, method):
    rows = [r for r in data["rows"] if r["problem"] == problem and r["method"] == method]
    return sorted(rows, key=lambda r: r["setting"])


def test_hypergrad_accuracy_smoke(tmp_path):
    hypergrad_accuracy.main(["--smoke", "--out", str(tmp_path), "--no-progress"])
    data = json.loads((tmp_path / "hypergrad_accuracy.json").read_text())
    assert (tmp_path / "hypergrad_accuracy.png").stat().st_size > 0
    assert (tmp_path / "hypergrad_accuracy.csv").read_text().startswith("problem,method")

    problems = data["problems"]
    assert set(problems) == {"ridge", "logistic"}
    assert problems["logistic"]["fd_vs_reference_rel_diff"] < 1e-6
    assert problems["logistic"]["inner_grad_norm_at_reference"] < 1e-10
    for row in data["rows"]:
        assert math.isfinite(row["rel_error"]) and row["rel_error"] >= 0
        assert row["cost"] >= 1

    for problem in problems:
        for method in hypergrad_accuracy.METHODS:
            rows = _rows(data, problem, method)
            assert len(rows) >= 2, (problem, method)
        # More CG iterations, smaller error; the counted HVPs are the CG iterations.
        cg = _rows(data, problem, "implicit-cg")
        assert cg[-1]["rel_error"] < 0.5 * cg[0]["rel_error"]
        assert all(r["cost"] == r["iterations"] == r["setting"] for r in cg)
        # GMRES also pays one HVP per restart for the true residual.
        assert all(r["cost"] > r["iterations"] for r in _rows(data, problem, "implicit-gmres"))
        unrolled = _rows(data, problem, "unrolled")
        assert unrolled[-1]["rel_error"] < unrolled[0]["rel_error"]

    # On ridge, Truncated(K) of gradient descent with step 1/lambda_max at the solution is the
    # K-term Neumann series with the same step.
    neumann = {r["setting"]: r["rel_error"] for r in _rows(data, "ridge", "implicit-neumann")}
    for r in _rows(data, "ridge", "truncated"):
        if r["setting"] in neumann:
            assert abs(r["rel_error"] - neumann[r["setting"]]) < 1e-3


def test_bench_solvers_smoke(tmp_path):
    bench_solvers.main(["--smoke", "--out", str(tmp_path), "--no-progress"])
    data = json.loads((tmp_path / "bench_solvers.json").read_text())
    assert (tmp_path / "bench_solvers.png").stat().st_size > 0
    assert (tmp_path / "bench_solvers.csv").exists()

    implicit = data["implicit_vs_jaxopt"]
    methods = {r["method"]: r for r in implicit["rows"]}
    assert set(methods) == {"ours (symmetric=True)", "ours (symmetric=False)", "jaxopt"}
    for r in methods.values():
        assert r["median_ms"] > 0 and r["ratio_vs_jaxopt"] > 0
        assert r["hypergrad_rel_diff_vs_jaxopt"] < 1e-4
    stats = implicit["solvers_cg_stats"]
    assert stats["iterations"] == 30 and not stats["converged"]
    assert implicit["cg_solution_rel_diff_ours_vs_jax_scipy"] < 1e-4

    unrolled = data["unrolled_memory"]
    assert "temp_size_in_bytes" in next(iter(unrolled["memory_analysis_fields"].values()))
    plain, ckpt = unrolled["rows"]
    assert plain["temp_bytes"] > ckpt["temp_bytes"] > 0
    assert unrolled["memory_ratio"] > 1
    assert unrolled["hypergrad_rel_diff"] < 1e-4
    assert plain["median_ms"] > 0 and ckpt["median_ms"] > 0
