"""One training loop for every tuner: chunked jitted steps, history, callbacks, checkpoints.

:func:`fit` drives any *tuner* with

- ``sample_batches(state, inner_data, outer_data, batch_size, outer_batch_size)`` - the batches of
  the next step, a pure function of ``state.key`` and ``state.step`` (so a resumed run replays the
  same data);
- ``step(state, inner_batches, outer_batches) -> (state, metrics)`` - ``metrics`` a dict (nested
  dicts allowed) of arrays;
- ``warmup(state, inner_batches) -> (state, metrics)`` - only when ``warmup_steps > 0``;
  ``warmup(state, inner_batches, steps=r)`` (``r`` inner steps) and an ``inner_steps``
  attribute when a ``train_steps`` budget leaves a remainder.

:class:`EarlyStopping` is a callback that tracks the best iterate by a held-out evaluation (or a
metric) and stops the run when it stops improving; ``fit`` then returns the best state.
"""

from __future__ import annotations

import inspect
import math
import os
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from bilevel._checkpoint import latest_step, restore_checkpoint, save_checkpoint
from solvers import checks

__all__ = ["EarlyStopping", "fit"]

PyTree = Any
Callback = Callable[[int, PyTree, dict], Any]

HISTORY_FILE = "history.npz"
_DONE, _LABEL = "__fit_done__", "__fit_checkpoint__"
_SEP = "/"

