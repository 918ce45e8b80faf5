"""Pytree helpers shared by `solvers` and `bilevel` (public: ``solvers.tree``)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def tree_vdot(x: PyTree, y: PyTree) -> jax.Array:
    """Sum over leaves of <x_i, y_i> (real inner product)."""
    parts = [jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True)]
    return sum(parts) if parts else jnp.zeros(())


def tree_norm(x: PyTree) -> jax.Array:
    """Euclidean norm over all leaves."""
    return jnp.sqrt(tree_vdot(x, x))


def tree_add_scaled(x: PyTree, alpha: jax.Array, y: PyTree) -> PyTree:
    """x + alpha * y, leaf by leaf (``alpha`` is cast to each leaf's dtype)."""
    return jax.tree.map(lambda a, b: a + jnp.asarray(alpha, a.dtype) * b, x, y)


def tree_scale(alpha: jax.Array, x: PyTree) -> PyTree:
    return jax.tree.map(lambda a: jnp.asarray(alpha, a.dtype) * a, x)


def tree_sub(x: PyTree, y: PyTree) -> PyTree:
    return jax.tree.map(jnp.subtract, x, y)


def tree_neg(x: PyTree) -> PyTree:
    return jax.tree.map(jnp.negative, x)


def tree_zeros_like(x: PyTree) -> PyTree:
    return jax.tree.map(jnp.zeros_like, x)


def tree_all_finite(x: PyTree) -> jax.Array:
    """True when every floating leaf is free of NaN and inf (integer, bool and key leaves pass)."""
    leaves = [
        jnp.all(jnp.isfinite(a))
        for a in jax.tree.leaves(x)
        if jnp.issubdtype(jnp.result_type(a), jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def tree_size(x: PyTree) -> int:
    return sum(int(a.size) for a in jax.tree.leaves(x))


def tree_select(pred: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
    """Leaf-wise ``where(pred, on_true, on_false)`` with a scalar predicate."""
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def result_dtype(x: PyTree) -> jnp.dtype:
    """The widest floating dtype among the leaves (float32 at least)."""
    dtypes = [a.dtype for a in jax.tree.leaves(x) if jnp.issubdtype(a.dtype, jnp.inexact)]
    return jnp.result_type(jnp.float32, *dtypes) if dtypes else jnp.dtype(jnp.float32)


def describe(x: PyTree) -> str:
    """A short description of a pytree's structure and leaf shapes, for error messages."""
    shapes = jax.tree.map(lambda a: f"{jnp.result_type(a).name}{list(np.shape(a))}", x)
    return str(shapes)


def check_same_structure(expected: PyTree, got: PyTree, what: str) -> None:
    """Raise ``ValueError`` unless ``got`` has the tree structure and leaf shapes of ``expected``."""
    if jax.tree.structure(expected) != jax.tree.structure(got):
        raise ValueError(
            f"{what}: pytree structure mismatch: expected {jax.tree.structure(expected)}, "
            f"got {jax.tree.structure(got)}"
        )
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
        if jnp.shape(a) != jnp.shape(b):
            raise ValueError(
                f"{what}: leaf shape mismatch: expected {describe(expected)}, got {describe(got)}"
            )


def is_concrete(x: PyTree) -> bool:
    """True when no leaf is a tracer (the values can be inspected in Python)."""
    return not any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(x))
