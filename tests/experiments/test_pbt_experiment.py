import json
import math

import numpy as np
import pytest

from experiments import pbt


def test_pbt_smoke(tmp_path):
    results = pbt.main(["--smoke", "--out", str(tmp_path), "--no-progress"])
    for name in (
        "pbt.json",
        "pbt.csv",
        "tpe_trials.csv",
        "pbt_population.png",
        "pbt_schedule.png",
        "summary.json",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    by = {r["method"]: r for r in results}
    default = next(r for r in results if r["key"] == "default")
    assert set(by) == {
        "PBT alone",
        "PBT + hypergradient",
        "Optuna TPE, equal steps",
        "Optuna TPE, equal wall time",
        default["method"],
    }
    # Equal compute: every method trains population x steps-per-member Adam steps.
    config = json.loads((tmp_path / "pbt.json").read_text())["config"]
    budget = config["population"] * config["outer_steps"] * config["inner_steps"]
    for name in ("PBT alone", "PBT + hypergradient", "Optuna TPE, equal steps"):
        assert by[name]["steps"] == budget, name
    steps, wall = by["Optuna TPE, equal steps"], by["Optuna TPE, equal wall time"]
    assert wall["runs"] >= steps["runs"] == config["population"]
    assert wall["best_val_loss"] <= steps["best_val_loss"]  # a superset of the same trials
    both = by["PBT + hypergradient"]
    assert both["replaced"] > 0 and both["nonfinite"] == 0  # PBT exploited, all finite
    # The winner's lineage ends at the winner's own final validation loss.
    assert both["lineage_score"][-1] == pytest.approx(both["best_val_loss"])
    # Inside each member the hypergradient moved the weight decays; PBT kept lr in bounds.
    wd = np.asarray(both["schedule"]["wd"])
    assert np.ptp(wd) > 0 and np.allclose(wd[0], config["init_wd"])
    lr = np.asarray(both["schedule"]["lr"])
    assert np.all((lr >= config["lr_low"]) & (lr <= config["lr_high"]))
    for r in results:
        assert len(r["fresh_test_acc"]) == config["fresh_seeds"]
        assert all(0.0 <= a <= 1.0 for a in r["fresh_test_acc"])
        assert all(math.isfinite(v) for v in r["fresh_val_loss"])
        if r is not default:
            assert math.isfinite(r["best_val_loss"])
            assert np.mean(r["fresh_test_acc"]) > 0.2  # well above chance (0.1) already
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["experiment"] == "pbt" and summary["smoke"] is True
    assert len(summary["rows"]) == 4  # every method against the defaults
    assert all(r["target"].startswith("defaults: fresh-seed test acc") for r in summary["rows"])


def test_pbt_help_and_bad_methods(capsys):
    with pytest.raises(SystemExit) as e:
        pbt.main(["--help"])
    assert e.value.code == 0
    assert "--smoke" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        pbt.main(["--methods", "pbt,grid"])
    assert e.value.code == 2
    assert "unknown method 'grid'" in capsys.readouterr().err
