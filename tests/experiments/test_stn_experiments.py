import json

import numpy as np
import pytest

from experiments import _common, bench_stn, quickstart, stn_digits, stn_mnist_cnn, stn_ridge


def _one_full_bar(bars, name):
    assert len(bars) == 1, [b.desc for b in bars]
    assert bars[0].desc == name
    assert bars[0].total > 0 and bars[0].n == bars[0].total


def _summary(path, name, n_rows):
    summary = json.loads((path / "summary.json").read_text())
    assert summary["experiment"] == name and summary["smoke"] is True
    assert summary["seconds"] > 0
    assert len(summary["rows"]) == n_rows
    for row in summary["rows"]:
        assert set(row) == {"what", "result", "target"} and row["what"] and row["result"]
    return summary["rows"]


def test_stn_ridge_smoke(tmp_path, bars):
    path = tmp_path / "ridge.json"
    record = stn_ridge.main(
        ["--smoke", "--out", str(tmp_path), "--variant", "stn", "--json", str(path)]
    )
    data = json.loads(path.read_text())
    for key in ("final_lambda", "optimal_lambda", "final_val_loss", "optimal_val_loss"):
        assert np.isfinite(data[key]), key
    assert data["optimum_interior"] is True
    assert 0.1 < data["optimal_lambda"] < 0.5  # the documented instance: optimum about 0.25
    # Even the smoke run moves lambda up from 0.01, towards the optimum, and learns a response
    # aligned with the exact best-response Jacobian.
    stn = record["variants"]["stn"]
    assert data["final_lambda"] > 0.012
    assert data["final_val_loss"] >= data["optimal_val_loss"] - 1e-9
    assert stn["jacobian_cosine"] > 0.5
    assert stn["inner_skipped"] == 0 and stn["skipped"] == 0
    assert len(stn["history"]["step"]) == 60
    assert (tmp_path / "stn_ridge.png").stat().st_size > 0
    assert (tmp_path / "stn_ridge.csv").exists()
    rows = _summary(tmp_path, "stn_ridge", 2)
    assert rows[0]["target"] == "within 1.5x" and rows[1]["target"] == "> 0.9"
    assert f"{data['final_lambda']:.4g}" in rows[0]["result"]
    _one_full_bar(bars, "stn_ridge")


def test_stn_ridge_closed_form_helpers():
    x, y, xv, yv = stn_ridge.make_data(50, 200, 15, 4.0, 5)
    lam, loss, interior = stn_ridge.optimal_lambda(x, y, xv, yv)
    assert interior
    for f in (0.7, 1.4):
        assert stn_ridge.val_loss_at(x, y, xv, yv, lam * f) > loss
    # Response Jacobian against finite differences.
    eps = 1e-6
    fd = (stn_ridge.ridge_solution(x, y, lam + eps) - stn_ridge.ridge_solution(x, y, lam - eps)) / (
        2 * eps
    )
    np.testing.assert_allclose(stn_ridge.response_jacobian(x, y, lam), fd, rtol=1e-5)


def test_stn_digits_smoke(tmp_path, bars):
    record = stn_digits.main(["--smoke", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "stn_digits.json").read_text())
    assert np.isfinite(data["val_loss"]) and 0.5 < data["test_accuracy"] <= 1.0
    assert set(data["hparams"]) == {"drop_in", "drop_hidden", "noise"}
    assert (tmp_path / "stn_digits.png").stat().st_size > 0
    methods = [r["method"] for r in record["rows"]]
    assert methods[0] == "STN (tuned online)"
    assert any("fixed dropout 0.5" in m for m in methods)
    assert any("random search" in m for m in methods)
    assert len(data["random_search"]["all"]) == 2
    # Curves start at epoch 0 from the same untrained loss and cover the same epochs.
    stn_curve = data["stn"]["curve"]
    fixed_curve = data["fixed"]["dropout 0"]["curve"]
    assert stn_curve[0]["epoch"] == fixed_curve[0]["epoch"] == 0.0
    assert abs(stn_curve[-1]["epoch"] - fixed_curve[-1]["epoch"]) <= 0.5
    assert data["stn"]["schedule"]["epoch"][0] == 0.0
    # The plain network learns: its validation loss falls from the untrained one.
    assert fixed_curve[-1]["val_loss"] < fixed_curve[0]["val_loss"]
    rows = _summary(tmp_path, "stn_digits", 5)
    assert "0.05-0.06" in rows[0]["target"]
    _one_full_bar(bars, "stn_digits")


