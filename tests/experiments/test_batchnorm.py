import json
import math

import pytest

from experiments import batchnorm


def test_batchnorm_smoke(tmp_path):
    results = batchnorm.main(["--smoke", "--out", str(tmp_path), "--no-progress"])
    for name in ("batchnorm.json", "batchnorm.csv", "batchnorm.png", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert [r["seed"] for r in results] == [1, 2]  # fresh seeds, one compiled program
    for r in results:
        tuned, untuned = r[batchnorm.TUNED], r[batchnorm.UNTUNED]
        for run in (tuned, untuned):
            assert all(math.isfinite(run[k]) for k in ("val_loss", "test_loss", "test_acc"))
            assert run["inner_skipped"] == 0
        # Both runs start from the same network (same weights, same running averages).
        assert tuned["curve"][0] == untuned["curve"][0]
        # Training lowered the loss; the tuner moved every decay, the untuned run none.
        assert tuned["val_loss"] < tuned["curve"][0]["val_loss"]
        assert tuned["skipped"] == 0
        assert all(w != pytest.approx(1e-2, rel=1e-3) for w in tuned["wd"])
        assert untuned["wd"] == pytest.approx([1e-2] * 3, rel=1e-6)
        assert len(tuned["schedule"]) == len(tuned["curve"]) == 3  # initial + 2 chunks
        # The no-decay baseline: same start, decays at (numerically) zero, trained.
        plain = r[batchnorm.NO_DECAY]
        assert plain["curve"][0] == tuned["curve"][0]
        assert max(plain["wd"]) < 1e-10 and plain["val_loss"] < plain["curve"][0]["val_loss"]
    data = json.loads((tmp_path / "batchnorm.json").read_text())
    assert set(data) == {"config", "epochs", "results", "wins"}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["experiment"] == "batchnorm" and summary["smoke"] is True
    assert [r["what"].split(", ")[-1] for r in summary["rows"]] == ["mean of 2 fresh seeds"] * 2
    assert all("untuned" in r["result"] and "without decay" in r["result"] for r in summary["rows"])
