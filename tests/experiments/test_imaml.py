"""Smoke run of the iMAML sinusoid experiment: files, summary rows and the memory property."""

import json

import numpy as np
import pytest

from experiments import imaml_sinusoid


def test_imaml_sinusoid_smoke(tmp_path, bars):
    imaml_sinusoid.main(["--smoke", "--out", str(tmp_path), "--no-progress"])
    assert len(bars) == 1 and bars[0].desc == imaml_sinusoid.NAME
    assert bars[0].total > 0 and bars[0].n == bars[0].total
    for name in ("imaml_sinusoid.png", "imaml_sinusoid.csv", "imaml_sinusoid_memory.csv"):
        assert (tmp_path / name).stat().st_size > 0

    data = json.loads((tmp_path / "imaml_sinusoid.json").read_text())
    steps = data["config"]["test_steps"]
    assert set(data["methods"]) == set(imaml_sinusoid.METHODS)
    for record in data["methods"].values():
        curve = np.asarray(record["curve"], float)
        assert curve.shape == (steps + 1,) and np.all(np.isfinite(curve)) and np.all(curve > 0)
        assert record["diverged_tasks"] == 0 and record["train_seconds"] > 0
    for record in data["methods"].values():  # every method ran the same meta-iterations
        assert record["history"][-1]["meta_iteration"] == data["config"]["meta_iters"]

    # The property: iMAML's meta-gradient memory does not grow with the inner steps (flat
    # within 10% from 5 to 40 steps) while MAML's grows with them, and exceeds iMAML's.
    memory = data["memory_temp_bytes"]
    assert memory["inner_steps"] == [5, 40]
    imaml, maml = memory["imaml"], memory["maml"]
    assert min(imaml) > 0 and max(imaml) / min(imaml) <= 1 + imaml_sinusoid.FLAT_TOLERANCE
    assert maml[1] > 3 * maml[0]
    assert data["memory_ratio_maml_over_imaml"] == pytest.approx(maml[1] / imaml[1])
    assert data["memory_ratio_maml_over_imaml"] > 3

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["experiment"] == imaml_sinusoid.NAME and summary["smoke"] is True
    assert len(summary["rows"]) == len(imaml_sinusoid.METHODS) + 1
    for row in summary["rows"]:
        assert set(row) == {"what", "result", "target"} and row["what"] and row["result"]
    assert "MAML / iMAML" in summary["rows"][-1]["what"]
