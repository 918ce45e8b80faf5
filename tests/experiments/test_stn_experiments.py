import json

import numpy as np
import pytest

from experiments import bench_stn, quickstart, stn_digits, stn_mnist_cnn, stn_ridge


def test_stn_ridge_smoke(tmp_path):
    path = tmp_path / "ridge.json"
    record = stn_ridge.main(
        [
            "--smoke",
            "--out",
            str(tmp_path),
            "--no-progress",
            "--variant",
            "stn",
            "--json",
            str(path),
        ]
    )
    data = json.loads(path.read_text())
    for key in ("final_lambda", "optimal_lambda", "final_val_loss", "optimal_val_loss"):
        assert np.isfinite(data[key]), key
    assert data["optimum_interior"] is True
    assert 0.1 < data["optimal_lambda"] < 0.5  # the documented instance: optimum about 0.25
    # Even the smoke run moves lambda up from 0.01, towards the optimum.
    assert data["final_lambda"] > 0.012
    assert data["final_val_loss"] >= data["optimal_val_loss"] - 1e-9
    assert (tmp_path / "stn_ridge.png").stat().st_size > 0
    assert (tmp_path / "stn_ridge.csv").exists()
    assert record["variants"]["stn"]["inner_skipped"] == 0
    assert record["variants"]["stn"]["skipped"] == 0


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


def test_stn_digits_smoke(tmp_path):
    record = stn_digits.main(["--smoke", "--out", str(tmp_path), "--no-progress"])
    data = json.loads((tmp_path / "stn_digits.json").read_text())
    assert np.isfinite(data["val_loss"]) and 0.5 < data["test_accuracy"] <= 1.0
    assert set(data["hparams"]) == {"drop_in", "drop_hidden", "noise"}
    assert (tmp_path / "stn_digits.png").stat().st_size > 0
    methods = [r["method"] for r in record["rows"]]
    assert any("fixed dropout 0.5" in m for m in methods)
    assert any("random search" in m for m in methods)


def test_stn_mnist_cnn_smoke(tmp_path):
    stn_mnist_cnn.main(["--smoke", "--out", str(tmp_path), "--no-progress"])
    data = json.loads((tmp_path / "stn_mnist_cnn.json").read_text())
    assert np.isfinite(data["val_loss"])
    assert set(data["hparams"]) == {"drop", "shift", "cutout", "noise"}
    assert (tmp_path / "stn_mnist_cnn.png").stat().st_size > 0


def test_bench_stn_smoke(tmp_path, capsys):
    record = bench_stn.main(["--smoke", "--out", str(tmp_path), "--no-progress"])
    assert record["ratio"] > 0 and len(record["stn_epoch_seconds"]) == 3
    assert "ratio" in capsys.readouterr().out
    assert (tmp_path / "bench_stn.json").exists()


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
    assert "--smoke" in capsys.readouterr().out


@pytest.mark.slow
def test_stn_ridge_default_run_reaches_the_known_answer(tmp_path):
    # The full default experiment (about 10 s per variant): both variants end within 1.5x of the
    # closed-form optimum with a response Jacobian aligned to -2 H^-1 w*.
    record = stn_ridge.main(["--out", str(tmp_path), "--no-progress"])
    for variant, r in record["variants"].items():
        assert 1 / 1.5 < r["ratio"] < 1.5, (variant, r["ratio"])
        assert r["jacobian_cosine"] > 0.9, (variant, r["jacobian_cosine"])
