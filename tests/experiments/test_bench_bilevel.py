import json

from experiments import bench_bilevel


def test_bench_bilevel_smoke(tmp_path):
    bench_bilevel.main(["--smoke", "--out", str(tmp_path), "--no-progress"])
    data = json.loads((tmp_path / "bench_bilevel.json").read_text())
    assert (tmp_path / "bench_bilevel.png").stat().st_size > 0
    methods = {r["method"] for r in data["overhead"]}
    assert {"plain", "forward", "truncated(2)"} <= methods
    for r in data["overhead"]:
        assert r["ms_per_outer_step"] > 0
    for r in data["warm_vs_cold"]:
        assert r["mean_cg_iterations"] > 0
    assert all(r["throughput_ratio"] > 0 for r in data["population"])
