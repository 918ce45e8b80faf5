"""Outer (hyperparameter) optimizers as Optax transformations."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from solvers import checks
from solvers import tree as T

__all__ = ["NormalizedMomentumState", "normalized_momentum"]


class NormalizedMomentumState(NamedTuple):
    """State of :func:`normalized_momentum`: the momentum ``m`` and the step count."""

    momentum: Any
    count: jax.Array


def normalized_momentum(
    learning_rate: float | optax.Schedule, beta: float = 0.9, eps: float = 1e-12
) -> optax.GradientTransformation:
    r"""Normalized momentum: a step of fixed length ``learning_rate`` along the momentum.

    .. math:: m_t = \beta\, m_{t-1} + (1 - \beta)\, g_t, \qquad
       x_{t+1} = x_t - \eta_t \frac{m_t}{\lVert m_t \rVert}

    with the global norm over the whole pytree (so the relative sizes of the coordinates are
    kept: hyperparameters whose hypergradients differ in size move by different amounts, unlike
    under Adam's per-coordinate normalization). The step length does not depend on the scale of
    the gradient, which makes it robust where the smoothness grows with the gradient norm (the
    upper-level update of BO-REP). A zero momentum gives a zero update (``||m||`` is floored at
    ``eps``).

    Args:
      learning_rate: the step length ``eta`` (a float or an Optax schedule of the step count).
      beta: momentum coefficient in ``[0, 1)``.
      eps: floor of ``||m||``.

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import jax.numpy as jnp, optax, bilevel
      >>> tx = bilevel.normalized_momentum(0.1, beta=0.0)
      >>> updates, _ = tx.update({"a": jnp.array([3.0]), "b": jnp.array([4.0])},
      ...                        tx.init({"a": jnp.zeros(1), "b": jnp.zeros(1)}))
      >>> [round(float(u[0]), 3) for u in updates.values()]
      [-0.06, -0.08]

    Reference: Cutkosky & Mehta, "Momentum improves normalized SGD", ICML 2020; used for the
    upper variable by Hao, Gong & Liu, "Bilevel optimization under unbounded smoothness"
    (BO-REP), ICLR 2024.
    """
    if not callable(learning_rate):
        learning_rate = checks.number("learning_rate", learning_rate, low=0.0, low_open=True)
    beta = checks.number("beta", beta, low=0.0, high=1.0, high_open=True)
    eps = checks.number("eps", eps, low=0.0, low_open=True)

    def init_fn(params):
        return NormalizedMomentumState(T.tree_zeros_like(params), jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        m = jax.tree.map(lambda m, g: beta * m + (1.0 - beta) * g, state.momentum, updates)
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        scale = -lr / jnp.maximum(T.tree_norm(m), eps)
        new = jax.tree.map(lambda v: (scale * v).astype(v.dtype), m)
        return new, NormalizedMomentumState(m, optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)
