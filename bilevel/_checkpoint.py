"""Checkpointing of tuner states (any pytree of arrays) with orbax, for runs that resume.

A state saved at step ``k`` and restored gives back the same arrays bit for bit, so a resumed run
ends identical to an uninterrupted one as long as the state holds everything the run depends on
(parameters, optimizer states, hyperparameters, PRNG keys and the data position).
Typed PRNG keys (``jax.random.key``) are stored as their raw key data and rebuilt on restore; the
key implementation is recorded and must match the ``like`` state's.

Nothing is lost silently: saving a step that is not newer than the newest checkpoint is refused
unless ``overwrite=True`` is passed, retention (``keep``) only deletes older steps, restoring never
casts a value to a dtype that cannot hold it, and reading never writes to the directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from solvers import checks

__all__ = ["latest_step", "restore_checkpoint", "save_checkpoint"]

PyTree = Any

_STEP_METADATA = "_CHECKPOINT_METADATA"  # orbax's per-step metadata file (JSON)
_COMMIT_MARKER = "commit_success.txt"
_TRASH = ".bilevel-deleting"  # suffix of a step folder being deleted (not a step name)
_ASIDE = ".bilevel-replaced"  # suffix of a step folder set aside during ``overwrite=True``


def _is_typed_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _key_str(key: Any) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def _path_str(path: tuple) -> str:
    return "/".join(_key_str(k) for k in path) or "<root>"


def _flat(tree: PyTree) -> tuple[list[str], list[Any], Any]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [_path_str(p) for p, _ in leaves], [x for _, x in leaves], treedef


def _to_savable(state: PyTree) -> tuple[PyTree, dict[str, str]]:
    """Numpy copies of the leaves (keys as key data) and ``{path: key impl}`` of the typed keys."""
    paths, leaves, treedef = _flat(state)
    out, keys = [], {}
    for path, x in zip(paths, leaves, strict=True):
        if isinstance(x, jax.core.Tracer):
            raise TypeError(
                f"save_checkpoint: state leaf {path!r} is a traced value; call save_checkpoint "
                "outside jax.jit / jax.grad / jax.vmap, on the concrete state they return"
            )
        if _is_typed_key(x):
            keys[path] = str(jax.random.key_impl(x))
            x = jax.random.key_data(x)
        x = np.asarray(x)
        if x.dtype == object or x.dtype.kind in "USM":
            raise TypeError(
                f"save_checkpoint: state leaf {path!r} has dtype {x.dtype}, which cannot be "
                "checkpointed; keep only numeric arrays (and PRNG keys) in the state"
            )
        out.append(x)
    return jax.tree_util.tree_unflatten(treedef, out), keys


def _step_folders(directory: Path) -> dict[int, Path]:
    """``{step: folder}`` of the complete checkpoints in ``directory`` (foreign entries ignored)."""
    found = {}
    for child in directory.iterdir():
        name = child.name
        if not (name.isdigit() and str(int(name)) == name and child.is_dir()):
            continue
        if (child / _STEP_METADATA).is_file() or (child / _COMMIT_MARKER).is_file():
            found[int(name)] = child
    return found


def _existing_dir(directory: str | os.PathLike, who: str) -> Path:
    path = Path(directory).absolute()
    if not path.exists():
        raise FileNotFoundError(
            f"{who}: checkpoint directory {str(path)!r} does not exist; check the path "
            "(nothing was created there)"
        )
    if not path.is_dir():
        raise FileNotFoundError(
            f"{who}: checkpoint directory {str(path)!r} is a file, not a folder; pass the "
            "folder given to save_checkpoint"
        )
    return path


def _remove(folder: Path) -> None:
    """Delete a folder by first renaming it, so that a crash never leaves half a checkpoint."""
    trash = folder.with_name(folder.name + _TRASH)
    if trash.exists():
        shutil.rmtree(trash)
    folder.rename(trash)
    shutil.rmtree(trash)


def _manager(directory: Path, create: bool):
    import orbax.checkpoint as ocp

    # Retention is done here, not by orbax (which may delete the newest steps).
    options = ocp.CheckpointManagerOptions(max_to_keep=None, create=create)
    return ocp.CheckpointManager(directory, options=options)


def save_checkpoint(
    directory: str | os.PathLike,
    state: PyTree,
    step: int,
    *,
    keep: int | None = 3,
    overwrite: bool = False,
) -> Path:
    """Save ``state`` as checkpoint ``step`` under ``directory`` (keeping the newest ``keep``).

    ``step`` must be newer than every checkpoint already in ``directory``: saving an older or equal
    step raises a ``ValueError`` (it usually means a new run is writing into an old run's folder),
    unless ``overwrite=True``, which deletes the checkpoints at ``step`` and after on purpose
    (once the new one is written) so that the run can restart from an earlier point.

    Args:
      directory: checkpoint folder (created if needed).
      state: pytree of arrays (a tuner's state).
      step: integer label >= 0, usually the outer step (Python, NumPy or concrete JAX integer).
      keep: how many checkpoints to keep, this one included (``None``: all); only older steps
        are ever deleted.
      overwrite: allow ``step`` <= the newest existing step, deleting steps >= ``step``.

    Returns:
      The folder of this checkpoint.

    Example:
      >>> save_checkpoint("/tmp/run", state, step=state.step)  # doctest: +SKIP
    """
    import orbax.checkpoint as ocp

    step = checks.integer("step", step, low=0)
    keep = checks.optional_integer("keep", keep, low=1)
    if not isinstance(overwrite, bool | np.bool_):
        raise TypeError(f"save_checkpoint: overwrite must be True or False, got {overwrite!r}")
    path = Path(directory).absolute()
    if path.exists() and not path.is_dir():
        raise FileNotFoundError(
            f"save_checkpoint: checkpoint directory {str(path)!r} is a file, not a folder; "
            "pass a folder path"
        )
    savable, keys = _to_savable(state)
    folders = _step_folders(path) if path.exists() else {}
    newer = sorted(s for s in folders if s >= step)
    if newer and not overwrite:
        raise ValueError(
            f"save_checkpoint: step {step} is not newer than the latest checkpoint {max(folders)} "
            f"in {str(path)!r}; saving it would leave the newer checkpoints {newer} in place "
            "(latest_step and restore would ignore this one). Use a new directory for a new run, "
            f"pass a step > {max(folders)}, or pass overwrite=True to delete the checkpoints at "
            f"steps {newer} and save this one"
        )
    target = path / str(step)
    if target.exists() and step not in folders:
        raise ValueError(
            f"save_checkpoint: {str(target)!r} exists but is not a complete checkpoint (no "
            f"{_STEP_METADATA}); move or delete it, or save under another step"
        )
    for leftover in path.glob(f"*{_TRASH}") if path.exists() else ():
        shutil.rmtree(leftover, ignore_errors=True)  # from an interrupted deletion
    aside = None
    if step in folders:  # overwrite=True: set the old checkpoint aside until the new one exists
        aside = target.with_name(target.name + _ASIDE)
        if aside.exists():
            shutil.rmtree(aside)
        target.rename(aside)
    try:
        with _manager(path, create=True) as mngr:
            mngr.save(
                step,
                args=ocp.args.StandardSave(savable),
                force=True,
                custom_metadata={"bilevel": {"prng_keys": keys}},
            )
            mngr.wait_until_finished()
    except BaseException:
        if aside is not None and not target.exists():
            aside.rename(target)
        raise
    if aside is not None:
        shutil.rmtree(aside)
    for s in newer:
        if s != step:
            _remove(folders[s])
    if keep is not None:
        older = sorted(s for s in folders if s < step)
        for s in older[: max(len(older) - (keep - 1), 0)]:
            _remove(folders[s])
    return target


def latest_step(directory: str | os.PathLike) -> int | None:
    """The newest checkpoint step in ``directory``, or ``None`` when there is none.

    Only complete checkpoints count: foreign files and folders, and saves that were interrupted,
    are ignored. Nothing is written; a directory that does not exist gives ``None``.

    Args:
      directory: checkpoint folder.

    Returns:
      The largest saved step, or ``None``.

    Example:
      >>> start = latest_step("/tmp/run")  # doctest: +SKIP
    """
    path = Path(directory).absolute()
    if not path.exists():
        return None
    if not path.is_dir():
        raise FileNotFoundError(
            f"latest_step: checkpoint directory {str(path)!r} is a file, not a folder; pass the "
            "folder given to save_checkpoint"
        )
    folders = _step_folders(path)
    return max(folders) if folders else None


def _saved_keys(folder: Path, where: str) -> dict[str, str] | None:
    """The recorded ``{path: key impl}`` of a step (``None``: saved by an older version)."""
    try:
        meta = json.loads((folder / _STEP_METADATA).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ValueError(
            f"restore_checkpoint: {where} is corrupted: {_STEP_METADATA} is unreadable ({e}); "
            "restore another step or re-save this one"
        ) from e
    if not isinstance(meta, dict):
        raise ValueError(
            f"restore_checkpoint: {where} is corrupted: {_STEP_METADATA} is not a JSON object; "
            "restore another step or re-save this one"
        )
    custom = meta.get("custom_metadata") or {}
    info = custom.get("bilevel") if isinstance(custom, dict) else None
    if not isinstance(info, dict) or not isinstance(info.get("prng_keys"), dict):
        return None
    return info["prng_keys"]


def _lossless_cast(got: np.ndarray, dtype: np.dtype) -> bool:
    """Whether casting ``got`` to ``dtype`` keeps every value (floats may round, not overflow)."""
    src = got.dtype
    if src == dtype:
        return True
    if jnp.issubdtype(src, jnp.complexfloating) and not jnp.issubdtype(dtype, jnp.complexfloating):
        return False
    if jnp.issubdtype(src, jnp.inexact) and not jnp.issubdtype(dtype, jnp.inexact):
        return False
    if jnp.issubdtype(dtype, jnp.bool_) and not jnp.issubdtype(src, jnp.bool_):
        return False
    with np.errstate(all="ignore"):
        cast = got.astype(dtype)
        if jnp.issubdtype(src, jnp.inexact):  # float -> narrower float: rounding, no overflow
            return bool(np.all(np.isfinite(cast) | ~np.isfinite(got)))
        return bool(np.array_equal(cast.astype(src), got))  # integers must fit exactly


def restore_checkpoint(
    directory: str | os.PathLike, like: PyTree, step: int | None = None
) -> tuple[PyTree, int]:
    """Restore a checkpoint into the structure, dtypes and key types of ``like``.

    Leaves are matched by their path (dict keys, attribute names, positions). A leaf may be
    restored into another dtype only when no value changes beyond float rounding: float to int,
    complex to real, or integers that do not fit the requested dtype are refused.

    Args:
      directory: checkpoint folder.
      like: a state of the same structure (e.g. a freshly initialized one).
      step: which checkpoint; the newest when ``None``.

    Returns:
      ``(state, step)``.

    Raises:
      FileNotFoundError: no such directory, no checkpoint there, or no checkpoint ``step``.
      ValueError: the checkpoint does not match ``like`` (keys, shapes, dtypes, PRNG key
        implementations) or is corrupted.

    Example:
      >>> state, step = restore_checkpoint("/tmp/run", like=opt.init(params))  # doctest: +SKIP
    """
    import orbax.checkpoint as ocp

    path = _existing_dir(directory, "restore_checkpoint")
    if step is not None:
        step = checks.integer("step", step, low=0)
    folders = _step_folders(path)
    if not folders:
        raise FileNotFoundError(
            f"restore_checkpoint: no checkpoint in {str(path)!r}; check the path, or start "
            "from a fresh state when latest_step(...) is None"
        )
    if step is None:
        step = max(folders)
    elif step not in folders:
        raise FileNotFoundError(
            f"restore_checkpoint: no checkpoint for step {step} in {str(path)!r}; available "
            f"steps: {sorted(folders)} (or step=None for the newest)"
        )
    where = f"checkpoint step {step} in {str(path)!r}"
    saved_keys = _saved_keys(folders[step], where)
    try:
        with _manager(path, create=False) as mngr:
            restored = mngr.restore(step, args=ocp.args.StandardRestore())
    except Exception as e:
        raise ValueError(
            f"restore_checkpoint: {where} is corrupted or unreadable ({type(e).__name__}: {e}); "
            f"restore another step (available: {sorted(folders)}) or re-save this one"
        ) from e

    got_paths, got_leaves, _ = _flat(restored)
    saved = dict(zip(got_paths, got_leaves, strict=True))
    paths, like_leaves, treedef = _flat(like)
    missing = [p for p in paths if p not in saved]
    known = set(paths)
    unexpected = [p for p in got_paths if p not in known]
    if missing or unexpected:
        raise ValueError(
            f"restore_checkpoint: {where} does not match the structure of `like`: keys missing "
            f"from the checkpoint: {missing}; saved keys not in `like`: {unexpected}. Pass a "
            "`like` built the same way as the saved state"
        )
    out = []
    for p, ref in zip(paths, like_leaves, strict=True):
        got = np.asarray(saved[p])
        typed = _is_typed_key(ref)
        if saved_keys is not None:
            if typed and p not in saved_keys:
                raise ValueError(
                    f"restore_checkpoint: {where}: leaf {p!r} was saved as a plain array "
                    f"(e.g. a legacy uint32 jax.random.PRNGKey) but `like` has a typed "
                    f"{jax.random.key_impl(ref)} key; build `like` with the same kind of key"
                )
            if not typed and p in saved_keys:
                raise ValueError(
                    f"restore_checkpoint: {where}: leaf {p!r} was saved as a typed "
                    f"{saved_keys[p]} key (jax.random.key) but `like` has a "
                    f"{jnp.result_type(ref)} array; build `like` with jax.random.key(..., "
                    f"impl={saved_keys[p]!r})"
                )
            if typed and saved_keys[p] != str(jax.random.key_impl(ref)):
                raise ValueError(
                    f"restore_checkpoint: {where}: leaf {p!r} is a {saved_keys[p]} PRNG key "
                    f"but `like` has a {jax.random.key_impl(ref)} key; build `like` with "
                    f"jax.random.key(..., impl={saved_keys[p]!r})"
                )
        ref_data = jax.random.key_data(ref) if typed else ref
        want_shape, want = np.shape(ref_data), np.dtype(jnp.result_type(ref_data))
        if got.shape != want_shape:
            kind = "PRNG key data" if typed else "leaf"
            raise ValueError(
                f"restore_checkpoint: {where}: {kind} {p!r} has shape {got.shape} but `like` "
                f"has {want_shape}; pass a `like` of the saved shapes"
            )
        if typed:
            if got.dtype != want:
                raise ValueError(
                    f"restore_checkpoint: {where}: PRNG key {p!r} was saved with key data of "
                    f"dtype {got.dtype}, `like`'s key has {want}; build `like` with the same key"
                )
            out.append(jax.random.wrap_key_data(jnp.asarray(got), impl=jax.random.key_impl(ref)))
            continue
        if not _lossless_cast(got, want):
            x64 = "" if want == np.result_type(ref) else " and enable jax_enable_x64"
            raise ValueError(
                f"restore_checkpoint: {where}: leaf {p!r} was saved as {got.dtype} and cannot be "
                f"restored as {want} without changing its values; give that leaf dtype "
                f"{got.dtype} (or a wider one) in `like`{x64}"
            )
        out.append(jnp.asarray(got, dtype=want))
    return jax.tree_util.tree_unflatten(treedef, out), int(step)
