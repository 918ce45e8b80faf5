"""Smoke runs of the hypergradient-optimizer experiment, its quickstart section and benchmark."""

import json

import numpy as np
import pytest

from experiments import bench_optax, hd_optimizers


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("BILEVEL_NO_PROGRESS", "1")


def _summary(path):
    summary = json.loads((path / "summary.json").read_text())
    assert summary["smoke"] is True and summary["seconds"] > 0
    assert summary["rows"] and all(
        set(r) == {"what", "result", "target"} and r["result"] for r in summary["rows"]
    )
    return summary


def test_hd_optimizers_smoke(tmp_path, capsys):
    out = hd_optimizers.main(["--smoke", "--out", str(tmp_path)])
    for name in (
        "results.csv",
        "results.json",
        "sweep.csv",
        "val_loss_curves.png",
        "learning_rates.png",
        "sweep.png",
        "lagged.png",
    ):
        assert (tmp_path / name).stat().st_size > 0
    printed = capsys.readouterr().out
    assert "final_val_loss" in printed and "HD (defaults) vs base" in printed
    assert printed.rstrip().splitlines()[-1].startswith("results in")
    rows = out["rows"]
    assert {r["method"] for r in rows} == {"SGD", "HD-SGD"}
    assert all(np.isfinite(r["final_val_loss"]) for r in rows)
    hd = [r for r in rows if r["method"] == "HD-SGD"]
    assert all(r["final_lr"] != r["lr0"] for r in hd)  # the learning rate was adapted
    # the sweep scores every beta, the default included; beta = 0 is the base
    assert {s["beta"] for s in out["scores"]} == {hd_optimizers.bilevel.DEFAULT_HYPER_LR}
    # lagged and exact hd_adam both leave the starting loss log(10) behind from lr0 = 0.1
    lag = {r["lr0"]: r for r in out["lagged"]}[0.1]
    assert lag["hd_adam"] < 0.5 * np.log(10) and lag["hd_adam_lagged"] < 0.5 * np.log(10)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["rows"]) == len(rows) and saved["default_hyper_lr"] > 0
    summary = _summary(tmp_path)
    assert any("default hyper_lr" in r["what"] for r in summary["rows"])


def test_bench_optax_smoke(tmp_path, capsys):
    rows = bench_optax.main(["--smoke", "--out", str(tmp_path)])
    assert (tmp_path / "bench_optax.png").stat().st_size > 0
    assert (tmp_path / "bench_optax.csv").stat().st_size > 0
    by = {r["optimizer"]: r for r in rows}
    assert set(by) == set(bench_optax.SMOKE_OPTIMIZERS)
    for name in ("hd_adam", "hd_adam_lagged"):
        assert by[name]["ratio"] > 0 and by[name]["update_bytes_ratio"] > 0
    # hd_adam keeps Adam's two moments and nothing more (the old path stored a third array)
    assert by["adam"]["state_arrays"] == by["hd_adam"]["state_arrays"] == 2
    assert by["hd_adam"]["state_bytes_per_param"] == 8
    # the table's ratio is the ratio of the printed medians
    ratio = by["hd_adam"]["ms_per_step"] / by["adam"]["ms_per_step"]
    assert by["hd_adam"]["ratio"] == pytest.approx(ratio)
    printed = capsys.readouterr().out
    assert "ratio" in printed and printed.rstrip().splitlines()[-1].startswith("results in")
    _summary(tmp_path)


def test_help_lists_flags(capsys):
    for module in (hd_optimizers, bench_optax):
        with pytest.raises(SystemExit):
            module.main(["--help"])
        assert "--smoke" in capsys.readouterr().out