# Jitted runners of tuners that cannot carry an attribute (slots, frozen classes).
_RUNNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fit(
    tuner: Any,
    state: PyTree,
    inner_data: PyTree,
    outer_data: PyTree,
    *,
    steps: int | None = None,
    batch_size: int,
    train_steps: int | None = None,
    outer_batch_size: int | None = None,
    warmup_steps: int = 0,
    chunk: int = 10,
    callbacks: Callback | Iterable[Callback] = (),
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = True,
    progress: bool = True,
    desc: str | None = None,
    log_dir: str | os.PathLike | None = None,
    tensorboard: bool = False,
) -> tuple[PyTree, dict[str, np.ndarray]]:
    r"""Run ``warmup_steps`` warm-up steps then ``steps`` steps of ``tuner``, recording metrics.

    A training budget instead of a number of tuning steps: ``train_steps=N`` (inner, i.e.
    training, steps in all, warm-up included) runs

    .. math:: n = \lfloor (N - w K) / K \rfloor \text{ tuning steps, then }
       r = (N - w K) - n K \text{ training steps without a hypergradient step,}

    with ``K = tuner.inner_steps`` and ``w = warmup_steps``, so ``K`` need not divide the budget
    (15 epochs of 23 minibatches are 345 steps: 34 cycles of 10 and a tail of 5).

    Batches come from ``tuner.sample_batches``; ``chunk`` steps run per jitted call (a
    ``lax.scan`` of sample + step), compiled once per ``(batch_size, outer_batch_size, chunk)``
    and cached on the tuner, so a second ``fit`` does not retrace. One progress bar covers the
    whole run (warm-up included) and advances per chunk.

    Args:
      tuner: an object with ``sample_batches``, ``step`` (and ``warmup``), see the module.
      state: the tuner's state to start from (also the template of a resumed checkpoint).
      inner_data: the training set, a pytree of arrays with a leading example axis.
      outer_data: the validation set, likewise.
      steps: tuning steps to run (``>= 0``); give it or ``train_steps``.
      batch_size: examples per inner batch.
      train_steps: the training budget in inner steps (see above); give it or ``steps``.
      outer_batch_size: examples per outer batch (default ``batch_size``).
      warmup_steps: ``tuner.warmup`` steps before tuning (not in the history).
      chunk: steps per jitted call; callbacks and checkpoints happen at chunk boundaries.
      callbacks: ``cb(step, state, metrics)`` (or a sequence of them) called after each tuning
        chunk, ``step`` the tuner's ``state.step`` and ``metrics`` the chunk's last step's metrics
        (NumPy); returning ``True`` stops the run early. An :class:`EarlyStopping` callback with
        ``restore_best=True`` makes ``fit`` return its best state instead of the last one.
      checkpoint_dir: folder for :func:`bilevel.save_checkpoint` checkpoints (labelled with
        ``state.step``) and the history so far (``history.npz``); ``None``: no checkpoints.
      checkpoint_every: also checkpoint every this many steps (at chunk boundaries); the final
        state is always checkpointed when ``checkpoint_dir`` is set.
      resume: continue from the latest checkpoint of ``checkpoint_dir`` written by ``fit``: its
        state (restored into ``state``'s structure) and history, running only the remaining
        steps, so the result is bit-identical to an uninterrupted run. With ``resume=False`` a
        ``checkpoint_dir`` that already holds checkpoints is an error (nothing is overwritten).
      progress: show a ``tqdm`` progress bar.
      desc: the bar's label (default: the tuner's class name).
      log_dir: folder for ``metrics.jsonl``: one JSON object per tuning step (``"step"`` and
        every metric, nested names joined with ``"/"``, arrays as lists), appended after each
        chunk and flushed, so a running job can be followed (``tail -f``) or plotted. A resumed
        run rewrites the file from the restored history first, so it never holds a step twice.
      tensorboard: also write every scalar metric (and each element of small vector metrics,
        e.g. per-layer ``hparams/wd/0``) as TensorBoard scalars into ``log_dir``. Needs the
        optional ``tensorboardX`` package (``pip install tensorboardX``); never a hard dependency.

    Returns:
      ``(state, history)``: ``history`` maps ``"step"`` (``state.step`` after each step) and every
      metric, nested names joined with ``"/"`` (``"hparams/dropout"``), to NumPy arrays with one
      row per tuning step. ``state`` is the last state, or the best one of an
      :class:`EarlyStopping` callback with ``restore_best=True``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from flax import nnx
      >>> from bilevel import hparams, stn
      >>> from bilevel import fit
      >>> X = jax.random.normal(jax.random.key(0), (64, 3))
      >>> data = (X, X @ jnp.ones((3, 1)))
      >>> loss = lambda m, h, b: jnp.mean((m(b[0], h.hnet) - b[1]) ** 2)
      >>> trainer = stn.Trainer(stn.StnLinear(3, 1, 1, rngs=nnx.Rngs(0)),
      ...     lambda m, h, b, key: loss(m, h, b) + jnp.mean(h["wd"] * stn.effective_l2(m, h.hnet)),
      ...     loss, space={"wd": hparams.log(0.1)}, inner_optimizer=optax.adam(1e-2),
      ...     outer_optimizer=optax.adam(1e-2))
      >>> seen = []
      >>> state, history = fit(trainer, trainer.init(), data, data, steps=6, batch_size=16,
      ...     warmup_steps=2, chunk=3, callbacks=lambda step, s, m: seen.append(step),
      ...     progress=False)
      >>> history["step"].tolist(), seen, sorted(k for k in history if k.startswith("hparams"))
      ([3, 4, 5, 6, 7, 8], [5, 8], ['hparams/wd'])
    """
    if (steps is None) == (train_steps is None):
        raise TypeError(
            "fit needs exactly one of steps= (tuning steps) and train_steps= (a budget of "
            f"training steps); got steps={steps!r}, train_steps={train_steps!r}"
        )
    batch_size = checks.integer("batch_size", batch_size)
    outer_batch_size = checks.optional_integer("outer_batch_size", outer_batch_size)
    warmup_steps = checks.integer("warmup_steps", warmup_steps, low=0)
    chunk = checks.integer("chunk", chunk)
    checkpoint_every = checks.optional_integer("checkpoint_every", checkpoint_every)
    callbacks = _callbacks(callbacks)
    for name, flag in (("resume", resume), ("progress", progress)):
        if not isinstance(flag, bool | np.bool_):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    if desc is not None and not isinstance(desc, str):
        raise TypeError(f"desc must be a string or None, got {desc!r}")
    if checkpoint_dir is not None and not isinstance(checkpoint_dir, str | os.PathLike):
        raise TypeError(f"checkpoint_dir must be a path or None, got {checkpoint_dir!r}")
    if checkpoint_every is not None and checkpoint_dir is None:
        raise ValueError("checkpoint_every needs a checkpoint_dir")
    if log_dir is not None and not isinstance(log_dir, str | os.PathLike):
        raise TypeError(f"log_dir must be a path or None, got {log_dir!r}")
    if not isinstance(tensorboard, bool | np.bool_):
        raise TypeError(f"tensorboard must be a bool, got {tensorboard!r}")
    if tensorboard and log_dir is None:
        raise ValueError("tensorboard=True needs a log_dir to write the event files into")
    tail = 0
    if train_steps is not None:
        steps, tail = _budget(tuner, train_steps, warmup_steps)
    steps = checks.integer("steps", steps, low=0)
    needs = ["sample_batches", "step"] + (["warmup"] if warmup_steps or tail else [])
    missing = [m for m in needs if not callable(getattr(tuner, m, None))]
    if missing:
        raise TypeError(
            f"fit needs a tuner with {', '.join(needs)}; {type(tuner).__name__} lacks "
            f"{', '.join(missing)}"
        )
    if tail and "steps" not in inspect.signature(tuner.warmup).parameters:
        raise TypeError(
            f"train_steps={train_steps} leaves {tail} training steps after the last full cycle, "
            f"and {type(tuner).__name__}.warmup takes no steps= to run them: pass a budget that "
            "inner_steps divides, or steps="
        )

    total = warmup_steps + steps + (1 if tail else 0)  # the tail is one unit of work
    done, saved, records = 0, None, []
    if checkpoint_dir is not None and not resume and latest_step(checkpoint_dir) is not None:
        raise ValueError(
            f"checkpoint_dir {checkpoint_dir} already holds checkpoints and resume=False: pass "
            "resume=True to continue that run, or an empty folder to start over"
        )
    if checkpoint_dir is not None and resume:
        resumed = _resume(Path(checkpoint_dir), state)
        if resumed is not None:
            state, done, history = resumed
            if done > total:
                raise ValueError(
                    f"{checkpoint_dir} holds a run already {done} steps in, more than the "
                    f"{total} asked for (warmup_steps + steps); pass resume=False or another "
                    "checkpoint_dir"
                )
            if history:
                records.append(history)
            saved = done

    run = _runner(tuner, batch_size, outer_batch_size, chunk)
    logger = _Logger(Path(log_dir), tensorboard, _concat(records)) if log_dir is not None else None
    bar = _progress_bar(total, done, desc or type(tuner).__name__, not progress)
    tuned_end = warmup_steps + steps
    try:
        while done < total:
            if done >= tuned_end:  # the remainder of a train_steps budget
                state = _tail_runner(tuner, batch_size, outer_batch_size, tail)(
                    state, inner_data, outer_data
                )
                done += 1
                bar.update(1)
                continue
            warm = done < warmup_steps
            n = min(chunk, (warmup_steps if warm else tuned_end) - done)
            state, out = run(state, inner_data, outer_data, n, warm)
            done += n
            stop = False
            if not warm:
                metrics, step_ids = jax.device_get(out)
                row = _flatten(metrics)
                row["step"] = np.asarray(step_ids)
                records.append(row)
                if logger is not None:
                    logger.write(row)
                last = jax.tree.map(lambda a: a[-1], metrics)
                stop = any(cb(int(step_ids[-1]), state, last) is True for cb in callbacks)
            bar.update(n)
            due = checkpoint_every is not None and (
                saved is None or done // checkpoint_every > saved // checkpoint_every
            )
            if checkpoint_dir is not None and due and done < total and not stop:
                _save(Path(checkpoint_dir), state, done, records)
                saved = done
            if stop:
                break
    finally:
        bar.close()
        if logger is not None:
            logger.close()
    if checkpoint_dir is not None and saved != done:
        _save(Path(checkpoint_dir), state, done, records)
    for cb in callbacks:
        if isinstance(cb, EarlyStopping) and cb.restore_best and cb.best_state is not None:
            state = cb.best_state
    return state, _concat(records)


