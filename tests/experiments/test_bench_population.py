"""Smoke run of the population throughput benchmark: files, rows, one finished bar, equality."""

import json

import pytest

from experiments import bench_population


def test_bench_population_smoke(tmp_path, bars):
    rows = bench_population.main(["--smoke", "--out", str(tmp_path), "--no-progress"])
    assert len(bars) == 1 and bars[0].n == bars[0].total > 0
    assert [r["members"] for r in rows] == [1, 4]
    for r in rows:
        assert r["vmap_throughput"] > 0 and r["loop_throughput"] > 0
        # The ratios are what the throughputs say (not timed asserts: only their arithmetic).
        assert r["vmap_vs_loop"] == pytest.approx(r["vmap_throughput"] / r["loop_throughput"])
    data = json.loads((tmp_path / "bench_population.json").read_text())
    assert data["loop_members"] == 4
    assert data["vmap_vs_loop_max_abs_diff"] < 1e-5  # vmapped member 0 equals the loop's
    for name in ("bench_population.png", "bench_population.csv", "summary.json"):
        assert (tmp_path / name).exists(), name
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["smoke"] is True and len(summary["rows"]) == 2


def test_bench_population_rejects_bad_sizes():
    with pytest.raises(SystemExit):
        bench_population.main(["--sizes", "0,4", "--no-progress"])
    with pytest.raises(SystemExit):
        bench_population.main(["--sizes", "a,b", "--no-progress"])
