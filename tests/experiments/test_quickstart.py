import json

import pytest

from experiments import quickstart


def test_quickstart_smoke(tmp_path):
    results = quickstart.main(["--smoke", "--out", str(tmp_path), "--no-progress"])
    assert (tmp_path / "quickstart.png").stat().st_size > 0
    assert (tmp_path / "nnx_weight_decay.png").stat().st_size > 0
    data = json.loads((tmp_path / "quickstart.json").read_text())
    history = data["history"]
    assert len(history) == 10
    # Hypergradient descent on the per-feature penalties lowers the validation loss.
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert all(h["inner_status"] in (0, 1) for h in history)
    methods = {r["method"].split(" (")[0] for r in results["l2"]}
    assert methods >= {"best shared penalty", "per-feature penalties"}
    for r in results["l2"] + results["nnx"]:
        assert 0.5 < r["test_acc"] <= 1.0
    assert len(results["nnx"]) == 2
    assert {r["method"] for r in results["hd"]} >= {"Adam", "Adam-HD"}
    assert (tmp_path / "hd_vs_adam.png").stat().st_size > 0
    assert (tmp_path / "stn_digits_schedule.png").stat().st_size > 0
    assert all(0.5 < r["test_acc"] <= 1.0 for r in results["stn"])
    # The sections' own claims (they run once, here):
    hd = {r["method"]: r for r in results["hd"]}
    assert hd["Adam"]["final_lr"] == pytest.approx(1e-5)
    assert hd["Adam-HD"]["final_lr"] > 1e-5  # HD moved away from the bad learning rate
    assert hd["Adam-HD"]["val_loss"] < hd["Adam"]["val_loss"]
    assert len(results["stn"]) == 1 and "drop_in=" in results["stn"][0]["final_hparams"]
    assert json.loads((tmp_path / "summary.json").read_text()).keys() == results.keys()


def test_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as e:
        quickstart.main(["--help"])
    assert e.value.code == 0
    assert "--smoke" in capsys.readouterr().out
