import json

from experiments import quickstart


def test_quickstart_smoke(tmp_path):
    rows = quickstart.main(["--smoke", "--out", str(tmp_path), "--no-progress"])
    assert (tmp_path / "quickstart.png").stat().st_size > 0
    data = json.loads((tmp_path / "quickstart.json").read_text())
    history = data["history"]
    assert len(history) == 10
    # Hypergradient descent on the per-feature penalties lowers the validation loss.
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert all(h["inner_status"] in (0, 1) for h in history)
    assert {r["method"].split(" (")[0] for r in rows} >= {
        "best shared penalty",
        "per-feature penalties",
    }
    for r in rows:
        assert 0.5 < r["test_acc"] <= 1.0


def test_help_exits_cleanly(capsys):
    import pytest

    with pytest.raises(SystemExit) as e:
        quickstart.main(["--help"])
    assert e.value.code == 0
    assert "--smoke" in capsys.readouterr().out
