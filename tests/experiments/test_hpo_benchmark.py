import itertools
import json
import math

import numpy as np
import pytest

from experiments import hpo_benchmark


def test_hpo_benchmark_smoke(tmp_path):
    rows = hpo_benchmark.main(["--smoke", "--out", str(tmp_path), "--no-progress"])
    for name in ("hpo_benchmark.json", "hpo_benchmark.csv", "runs.csv", "hpo_benchmark.png",
                 "hpo_schedules.png"):  # fmt: skip
        assert (tmp_path / name).stat().st_size > 0, name
    by = {r["method"]: r for r in rows}
    assert set(by) == {"defaults (untuned)", "tpe", "population"}
    for r in rows:
        assert 0.0 < r["fresh_test_acc"] <= 1.0 and math.isfinite(r["fresh_val"])
    data = json.loads((tmp_path / "hpo_benchmark.json").read_text())
    # Every method ran within its budget and its curve never goes up (best so far).
    for name in ("tpe", "population"):
        curve = [c["best_val_loss"] for c in data["curves"][name]]
        assert len(curve) >= 1 and all(b <= a for a, b in itertools.pairwise(curve))
        runs = data["runs"][name]
        assert min(r["score"] for r in runs) == pytest.approx(curve[-1])
    assert by["population"]["runs"] == 2 * len(data["curves"]["population"])  # 2 members/round
    assert len(data["fresh"]["tpe"]) == len(data["fresh"]["population"]) == 3
    # The per-layer decays of the gradient tuner moved, each by its own amount (group_adam):
    # they do not stay in lockstep.
    schedule = data["best_schedules"]["population"]
    final = np.array([schedule[f"wd{j}"][-1] for j in range(3)])
    start = np.array([by["population"][f"chosen_wd{j}"] for j in range(3)])
    moves = np.abs(np.log(final / start))
    assert np.all(moves > 0) and moves.max() > 1.5 * moves.min(), moves
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["experiment"] == "hpo_benchmark" and summary["smoke"] is True
    assert [r["what"].split(",")[0] for r in summary["rows"]] == [
        "hpo_benchmark: tpe",
        "hpo_benchmark: population",
    ]
    assert all(r["target"].startswith("TPE at 2 s") for r in summary["rows"])


def test_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as e:
        hpo_benchmark.main(["--help"])
    assert e.value.code == 0
    assert "--budget" in capsys.readouterr().out
