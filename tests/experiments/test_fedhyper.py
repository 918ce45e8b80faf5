"""Smoke run of the FedHyper experiment (experiments.fedhyper)."""

import json

import numpy as np
import pytest

from experiments import fedhyper


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("BILEVEL_NO_PROGRESS", "1")


def test_fedhyper_smoke(tmp_path, capsys):
    out = fedhyper.main(["--smoke", "--out", str(tmp_path)])
    for name in ("accuracy.png", "schedules.png", "results.csv", "results.json", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    printed = capsys.readouterr().out
    assert "rounds_to_target" in printed and "speedup_vs_fedavg" in printed
    assert printed.rstrip().splitlines()[-1].startswith("results in")

    rows = {(r["method"], r["lr0"]): r for r in out["rows"]}
    assert {m for m, _ in rows} == set(fedhyper.SMOKE_METHODS)
    assert all(r["skipped"] == 0 and r["clients_dropped"] == 0 for r in rows.values())
    # FedAvg learns: far above chance (10%) after 4 rounds at lr 0.1
    assert rows[("FedAvg", 0.1)]["final_test_acc"] > 0.4
    # the schedulers act: GM's global rate and CL's local factor left their initial values,
    # FedAvg's stayed put
    res = out["results"]
    assert res["FedAvg"]["global_learning_rate"].max() == 1.0
    assert res["FedHyper-GM"]["global_learning_rate"][:, -1].min() > 1.0
    assert np.abs(res["FedHyper-CL"]["local_lr_factor"] - 1).max() > 1e-3
    # every round of every member was recorded, with the initial accuracy
    assert res["FedAvg"]["test_acc"].shape == (2, 4) and res["FedAvg"]["acc0"].shape == (2,)

    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["rows"]) == len(out["rows"]) and saved["client_sizes"]["min"] >= 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["smoke"] is True and summary["seconds"] > 0
    assert summary["rows"] and all(
        set(r) == {"what", "result", "target"} and r["result"] for r in summary["rows"]
    )
    assert any("rounds to" in r["what"] for r in summary["rows"])


def test_rounds_to_target_and_speedup_formatting():
    acc = np.array([0.5, 0.79, 0.81, 0.9])
    assert fedhyper.rounds_to(acc, 0.8) == 3.0 and fedhyper.rounds_to(acc, 0.95) == np.inf
    assert fedhyper.speedup(20.0, 10.0, 40) == "2x"
    assert fedhyper.speedup(np.inf, 10.0, 40) == "> 4x"  # FedAvg never reached: a bound
    assert fedhyper.speedup(20.0, np.inf, 40) == "< 0.5x"
    assert fedhyper.fmt_rounds(np.inf, 40) == "> 40"


def test_help_lists_flags(capsys):
    with pytest.raises(SystemExit):
        fedhyper.main(["--help"])
    printed = capsys.readouterr().out
    assert "--smoke" in printed and "--full" in printed and "--target" in printed