class EarlyStopping:
    r"""A :func:`fit` callback: keep the best iterate by a held-out score, stop when it stalls.

    After every tuning chunk it scores the state, ``v_k = evaluate(state)`` (a loss: lower is
    better), keeps the state of the lowest finite score, and asks ``fit`` to stop after
    ``patience`` scores in a row that do not improve on the reference by more than
    ``min_delta``; the reference ``r`` is the last score that did:

    .. math:: v_k < r - \delta \ \Rightarrow\ r \leftarrow v_k,\ c \leftarrow 0;
       \quad \text{otherwise } c \leftarrow c + 1; \qquad \text{stop when } c = p .

    The score should come from data the hypergradients never see: a second held-out split
    (the outer loss is the validation loss the hyperparameters are fitted to, so it keeps
    falling while the hyperparameters overfit the validation set, e.g. hyper-cleaning's
    per-example weights). The best state is held here, outside the jitted arrays (a state whose
    score is not finite is never kept), and ``fit`` returns it when ``restore_best``.

    Args:
      evaluate: ``evaluate(state) -> scalar`` (jitted here once; e.g.
        ``lambda s: heldout_loss(s.params)``), or the name of a metric of the chunk's last step
        (``"outer_loss"``; nested names joined with ``"/"``).
      patience: scores without improvement before stopping (``>= 1``).
      min_delta: the improvement that counts (``>= 0``).
      restore_best: ``fit`` returns the best state instead of the last one.

    Attributes:
      best_state, best_value, best_step: the best iterate, its score and its ``state.step``
        (``None`` / ``inf`` / ``None`` before the first finite score).
      steps, values: every scored step and its score (lists).
      stopped_step: the step at which it stopped the run, or ``None``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, solvers, bilevel
      >>> X = jax.random.normal(jax.random.key(0), (90, 3)); y = X @ jnp.ones(3)
      >>> loss = lambda w, h, b: jnp.mean((b[0] @ w - b[1]) ** 2) + h["wd"] * w @ w
      >>> opt = bilevel.BilevelOptimizer(loss, loss, inner_optimizer=optax.sgd(0.1),
      ...     outer_optimizer=optax.adam(0.05), space={"wd": bilevel.hparams.log(0.1)},
      ...     method=solvers.Implicit(), inner_steps=5)
      >>> held_out = lambda s: jnp.mean((X[60:] @ s.params - y[60:]) ** 2)
      >>> stop = bilevel.EarlyStopping(held_out, patience=3)
      >>> state, history = opt.fit(opt.init(jnp.zeros(3)), (X[:40], y[:40]), (X[40:60], y[40:60]),
      ...     steps=40, batch_size=16, chunk=2, callbacks=stop, progress=False)
      >>> int(state.step) == stop.best_step, len(stop.values) == len(history["step"]) // 2
      (True, True)
    """

    def __init__(
        self,
        evaluate: Callable[[PyTree], Any] | str,
        *,
        patience: int = 5,
        min_delta: float = 0.0,
        restore_best: bool = True,
    ):
        if isinstance(evaluate, str):
            self._metric, self._evaluate = evaluate, None
        elif callable(evaluate):
            self._metric, self._evaluate = None, jax.jit(evaluate)
        else:
            raise TypeError(
                "evaluate must be a function state -> scalar (a held-out loss) or the name of a "
                f"metric such as 'outer_loss', got {evaluate!r}"
            )
        self.patience = checks.integer("patience", patience)
        self.min_delta = checks.number("min_delta", min_delta, low=0.0)
        if not isinstance(restore_best, bool | np.bool_):
            raise TypeError(f"restore_best must be a bool, got {restore_best!r}")
        self.restore_best = bool(restore_best)
        self.best_state: PyTree = None
        self.best_value = math.inf
        self.best_step: int | None = None
        self.steps: list[int] = []
        self.values: list[float] = []
        self.stopped_step: int | None = None
        self._reference, self._since = math.inf, 0

    def score(self, state: PyTree, metrics: dict) -> float:
        """The score of ``state`` (``metrics``: the chunk's last step's metrics)."""
        if self._evaluate is not None:
            return float(np.asarray(self._evaluate(state)))
        value: Any = metrics
        for part in self._metric.split(_SEP):
            if not isinstance(value, dict) or part not in value:
                raise KeyError(
                    f"EarlyStopping: no metric {self._metric!r}; the metrics are "
                    f"{sorted(_flatten(metrics))}"
                )
            value = value[part]
        return float(np.asarray(value))

    def __call__(self, step: int, state: PyTree, metrics: dict) -> bool:
        value = self.score(state, metrics)
        self.steps.append(int(step))
        self.values.append(value)
        finite = math.isfinite(value)
        if finite and value < self.best_value:
            self.best_value, self.best_step, self.best_state = value, int(step), state
        if finite and value < self._reference - self.min_delta:
            self._reference, self._since = value, 0
        else:
            self._since += 1
        if self._since >= self.patience:
            self.stopped_step = int(step)
            return True
        return False


