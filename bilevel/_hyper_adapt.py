"""Online adaptation of any injected Optax hyperparameter by one-step hypergradients.

Chandra, Xie, Ragan-Kelley and Meijer, "Gradient Descent: The Ultimate Optimizer", NeurIPS 2022,
https://arxiv.org/abs/1909.13371 (generalizing Baydin et al. 2018 to every hyperparameter).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import solvers
from bilevel._hd import _check_bounds, _check_nonnegative, _concrete, _zero_sum

__all__ = ["PROBABILITY_HYPERPARAMS", "HyperAdaptState", "hyper_adapt"]

#: Hyperparameter names kept positive: at least ``finfo(dtype).tiny`` (and within their bounds).
POSITIVE_HYPERPARAMS = frozenset({"learning_rate"})

#: Hyperparameter names treated as probabilities: kept in ``[eps, 1 - eps]`` (strictly inside
#: (0, 1)), with ``eps = max(1e-6, finfo(dtype).eps)``.
PROBABILITY_HYPERPARAMS = frozenset({"b1", "b2", "b3", "momentum", "decay"})

_INJECT_STATES = (optax.InjectStatefulHyperparamsState, optax.InjectHyperparamsState)


class HyperAdaptState(NamedTuple):
    """State of :func:`hyper_adapt`.

    Attributes:
      count: number of ``update`` calls, int32 (saturates instead of overflowing).
      inner_state: the state of the wrapped ``inject_hyperparams`` transformation; the current
        hyperparameter values are ``inner_state.hyperparams[name]``.
      tangents: a tuple with, for each adapted name in the order of ``hyper_lr``, the derivative
        of the previous update with respect to that hyperparameter,
        :math:`\\partial u_{t-1} / \\partial h` (a pytree like the updates). A tuple rather than
        a dict, so that ``optax.tree_utils.tree_get(state, name)`` finds only the hyperparameter.
      skipped: number of steps not applied because something they produced (gradient,
        ``hyper_grads``, new hyperparameters, new inner state, update) was not finite, int32,
        saturating; such a step returned a zero update and kept the whole previous state.
    """

    count: jax.Array
    inner_state: Any
    tangents: tuple[optax.Updates, ...]
    skipped: jax.Array


def _probability_margin(dtype) -> float:
    return max(1e-6, float(jnp.finfo(dtype).eps))


def _check_inner_state(state: Any, names: tuple[str, ...], where: str) -> None:
    """Structural checks of the inner ``inject_hyperparams`` state (names, schedules, dtypes)."""
    if not isinstance(state, _INJECT_STATES):
        raise TypeError(
            "inner must be created by optax.inject_hyperparams(...)(...); its state is "
            f"{type(state).__name__} ({where})"
        )
    available = sorted(state.hyperparams)
    missing = [n for n in names if n not in state.hyperparams]
    if missing:
        raise ValueError(
            f"hyper_lr names {missing} are not hyperparameters of the inner transformation; "
            f"it has {available}"
        )
    scheduled = [n for n in names if n in getattr(state, "hyperparams_states", {})]
    if scheduled:
        raise ValueError(
            f"hyperparameters {scheduled} are schedules in the inner transformation and cannot "
            "be adapted; pass them as numbers"
        )
    for name in names:
        value = state.hyperparams[name]
        if not jnp.issubdtype(jnp.asarray(value).dtype, jnp.floating):
            raise TypeError(
                f"hyperparameter {name!r} has dtype {jnp.asarray(value).dtype}; pass a float "
                "to inject_hyperparams to adapt it"
            )
        if jnp.shape(value) != ():
            raise ValueError(f"hyperparameter {name!r} must be a scalar, got {jnp.shape(value)}")


def _check_inner_values(state: Any, names, bounds: Mapping[str, Any]) -> None:
    """Value checks on concrete (non-traced) initial hyperparameters."""
    for name in names:
        value = _concrete(state.hyperparams[name])
        if value is None:
            continue
        value = float(value)
        if name in PROBABILITY_HYPERPARAMS and not 0.0 < value < 1.0:
            raise ValueError(f"{name} is a probability and must lie in (0, 1), got {value}")
        lo, hi = bounds.get(name) or (None, None)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ValueError(f"initial {name}={value} lies outside its bounds {bounds[name]}")


def hyper_adapt(
    inner: optax.GradientTransformation,
    hyper_lr: Mapping[str, float],
    bounds: Mapping[str, tuple[float | None, float | None]] | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Adapt any numeric hyperparameter of an injected Optax optimizer by one-step hypergradients.

    For every adapted hyperparameter :math:`h` with step size :math:`\beta_h`, with gradient
    :math:`g_t` and the previous update :math:`u_{t-1}(h)` (so that
    :math:`\theta_t = \theta_{t-1} + u_{t-1}`):

    .. math::

      h_t = \Pi\Big(h_{t-1} - \beta_h \Big\langle g_t,
        \frac{\partial u_{t-1}}{\partial h}\Big\rangle\Big),
      \qquad u_t = \mathrm{inner}(g_t;\ h_t),

    where :math:`\partial u_{t-1}/\partial h` is the derivative of the inner update with respect
    to :math:`h` alone, holding the inner optimizer state of the previous step fixed. It is
    computed by forward mode (``jax.jvp``, batched over hyperparameters with ``jax.vmap``), never
    by a hand-written formula, so any optimizer built with :func:`optax.inject_hyperparams`
    works. :math:`\Pi` projects probabilities (``b1``, ``b2``, ``b3``, ``momentum``, ``decay``)
    onto :math:`[\epsilon, 1-\epsilon]` with :math:`\epsilon = \max(10^{-6},
    \text{finfo.eps})`, and clips the others to ``bounds``. For ``learning_rate`` of
    ``optax.sgd`` this is exactly :func:`bilevel.hd_sgd`.

    ``learning_rate`` is also kept at least ``jnp.finfo(dtype).tiny``, so it never becomes zero
    or negative (as in :func:`bilevel.hd_sgd`).

    ``update(grads, state, params, hyper_grads=val_grads)`` uses the gradient of a held-out loss
    in place of :math:`g_t` (online validation hypergradient). A step is applied only when the
    gradient, ``hyper_grads``, the new hyperparameters, the new inner state (e.g. Adam's moments)
    and the update are finite (:func:`solvers.guard`, with the flag fused into the passes that
    compute them); otherwise the update is zero, the whole previous state (hyperparameters,
    inner moments, stored derivatives) is kept and ``state.skipped`` increments, so the next
    finite step continues as if the bad one never happened. Entries of a derivative that forward
    mode finds non-finite at an otherwise finite step are 0/0 at a singular point where the
    update does not depend on :math:`h` (e.g. :math:`\\partial\\sqrt{v}/\\partial b_2` at
    :math:`v = 0`) and are stored as 0.

    The current values live in the injected state: ``state.inner_state.hyperparams["b1"]``;
    ``optax.tree_utils.tree_get(state, "b1")`` finds them too, as long as no other part of the
    state has a field of that name (an inner :func:`bilevel.hd_adam` has its own
    ``learning_rate`` field: index ``hyperparams`` then).

    Args:
      inner: an ``optax.inject_hyperparams(factory)(...)`` transformation. The adapted
        hyperparameters must be passed to it as floats (not schedules).
      hyper_lr: maps hyperparameter names (``"learning_rate"``, ``"b1"``, ``"momentum"``,
        ``"weight_decay"``, ...) to their hypergradient step sizes :math:`\beta_h \ge 0`
        (Python, NumPy or JAX scalars).
      bounds: maps names to ``(lo, hi)`` clipping intervals (either end may be ``None``); for
        probabilities they are intersected with :math:`[\epsilon, 1-\epsilon]`.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs` whose state is a
      :class:`HyperAdaptState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, bilevel
      >>> inner = optax.inject_hyperparams(optax.sgd)(learning_rate=1e-2, momentum=0.5)
      >>> tx = bilevel.hyper_adapt(inner, {"learning_rate": 1e-3, "momentum": 1e-3})
      >>> w = jnp.zeros(3)
      >>> state = tx.init(w)
      >>> for _ in range(20):
      ...     updates, state = tx.update(2 * (w - 1.0), state, w)
      ...     w = optax.apply_updates(w, updates)
      >>> print(state.inner_state.hyperparams["learning_rate"] > 1e-2)
      True

    References:
      Chandra et al., `Gradient Descent: The Ultimate Optimizer
      <https://arxiv.org/abs/1909.13371>`_, NeurIPS 2022; Baydin et al., `Online Learning Rate
      Adaptation with Hypergradient Descent <https://arxiv.org/abs/1703.04782>`_, ICLR 2018.
    """
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(
            "inner must be an optax.inject_hyperparams(...)(...) transformation, got "
            f"{type(inner).__name__}"
        )
    if not isinstance(hyper_lr, Mapping) or not hyper_lr:
        raise TypeError(
            "hyper_lr must be a non-empty mapping from hyperparameter names to step sizes"
        )
    names = tuple(hyper_lr)
    for name, beta in hyper_lr.items():
        if not isinstance(name, str):
            raise TypeError(f"hyper_lr keys must be strings, got {name!r}")
        _check_nonnegative(f"hyper_lr[{name!r}]", beta)
    bounds = dict(bounds or {})
    for name in bounds:
        if name not in hyper_lr:
            raise ValueError(f"bounds names {name!r}, which is not adapted (not in hyper_lr)")
        bounds[name] = _check_bounds(f"bounds[{name!r}]", bounds[name])
    for name in names:
        if name in PROBABILITY_HYPERPARAMS and name in bounds:
            lo, hi = bounds[name]
            if (lo is not None and lo >= 1) or (hi is not None and hi <= 0):
                raise ValueError(f"bounds for probability {name!r} must intersect (0, 1)")

    # Static checks as early as possible: the injected state's structure does not depend on the
    # parameters' shapes, so probe it with a scalar. Some inner optimizers cannot initialize on a
    # scalar; init() repeats every check on the real parameters.
    try:
        probe = inner.init(jnp.zeros((), jnp.float32))
    except Exception:  # any failure here only defers the checks to init()
        probe = None
    if probe is not None:
        _check_inner_state(probe, names, "found when building hyper_adapt")
        _check_inner_values(probe, names, bounds)

    def project(name: str, value: jax.Array) -> jax.Array:
        lo, hi = bounds.get(name) or (None, None)
        if name in PROBABILITY_HYPERPARAMS:
            margin = _probability_margin(value.dtype)
            lo = margin if lo is None else max(lo, margin)
            hi = 1.0 - margin if hi is None else min(hi, 1.0 - margin)
        if name in POSITIVE_HYPERPARAMS:
            floor = float(jnp.finfo(value.dtype).tiny)
            lo = floor if lo is None else max(lo, floor)
        if lo is None and hi is None:
            return value
        return jnp.clip(value, lo, hi).astype(value.dtype)

    def init_fn(params):
        inner_state = inner.init(params)
        _check_inner_state(inner_state, names, "found in init")
        _check_inner_values(inner_state, names, bounds)
        return HyperAdaptState(
            count=jnp.zeros([], jnp.int32),
            inner_state=inner_state,
            tangents=tuple(optax.tree.zeros_like(params) for _ in names),
            skipped=jnp.zeros([], jnp.int32),
        )

    def update_fn(updates, state, params=None, *, hyper_grads=None, **extra_args):
        grads = updates
        source = grads if hyper_grads is None else hyper_grads
        hparams = state.inner_state.hyperparams

        # h_t = h_{t-1} - beta_h <g_t, du_{t-1}/dh>: one fused pass over the gradient for all
        # names. The stored tangents are finite, so the inner products are finite exactly when
        # the gradient is; 0 * g adds the training gradient when hyper_grads replaces it.
        dtypes = [hparams[n].dtype for n in names]
        dots = [jnp.zeros((), dt) for dt in dtypes]
        leaves_t = [jax.tree.leaves(t) for t in state.tangents]
        leaves_g = jax.tree.leaves(grads) if hyper_grads is not None else None
        for i, x in enumerate(jax.tree.leaves(source)):
            for k, dt in enumerate(dtypes):
                term = x.astype(dt) * leaves_t[k][i].astype(dt)
                if k == 0 and leaves_g is not None:
                    term = term + 0 * leaves_g[i].astype(dt)
                dots[k] = dots[k] + jnp.sum(term)
        candidate = {}
        for name, dot in zip(names, dots, strict=True):
            h = hparams[name]
            beta = jnp.asarray(hyper_lr[name], h.dtype)
            candidate[name] = project(name, h - beta * dot)
        base_state = state.inner_state._replace(hyperparams={**hparams, **candidate})

        def inner_update(h):
            inner_state = base_state._replace(hyperparams={**base_state.hyperparams, **h})
            return inner.update(grads, inner_state, params, **extra_args)

        # u_t and du_t/dh for every adapted h, with the previous inner state held fixed.
        if len(names) == 1:
            (name,) = names
            one = {name: jnp.ones_like(candidate[name])}
            new_updates, tangent, inner_state = jax.jvp(
                inner_update, (candidate,), (one,), has_aux=True
            )
            tangents = (tangent,)
        else:
            dtype = jnp.result_type(*candidate.values())
            eye = jnp.eye(len(names), dtype=dtype)
            basis = {n: eye[i].astype(candidate[n].dtype) for i, n in enumerate(names)}

            def push(t):
                return jax.jvp(inner_update, (candidate,), (t,), has_aux=True)

            new_updates, batched, inner_state = jax.vmap(push, out_axes=(None, 0, None))(basis)
            tangents = tuple(jax.tree.map(lambda x, i=i: x[i], batched) for i in range(len(names)))

        # Forward mode gives 0/0 where the update does not depend on h at a singular point
        # (e.g. d sqrt(v) / d b2 at v = 0 for a coordinate whose gradients were all 0): use 0.
        tangents = tuple(
            jax.tree.map(
                lambda t, old: jnp.where(jnp.isfinite(t), t, 0).astype(old.dtype), new, ref
            )
            for new, ref in zip(tangents, state.tangents, strict=True)
        )
        # The step applies only if the gradient(s), the new hyperparameters (inside the new
        # inner state) and the update are finite; the flags are fused into existing passes.
        flag_dtype = jnp.result_type(*dtypes)
        total = sum(d.astype(flag_dtype) for d in dots)
        total = total + _zero_sum(inner_state, flag_dtype) + _zero_sum(new_updates, flag_dtype)
        guarded = solvers.guard(
            (state.inner_state, state.tangents),
            (inner_state, tangents),
            state.skipped,
            finite=jnp.isfinite(total),
        )
        inner_state, tangents = guarded.value
        ok = guarded.applied
        new_updates = jax.tree.map(lambda u: jnp.where(ok, u, 0).astype(u.dtype), new_updates)
        return new_updates, HyperAdaptState(
            count=optax.safe_increment(state.count),
            inner_state=inner_state,
            tangents=tangents,
            skipped=guarded.skipped,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