def test_stn_mnist_cnn_smoke(tmp_path, bars):
    stn_mnist_cnn.main(["--smoke", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "stn_mnist_cnn.json").read_text())
    assert np.isfinite(data["val_loss"])
    assert list(data["hparams"]) == ["drop", "shift", "cutout", "noise"]
    assert set(data["fixed"]) == {b[0] for b in stn_mnist_cnn.BASELINES}
    curve = data["stn"]["curve"]
    assert curve[0]["epoch"] == 0.0 and curve[-1]["val_loss"] < curve[0]["val_loss"]
    assert (tmp_path / "stn_mnist_cnn.png").stat().st_size > 0
    rows = _summary(tmp_path, "stn_mnist_cnn", 3)
    assert all("/" in r["result"] and r["result"].endswith("%") for r in rows)
    _one_full_bar(bars, "stn_mnist_cnn")


def test_bench_stn_smoke(tmp_path, capsys, bars):
    record = bench_stn.main(["--smoke", "--layers", "--out", str(tmp_path)])
    assert record["ratio"] > 0 and len(record["stn_epoch_seconds"]) == 3
    assert "ratio" in capsys.readouterr().out
    assert (tmp_path / "bench_stn.json").exists()
    assert (tmp_path / "bench_stn.png").stat().st_size > 0
    row, epoch_row = _summary(tmp_path, "bench_stn", 2)
    assert row["target"] == "<= 2.2x" and f"{record['ratio']:.2f}x" in row["result"]
    # the same trainer with sampler=bilevel.epoch_minibatches: its own program and row
    (v,) = record["variants"].values()
    assert "epoch order" in epoch_row["what"] and epoch_row["target"] == "<= 2.2x"
    assert f"{v['epoch_order_ratio']:.2f}x" in epoch_row["result"]
    assert v["sampling"] == pytest.approx(v["ratio"] - v["epoch_order_ratio"])
    _one_full_bar(bars, "bench_stn")
    # The breakdown adds up to the epoch (arithmetic of the medians, not a timed assert).
    parts = v["train_steps"] + v["hyper_steps"] + v["fit_host"]
    assert parts == pytest.approx(v["ratio"]) and v["train_steps"] > 0
    profile = {r["gradient of"]: r for r in record["layer_profile"]}
    assert set(profile) == {"plain network", "STN full, shared hnet", "STN full, per-example hnet"}
    assert profile["plain network"]["x_plain"] == 1.0
    assert all(r["ms"] > 0 for r in profile.values())
    assert set(record["program_seconds"]) == {
        "full fit",
        "full scan",
        "full inner",
        "full fit_epoch",
        "plain plain",
    }


@pytest.mark.parametrize(
    "argv",
    [
        ["--ranks", "full,x"],
        ["--ranks", "0"],
        ["--ranks", ""],
        ["--model", "cnn", "--ranks", "8"],
        ["--model", "cnn", "--layers"],
    ],
)
def test_bench_stn_rejects_bad_ranks(argv):
    with pytest.raises(SystemExit):
        bench_stn.main([*argv, "--no-progress"])


def test_block_size_divides_the_run():
    assert _common._block_size(420, 7.0) == 7
    assert _common._block_size(92, 4.6) == 4  # 23 blocks of 4 cycles, none left over
    assert _common._block_size(7, 3.0) == 3  # no divisor within 2x: the rounded target
    assert _common._block_size(5, 0.2) == 1


def test_stn_experiments_do_not_import_each_other():
    import ast
    import inspect

    for module in (stn_ridge, stn_digits, stn_mnist_cnn, bench_stn, quickstart):
        tree = ast.parse(inspect.getsource(module))
        imported = {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module == "experiments"
            for alias in node.names
        } | {
            node.module
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("experiments.")
        }
        stn_modules = {"stn_ridge", "stn_digits", "stn_mnist_cnn", "bench_stn"}
        assert not imported & (stn_modules | {f"experiments.{m}" for m in stn_modules}), module


@pytest.mark.parametrize("module", [stn_ridge, stn_digits, stn_mnist_cnn, bench_stn])
def test_help_exits_cleanly(module, capsys):
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--smoke" in out


@pytest.mark.slow
def test_stn_ridge_default_run_reaches_the_known_answer(tmp_path):
    # The full default experiment: both variants end within 1.5x of the closed-form optimum
    # with a response Jacobian aligned to -2 H^-1 w*.
    record = stn_ridge.main(["--out", str(tmp_path), "--no-progress"])
    for variant, r in record["variants"].items():
        assert 1 / 1.5 < r["ratio"] < 1.5, (variant, r["ratio"])
        assert r["jacobian_cosine"] > 0.9, (variant, r["jacobian_cosine"])


def test_stn_digits_rejects_a_bad_response_rank():
    with pytest.raises(SystemExit):
        stn_digits.main(["--response-rank", "0", "--no-progress"])