def _budget(tuner, train_steps, warmup_steps) -> tuple[int, int]:
    """``(tuning steps, tail)`` of a ``train_steps`` budget (see :func:`fit`)."""
    k = getattr(tuner, "inner_steps", None)
    if not isinstance(k, int | np.integer) or k < 1:
        raise TypeError(
            f"train_steps needs a tuner with an integer inner_steps; {type(tuner).__name__} has "
            f"{k!r}: pass steps= (tuning steps) instead"
        )
    train_steps = checks.integer("train_steps", train_steps, low=0)
    left = train_steps - warmup_steps * k
    if left < 0:
        raise ValueError(
            f"train_steps={train_steps} is less than the {warmup_steps} warm-up steps of "
            f"inner_steps={k} training steps each ({warmup_steps * k})"
        )
    return left // k, left % k


# ---------------------------------------------------------------------------------- internals


def _callbacks(callbacks) -> tuple[Callback, ...]:
    if callable(callbacks):
        return (callbacks,)
    try:
        out = tuple(callbacks)
    except TypeError:
        raise TypeError(
            f"callbacks must be a callable or a sequence of callables, got {callbacks!r}"
        ) from None
    for cb in out:
        if not callable(cb):
            raise TypeError(f"callbacks must be callables cb(step, state, metrics), got {cb!r}")
    return out


