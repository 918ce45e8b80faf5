"""Outer (hyperparameter) optimizers as Optax transformations."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from solvers import checks
from solvers import tree as T

__all__ = ["GroupAdamState", "NormalizedMomentumState", "group_adam", "normalized_momentum"]


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


class GroupAdamState(NamedTuple):
    """State of :func:`group_adam`.

    Attributes:
      count: steps taken (int32, saturating).
      mu: first moment ``m``, shaped like the hyperparameters.
      nu: second moment ``s_G``: one scalar per leaf (group) of the hyperparameter pytree.
    """

    count: jax.Array
    mu: Any
    nu: Any


def group_adam(
    learning_rate: float | optax.Schedule = 0.1,
    b1: float = 0.9,
    b2: float = 0.99,
    eps: float = 1e-12,
    max_step: float | None = 3.0,
) -> optax.GradientTransformation:
    r"""Adam with one second moment per leaf: hyperparameters of a group move by their own sizes.

    Each leaf ``G`` of the (unconstrained) hyperparameter pytree is a group, e.g. the per-layer
    weight decays ``space["wd"]`` form one, the learning rate another. With ``g_t`` the
    hypergradient,

    .. math::

      m_t = b_1 m_{t-1} + (1 - b_1) g_t, \qquad
      s^G_t = b_2 s^G_{t-1} + (1 - b_2) \frac{1}{|G|} \sum_{i \in G} g_{t,i}^2,

      \Delta u_i = -\eta_t\, \mathrm{clip}\Big(\frac{\hat m_{t,i}}{\sqrt{\hat s^G_t} + \epsilon},
      -\tau, \tau\Big), \qquad \hat m_t = \frac{m_t}{1 - b_1^t},\ \hat s_t = \frac{s_t}{1 - b_2^t},

    with ``tau = max_step``. Within a group the steps keep the ratios of the hypergradients, so
    per-layer hyperparameters whose hypergradients differ in size (not only in sign) separate;
    Adam divides each coordinate by its own root mean square and moves every coordinate by about
    ``eta`` whenever the signs agree (the per-layer decays then move in lockstep). Across groups
    the step is scale-free as in Adam: a group whose hypergradients are ``1e6`` times smaller
    moves as far. The clip is a trust region: no coordinate moves by more than
    ``tau * eta`` per step (in the unconstrained space, i.e. a factor ``e^{tau eta}`` for a
    log-scale hyperparameter), which matters for a large group (``|G|`` per-example weights)
    where one coordinate may carry most of the group's norm (its ratio is at most
    ``sqrt(|G|)`` unclipped). A group whose gradient is zero does not move.

    Args:
      learning_rate: the step ``eta`` in the unconstrained space (a float or an Optax schedule of
        the step count). The default 0.1 moves a log-scale hyperparameter by at most a factor
        ``e^{0.3}`` per outer step (``max_step = 3``); it is the step
        ``python -m experiments.hpo_benchmark`` runs with (not swept).
      b1: first-moment decay in ``[0, 1)``.
      b2: second-moment decay in ``[0, 1)``; 0.99 adapts within the few dozen outer steps of
        one training run.
      eps: added to ``sqrt(s)``.
      max_step: ``tau``, the largest normalized step of one coordinate; ``None`` for no clip.

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import jax.numpy as jnp, bilevel
      >>> tx = bilevel.group_adam(0.1)
      >>> g = {"wd": jnp.array([2.0, 1.0, 0.5]), "lr": jnp.array(1e-6)}
      >>> updates, _ = tx.update(g, tx.init(g))
      >>> [round(float(v), 3) for v in updates["wd"]], round(float(updates["lr"]), 3)
      ([-0.151, -0.076, -0.038], -0.1)
    """
    if not callable(learning_rate):
        learning_rate = checks.number("learning_rate", learning_rate, low=0.0, low_open=True)
    b1 = checks.number("b1", b1, low=0.0, high=1.0, high_open=True)
    b2 = checks.number("b2", b2, low=0.0, high=1.0, high_open=True)
    eps = checks.number("eps", eps, low=0.0)
    max_step = checks.optional_number("max_step", max_step, low=0.0, low_open=True)

    def init_fn(params):
        mu = T.tree_zeros_like(params)
        nu = jax.tree.map(lambda p: jnp.zeros((), jnp.result_type(p)), params)
        return GroupAdamState(jnp.zeros((), jnp.int32), mu, nu)

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        mu = jax.tree.map(lambda m, g: b1 * m + (1.0 - b1) * g, state.mu, updates)
        nu = jax.tree.map(
            lambda s, g: b2 * s + (1.0 - b2) * jnp.mean(jnp.square(g)), state.nu, updates
        )
        t = count.astype(jnp.float32)
        c1, c2 = 1.0 - b1**t, 1.0 - b2**t
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate

        def step(m, s):
            r = (m / c1) / (jnp.sqrt(s / c2) + eps)
            r = jnp.where(s > 0, r, 0.0)
            if max_step is not None:
                r = jnp.clip(r, -max_step, max_step)
            return (-lr * r).astype(m.dtype)

        new = jax.tree.map(step, mu, nu)
        return new, GroupAdamState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)
