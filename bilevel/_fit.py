"""One training loop for every tuner: chunked jitted steps, history, callbacks, checkpoints.

:func:`fit` drives any *tuner* with

- ``sample_batches(state, inner_data, outer_data, batch_size, outer_batch_size)`` - the batches of
  the next step, a pure function of ``state.key`` and ``state.step`` (so a resumed run replays the
  same data);
- ``step(state, inner_batches, outer_batches) -> (state, metrics)`` - ``metrics`` a dict (nested
  dicts allowed) of arrays;
- ``warmup(state, inner_batches) -> (state, metrics)`` - only when ``warmup_steps > 0``.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from bilevel._checkpoint import latest_step, restore_checkpoint, save_checkpoint
from solvers import checks

__all__ = ["fit"]

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
    steps: int,
    batch_size: int,
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
    """Run ``warmup_steps`` warm-up steps then ``steps`` steps of ``tuner``, recording metrics.

    Batches come from ``tuner.sample_batches``; ``chunk`` steps run per jitted call (a
    ``lax.scan`` of sample + step), compiled once per ``(batch_size, outer_batch_size, chunk)``
    and cached on the tuner, so a second ``fit`` does not retrace. One progress bar covers the
    whole run (warm-up included) and advances per chunk.

    Args:
      tuner: an object with ``sample_batches``, ``step`` (and ``warmup``), see the module.
      state: the tuner's state to start from (also the template of a resumed checkpoint).
      inner_data: the training set, a pytree of arrays with a leading example axis.
      outer_data: the validation set, likewise.
      steps: tuning steps to run (``>= 0``).
      batch_size: examples per inner batch.
      outer_batch_size: examples per outer batch (default ``batch_size``).
      warmup_steps: ``tuner.warmup`` steps before tuning (not in the history).
      chunk: steps per jitted call; callbacks and checkpoints happen at chunk boundaries.
      callbacks: ``cb(step, state, metrics)`` (or a sequence of them) called after each tuning
        chunk, ``step`` the tuner's ``state.step`` and ``metrics`` the chunk's last step's metrics
        (NumPy); returning ``True`` stops the run early.
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
      row per tuning step.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from flax import nnx
      >>> from bilevel import hparams, stn
      >>> from bilevel._fit import fit
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
    steps = checks.integer("steps", steps, low=0)
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
    needs = ["sample_batches", "step"] + (["warmup"] if warmup_steps else [])
    missing = [m for m in needs if not callable(getattr(tuner, m, None))]
    if missing:
        raise TypeError(
            f"fit needs a tuner with {', '.join(needs)}; {type(tuner).__name__} lacks "
            f"{', '.join(missing)}"
        )

    total = warmup_steps + steps
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
    try:
        while done < total:
            warm = done < warmup_steps
            n = min(chunk, (warmup_steps if warm else total) - done)
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
    return state, _concat(records)


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