def _runner(tuner, batch_size, outer_batch_size, chunk):
    """The jitted chunk runner of ``tuner`` for these sizes, built once and cached on it."""
    try:
        cache = tuner.__dict__.setdefault("_fit_runners", {})
    except (AttributeError, TypeError):
        cache = _RUNNERS.setdefault(tuner, {})
    key = (batch_size, outer_batch_size, chunk)
    if key not in cache:

        def run(state, inner_data, outer_data, n, warm):
            def body(state, _):
                inner, outer = tuner.sample_batches(
                    state, inner_data, outer_data, batch_size, outer_batch_size
                )
                if warm:
                    state, _metrics = tuner.warmup(state, inner)
                    return state, None
                state, metrics = tuner.step(state, inner, outer)
                return state, (metrics, state.step)

            return jax.lax.scan(body, state, None, length=n)

        cache[key] = jax.jit(run, static_argnums=(3, 4))
    return cache[key]


def _tail_runner(tuner, batch_size, outer_batch_size, tail):
    """The jitted remainder of a ``train_steps`` budget: ``tail`` training steps, no tuning."""
    try:
        cache = tuner.__dict__.setdefault("_fit_runners", {})
    except (AttributeError, TypeError):
        cache = _RUNNERS.setdefault(tuner, {})
    key = ("tail", batch_size, outer_batch_size, tail)
    if key not in cache:

        def run(state, inner_data, outer_data):
            inner, _ = tuner.sample_batches(
                state, inner_data, outer_data, batch_size, outer_batch_size
            )
            inner = jax.tree.map(lambda a: a[:tail] if a.shape[0] > 1 else a, inner)
            return tuner.warmup(state, inner, steps=tail)[0]

        cache[key] = jax.jit(run)
    return cache[key]


