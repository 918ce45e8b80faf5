"""``experiments.bench_bilevel_methods --smoke``: every method on the quadratic problem."""

import json

import numpy as np

from experiments import bench_bilevel_methods


def test_smoke_runs_every_method_and_writes_its_outputs(tmp_path):
    bench_bilevel_methods.main(["--smoke", "--out", str(tmp_path), "--no-progress"])
    data = json.loads((tmp_path / "results.json").read_text())
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (tmp_path / "quadratic.png").stat().st_size > 0
    assert summary["smoke"] and summary["rows"] and "quadratic" in summary["rows"][0]["what"]
    methods = set(data["results"]["quadratic"])
    assert {"implicit", "soba", "nystrom", "truncated", "forward", "borep"} <= methods
    for runs in data["results"]["quadratic"].values():
        for run in runs:
            values = [r["value"] for r in run["rows"]]
            calls = [r["oracle_calls"] for r in run["rows"]]
            assert np.all(np.isfinite(values)) and min(values) >= -1e-6  # a gap to the optimum
            assert calls == sorted(calls) and calls[-1] > 0 and run["skipped"] == 0


def test_the_quadratic_optimum_is_the_closed_form():
    """The reference F* is exact: at x*, the gap is zero and the gradient of F vanishes."""
    problem = bench_bilevel_methods.quadratic_problem(0)
    value = problem["gap"]
    rng = np.random.RandomState(0)
    # F is a convex quadratic: minimize it by Newton from any point using finite differences
    x0 = rng.randn(10)
    eye = np.eye(10)
    g = np.array([(value(x0 + 1e-4 * e) - value(x0 - 1e-4 * e)) / 2e-4 for e in eye])
    Hm = np.array([[(value(x0 + 1e-3 * (a + b)) - value(x0 + 1e-3 * a) - value(x0 + 1e-3 * b)
                     + value(x0)) / 1e-6 for b in eye] for a in eye])  # fmt: skip
    x_star = x0 - np.linalg.solve(Hm, g)
    assert abs(value(x_star)) < 1e-6
