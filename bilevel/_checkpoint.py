"""Checkpointing of tuner states (any pytree of arrays) with orbax, for runs that resume.

A state saved at step ``k`` and restored gives back the same arrays bit for bit, so a resumed run
ends identical to an uninterrupted one as long as the state holds everything the run depends on
(parameters, optimizer states, hyperparameters, PRNG keys and the data position).
Typed PRNG keys (``jax.random.key``) are stored as their raw key data and rebuilt on restore.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

__all__ = ["latest_step", "restore_checkpoint", "save_checkpoint"]

PyTree = Any


def _is_typed_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_savable(state: PyTree) -> PyTree:
    return jax.tree.map(
        lambda x: np.asarray(jax.random.key_data(x)) if _is_typed_key(x) else np.asarray(x), state
    )


def _manager(directory: str | os.PathLike, keep: int | None = None):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def save_checkpoint(
    directory: str | os.PathLike, state: PyTree, step: int, *, keep: int | None = 3
) -> Path:
    """Save ``state`` as checkpoint ``step`` under ``directory`` (keeping the newest ``keep``).

    Args:
      directory: checkpoint folder (created if needed).
      state: pytree of arrays (a tuner's state).
      step: integer label, usually the outer step.
      keep: how many checkpoints to keep (``None``: all).

    Returns:
      The folder of this checkpoint.
    """
    import orbax.checkpoint as ocp

    if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    with _manager(directory, keep) as mngr:
        mngr.save(int(step), args=ocp.args.StandardSave(_to_savable(state)), force=True)
        mngr.wait_until_finished()
    return Path(directory).absolute() / str(int(step))


def latest_step(directory: str | os.PathLike) -> int | None:
    """The newest checkpoint step in ``directory``, or ``None`` when there is none."""
    if not Path(directory).exists():
        return None
    with _manager(directory) as mngr:
        return mngr.latest_step()


def restore_checkpoint(
    directory: str | os.PathLike, like: PyTree, step: int | None = None
) -> tuple[PyTree, int]:
    """Restore a checkpoint into the structure, dtypes and key types of ``like``.

    Args:
      directory: checkpoint folder.
      like: a state of the same structure (e.g. a freshly initialized one).
      step: which checkpoint; the newest when ``None``.

    Returns:
      ``(state, step)``.

    Raises:
      FileNotFoundError: no checkpoint there.
      ValueError: the checkpoint does not match ``like``'s structure or shapes.
    """
    import orbax.checkpoint as ocp

    with _manager(directory) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        template = _to_savable(like)
        restored = mngr.restore(step, args=ocp.args.StandardRestore(template))
    like_leaves, treedef = jax.tree.flatten(like)
    try:
        got_leaves = treedef.flatten_up_to(restored)
    except (ValueError, TypeError) as e:
        raise ValueError(f"checkpoint {step} in {directory} does not match the state: {e}") from e
    out = []
    for ref, got in zip(like_leaves, got_leaves, strict=True):
        if _is_typed_key(ref):
            out.append(
                jax.random.wrap_key_data(jax.numpy.asarray(got), impl=jax.random.key_impl(ref))
            )
            continue
        got = np.asarray(got)
        if got.shape != np.shape(ref):
            raise ValueError(
                f"checkpoint {step} in {directory}: leaf shape {got.shape} does not "
                f"match the state's {np.shape(ref)}"
            )
        out.append(jax.numpy.asarray(got, dtype=jax.numpy.result_type(ref)))
    return jax.tree.unflatten(treedef, out), int(step)
