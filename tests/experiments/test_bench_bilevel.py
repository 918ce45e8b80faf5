"""Smoke run of the online bilevel benchmark: files, summary rows, and what must hold."""

import json
import math

from experiments import bench_bilevel


def test_bench_bilevel_smoke(tmp_path):
    bench_bilevel.main(["--smoke", "--out", str(tmp_path), "--no-progress"])
    data = json.loads((tmp_path / "bench_bilevel.json").read_text())
    assert (tmp_path / "bench_bilevel.png").stat().st_size > 0
    assert (tmp_path / "overhead.csv").read_text().startswith("method,")

    overhead = {r["method"]: r for r in data["overhead"]}
    assert set(overhead) == {"plain", "implicit-cg(20)"}
    assert overhead["plain"]["ratio_vs_plain"] == 1.0
    for r in overhead.values():
        assert 0 < r["min_ms"] <= r["median_ms"] and math.isfinite(r["ratio_vs_plain"])

    # Same tolerance, same systems: every solve converged, and starting from the previous
    # solution takes fewer CG iterations than starting from zero.
    warm, cold = (
        next(r for r in data["warm_vs_cold"] if r["warm_start"] is w) for w in (True, False)
    )
    for r in (warm, cold):
        assert r["all_success"] and r["max_relative_residual"] <= bench_bilevel.CG_TOL
        assert len(r["cg_iterations"]) == data["config"]["online_steps"]
    assert 0 < warm["mean_cg_iterations"] < cold["mean_cg_iterations"]

    # The vmapped population computes what the loop over its members computes.
    (population,) = data["population"]
    assert population["members"] == 4 and population["throughput_ratio"] > 0
    assert population["vmap_vs_loop_max_abs_diff"] < 1e-5

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["smoke"] is True and summary["seconds"] > 0
    whats = [r["what"] for r in summary["rows"]]
    assert [w[:3] for w in whats] == ["(a)", "(b)", "(c)"]
    assert summary["rows"][-1]["target"] == ">= 8x"
    assert "x" in summary["rows"][-1]["result"]
