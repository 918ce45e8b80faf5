import json

import pytest

from experiments import quickstart


def test_quickstart_smoke(tmp_path):
    results = quickstart.main(["--smoke", "--out", str(tmp_path), "--no-progress"])
    for name in (
        "quickstart.png",
        "nnx_weight_decay.png",
        "hd_vs_adam.png",
        "stn_digits_schedule.png",
        "history.csv",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    data = json.loads((tmp_path / "quickstart.json").read_text())
    assert set(results) == {"l2", "nnx", "hd", "stn"}

    # 1. Hypergradient descent on the per-feature penalties lowers the validation loss, below
    # the best shared penalty of the grid.
    history = data["l2"]["history"]
    assert len(history) == 10
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert all(h["inner_status"] in (0, 1) for h in history)
    l2 = {r["method"].split(" (")[0]: r for r in results["l2"]}
    assert set(l2) == {"best shared penalty", "shared penalty", "per-feature penalties"}
    assert l2["per-feature penalties"]["val_loss"] < l2["best shared penalty"]["val_loss"]

    # 2. The baseline keeps its decays, the tuned run moves them and lowers the validation
    # loss; the first hypergradients of the three ReLU layers are equal within a few percent
    # (the rescaling symmetry the printed note explains).
    fixed, tuned = results["nnx"]
    assert fixed["final_weight_decays"] == "0.001 0.001 0.001"
    assert tuned["final_weight_decays"] != fixed["final_weight_decays"]
    assert tuned["val_loss"] < fixed["val_loss"]
    g0 = data["nnx"]["first_hypergradients"]
    assert len(g0) == 3 and max(g0) / min(g0) < 1.1

    # 3. HD moved away from the bad learning rate and beats Adam stuck there.
    hd = {r["method"]: r for r in results["hd"]}
    assert set(hd) == {"Adam", "Adam-HD", "Adam (tuned 0.01)"}
    assert hd["Adam"]["final_lr"] == pytest.approx(1e-5)
    assert hd["Adam-HD"]["final_lr"] > 1e-5
    assert hd["Adam-HD"]["val_loss"] < hd["Adam"]["val_loss"]

    # 4. The STN's hyperparameters left their initial values.
    (stn,) = results["stn"]
    assert "drop_in=" in stn["final_hparams"]
    assert stn["final_hparams"] != stn["initial_hparams"]
    schedule = data["stn"]["schedule"]
    assert len(schedule["epoch"]) == len(schedule["drop_in"]) > 0

    for r in results["l2"] + results["nnx"] + results["hd"] + results["stn"]:
        assert 0.5 < r["test_acc"] <= 1.0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["experiment"] == "quickstart" and summary["smoke"] is True
    assert len(summary["rows"]) == 4
    assert all(r["what"].startswith(f"quickstart {i + 1}:") for i, r in enumerate(summary["rows"]))


def test_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as e:
        quickstart.main(["--help"])
    assert e.value.code == 0
    assert "--smoke" in capsys.readouterr().out