def _progress_bar(total: int, initial: int, desc: str, disable: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar
        disable = True
    if disable:
        return _NoBar()
    return tqdm(total=total, initial=initial, desc=desc, leave=True)


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


METRICS_FILE = "metrics.jsonl"
_TB_MAX_ELEMENTS = 64  # vector metrics up to this size are written element by element


class _Logger:
    """Per-step metrics to ``log_dir/metrics.jsonl`` (and TensorBoard scalars, optionally)."""

    def __init__(self, directory: Path, tensorboard: bool, resumed: dict[str, np.ndarray]):
        self.writer = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                raise ImportError(
                    "tensorboard=True needs the optional tensorboardX package: "
                    "pip install tensorboardX (or pass tensorboard=False)"
                ) from None
            self.writer = SummaryWriter(str(directory))
        directory.mkdir(parents=True, exist_ok=True)
        # A resumed run rewrites the file from the restored history; a fresh one appends.
        self.file = (directory / METRICS_FILE).open("w" if resumed else "a")
        if resumed:
            self.write(resumed, tensorboard=False)

    def write(self, rows: dict[str, np.ndarray], tensorboard: bool = True) -> None:
        import json

        for i in range(len(rows["step"])):
            record = {"step": int(rows["step"][i])}
            for name, values in rows.items():
                if name != "step":
                    record[name] = _json_value(values[i])
            self.file.write(json.dumps(record) + "\n")
            if self.writer is not None and tensorboard:
                self._scalars(record)
        self.file.flush()

    def _scalars(self, record: dict) -> None:
        step = record["step"]
        for name, value in record.items():
            if name == "step":
                continue
            flat = np.ravel(np.asarray(value, dtype=float))
            if flat.size == 1:
                self.writer.add_scalar(name, float(flat[0]), step)
            elif flat.size <= _TB_MAX_ELEMENTS:
                for j, v in enumerate(flat):
                    self.writer.add_scalar(f"{name}/{j}", float(v), step)
        self.writer.flush()

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def _json_value(value: np.ndarray):
    """A JSON-safe value: non-finite floats as strings ("nan", "inf"), arrays as lists."""
    value = np.asarray(value)
    if value.dtype.kind == "f":
        out = value.astype(float).tolist()
    elif value.dtype.kind in "iub":
        out = value.tolist()
    else:  # e.g. PRNG key data or other exotic dtypes: not a metric to log
        return None

    def fix(v):
        if isinstance(v, list):
            return [fix(x) for x in v]
        if isinstance(v, float) and not np.isfinite(v):
            return str(v)
        return v

    return fix(out)


def _flatten(metrics: PyTree) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(metrics)[0]
    out = {}
    for path, value in flat:
        name = jax.tree_util.keystr(path, simple=True, separator=_SEP)
        out[name or "metrics"] = np.asarray(value)
    return out


def _concat(records: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if not records:
        return {}
    return {k: np.concatenate([r[k] for r in records]) for k in records[-1]}


def _label(state: PyTree, done: int) -> int:
    step = getattr(state, "step", None)
    try:
        return int(np.asarray(step)) if step is not None and np.ndim(step) == 0 else done
    except (TypeError, ValueError):
        return done


def _save(directory: Path, state: PyTree, done: int, records) -> None:
    label = _label(state, done)
    save_checkpoint(directory, state, label)
    history = _concat(records)
    arrays = {k.replace(_SEP, "\x1f"): v for k, v in history.items()}
    arrays[_DONE] = np.asarray(done)
    arrays[_LABEL] = np.asarray(label)
    tmp = directory / (HISTORY_FILE + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, directory / HISTORY_FILE)  # atomic: the history always names a checkpoint


def _resume(directory: Path, like: PyTree):
    if latest_step(directory) is None:
        return None
    path = directory / HISTORY_FILE
    if not path.exists():
        raise ValueError(
            f"{directory} has checkpoints but no {HISTORY_FILE} written by fit, so the steps "
            "already run are unknown; pass resume=False or another checkpoint_dir"
        )
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    done, label = int(arrays.pop(_DONE)), int(arrays.pop(_LABEL))
    state, _ = restore_checkpoint(directory, like=like, step=label)
    history = {k.replace("\x1f", _SEP): v for k, v in arrays.items()}
    return state, done, history
