"""Small helpers for training loops: deterministic minibatches and pure NNX apply functions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from solvers import checks

PyTree = Any


def minibatches(
    data: PyTree, key: jax.Array, step: jax.Array | int, batch_size: int, num: int
) -> PyTree:
    """``num`` minibatches of ``batch_size`` rows drawn from ``data`` for outer step ``step``.

    A pure function of ``(key, step)``: a run that stores ``key`` and ``step`` in its state (as
    :class:`bilevel.BilevelState` does) replays the same data order after a restore. Rows are
    drawn without replacement within one call when ``num * batch_size <= N``, otherwise each
    minibatch is drawn without replacement independently.

    Args:
      data: pytree of arrays with a common leading axis ``N``.
      key: PRNG key of the run.
      step: outer step counter (int or int32 array).
      batch_size: rows per minibatch (``<= N``).
      num: number of minibatches (e.g. ``inner_steps``).

    Returns:
      ``data`` with each leaf shaped ``(num, batch_size, ...)``.

    Example:
      >>> import jax, jax.numpy as jnp, bilevel
      >>> xs = bilevel.minibatches({"x": jnp.arange(10.0)}, jax.random.PRNGKey(0), 3, 4, 2)
      >>> xs["x"].shape
      (2, 4)
    """
    leaves = jax.tree.leaves(data)
    if not leaves:
        raise ValueError("data is empty")
    n = jnp.shape(leaves[0])[0]
    if any(jnp.ndim(a) == 0 or jnp.shape(a)[0] != n for a in leaves):
        raise ValueError(
            f"every leaf of data needs the same leading axis; got {jax.tree.map(jnp.shape, data)}"
        )
    batch_size = checks.integer("batch_size", batch_size)
    num = checks.integer("num", num)
    if batch_size > n:
        raise ValueError(f"batch_size={batch_size} exceeds the {n} rows of data")
    k = jax.random.fold_in(key, step)
    if num * batch_size <= n:
        idx = jax.random.permutation(k, n)[: num * batch_size].reshape(num, batch_size)
    else:
        keys = jax.random.split(k, num)
        idx = jax.vmap(lambda kk: jax.random.permutation(kk, n)[:batch_size])(keys)
    return jax.tree.map(lambda a: a[idx], data)


def nnx_apply_fn(
    model: nnx.Module, wrt: Any = nnx.Param, rng_stream: str = "dropout"
) -> tuple[Callable, PyTree]:
    """Split a Flax NNX model into a pure ``apply_fn(params, *args, key=None, **kw)`` and params.

        ``nnx.split(model, wrt, ...)`` separates the trainable parameters from the rest (batch
        statistics, RNG streams, ...). ``apply_fn`` merges them back into a fresh copy each call, so
        it is a pure function of ``params``: differentiate it, ``jit`` it, ``vmap`` it over a
        population. ``key`` reseeds the ``rng_stream`` (dropout) stream for this call. Changes the
        model makes to non-parameter state during the call (e.g. BatchNorm running averages) are
        discarded; call ``model.eval()`` before splitting to get an evaluation-mode function.

        Args:
          model: an ``nnx.Module``.
          wrt: filter selecting the parameters (default ``nnx.Param``).
          rng_stream: name of the RNG stream that ``key`` reseeds.

        Returns:
          ``(apply_fn, params)``; ``params`` is an ``nnx.State`` (a pytree).

        Example:
          >>> import jax, jax.numpy as jnp, bilevel
          >>> from flax import nnx

    from solvers import checks
          >>> apply_fn, params = bilevel.nnx_apply_fn(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
          >>> apply_fn(params, jnp.ones((5, 3))).shape
          (5, 2)
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be a flax.nnx.Module, got {type(model).__name__}")
    graphdef, params, rest = nnx.split(model, wrt, ...)

    def apply_fn(params, *args, key=None, **kwargs):
        m = nnx.merge(graphdef, params, rest, copy=True)
        if key is not None:
            nnx.reseed(m, **{rng_stream: key})
        return m(*args, **kwargs)

    return apply_fn, params
