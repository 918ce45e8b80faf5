import json
import math

from experiments import curvature


def test_curvature_smoke(tmp_path):
    rows = curvature.main(["--smoke", "--out", str(tmp_path), "--no-progress"])
    for name in ("curvature.json", "curvature.csv", "curvature.png", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    by = {r["method"]: r for r in rows}
    assert set(by) == {"hessian-auto", "gauss-newton"}
    for r in rows:
        assert r["model"] == "mlp" and r["steps"] == 20
        assert math.isfinite(r["cosine"]) and -1 <= r["cosine"] <= 1
        assert r["iterations"] >= 1
    # The automatically damped solve succeeds on the (indefinite) Hessian early in training,
    # with a damping it chose itself, and its hypergradient points like the exact one.
    auto = by["hessian-auto"]
    assert auto["status"] == "SUCCESS" and auto["ridge"] > 0
    assert auto["cosine"] > 0.9
    assert by["gauss-newton"]["ridge"] == 0.0
    data = json.loads((tmp_path / "curvature.json").read_text())
    assert set(data) == {"config", "rows"}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["experiment"] == "curvature" and summary["smoke"] is True
    assert len(summary["rows"]) == 1 and "Gauss-Newton" in summary["rows"][0]["result"]
