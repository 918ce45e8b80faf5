"""Smoke runs of the hypergradient-optimizer experiment, its quickstart section and benchmark."""

import json

import numpy as np
import pytest

from experiments import bench_optax, hd_optimizers


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("BILEVEL_NO_PROGRESS", "1")


def test_hd_optimizers_smoke(tmp_path, capsys):
    rows = hd_optimizers.main(["--smoke", "--out", str(tmp_path)])
    for name in ("results.csv", "results.json", "val_loss_curves.png", "learning_rates.png"):
        assert (tmp_path / name).stat().st_size > 0
    printed = capsys.readouterr().out
    assert "final_val_loss" in printed and "HD vs base" in printed
    methods = {r["method"] for r in rows}
    assert {"SGD", "SGD-HD", "Adam-HD", "prodigy"} <= methods
    assert all(np.isfinite(r["final_val_loss"]) for r in rows)
    hd = [r for r in rows if r["method"] == "SGD-HD"]
    assert all(r["final_lr"] != r["lr0"] for r in hd)  # the learning rate was adapted
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["rows"]) == len(rows)


def test_bench_optax_smoke(tmp_path, capsys):
    rows = bench_optax.main(["--smoke", "--out", str(tmp_path)])
    assert (tmp_path / "bench_optax.png").stat().st_size > 0
    assert (tmp_path / "bench_optax.csv").stat().st_size > 0
    ratios = {r["optimizer"]: r["ratio"] for r in rows}
    assert set(ratios) == set(bench_optax.OPTIMIZERS)
    for name in ("hd_adam", "hd_sgd", "hyper_adapt_1", "hyper_adapt_3"):
        assert ratios[name] > 0
    assert "ratio" in capsys.readouterr().out


def test_help_lists_flags(capsys):
    for module in (hd_optimizers, bench_optax):
        with pytest.raises(SystemExit):
            module.main(["--help"])
        assert "--smoke" in capsys.readouterr().out
