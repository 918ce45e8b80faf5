"""Hypergradient-descent learning rates as drop-in Optax transformations.

Baydin, Cornish, Martinez Rubio, Schmidt and Wood, "Online Learning Rate Adaptation with
Hypergradient Descent", ICLR 2018, https://arxiv.org/abs/1703.04782: the additive rule
``alpha_t = alpha_{t-1} + beta <g_t, d_{t-1}>`` and the multiplicative rule
``alpha_t = alpha_{t-1} (1 + beta cos(g_t, d_{t-1}))``. :func:`hd_adam` and :func:`hd_sgd`
default to the multiplicative rule with ``beta = DEFAULT_HYPER_LR`` (scale-free, so one value
serves every model and initial rate; ``python -m experiments.hd_optimizers`` sweeps it) and
recompute ``d_{t-1}`` from the optimizer's own moments instead of storing it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import solvers
from solvers import checks

__all__ = [
    "DEFAULT_HYPER_LR",
    "HypergradientLRState",
    "hd_adam",
    "hd_sgd",
    "hypergradient_lr",
]


class HypergradientLRState(NamedTuple):
    r"""State of :func:`hypergradient_lr`, :func:`hd_adam` and :func:`hd_sgd`.

    Attributes:
      count: number of ``update`` calls (skipped ones included), int32, saturating.
      learning_rate: the current learning rate :math:`\alpha_t`; a scalar, or with
        ``per_leaf=True`` a pytree of scalars shaped like the parameters. Stored in the widest
        floating dtype of the parameters, at least float32 (never bfloat16 or float16).
      prev_direction: the previous direction :math:`d_{t-1}` (zeros before the first step), or
        ``None`` when :math:`d_{t-1}` is recomputed from ``inner_state`` (:func:`hd_adam`
        without Nesterov, heavy-ball :func:`hd_sgd`), which then holds everything.
      skipped: number of steps that were not applied because something they produced was not
        finite, int32, saturating; such a step changed nothing but ``count`` and ``skipped``.
      inner_state: the state of the wrapped direction transformation.
      schedule_value: the value :math:`s(t)` of the learning-rate schedule at the last applied
        step (the constant initial rate when ``learning_rate`` is a number).
      pending: ``lagged=True`` only (else ``None``): the hypergradient signal measured at the
        last applied step, :math:`\langle g_t, d_{t-1}\rangle` (additive rule) or
        :math:`\cos(g_t, d_{t-1})` (multiplicative rule), applied to the rate of the next step;
        shaped like ``learning_rate``.
    """

    count: jax.Array
    learning_rate: Any
    prev_direction: optax.Updates
    skipped: jax.Array
    inner_state: optax.OptState
    schedule_value: jax.Array
    pending: Any = None


# ----------------------------------------------------------------------------- validation


def _concrete(value: Any) -> np.ndarray | None:
    """``value`` as a NumPy array, or None when it is traced (inside jit / vmap / grad)."""
    if isinstance(value, jax.core.Tracer):
        return None
    return np.asarray(value)


def _is_traced(value: Any) -> bool:
    return isinstance(value, jax.core.Tracer)


def _check_nonnegative(name: str, value: Any) -> float | None:
    """``value`` as a float >= 0 (Python, NumPy or JAX scalar); None when it is traced."""
    if _is_traced(value):
        return None
    return checks.number(name, value, low=0.0)


def _check_probability_like(name: str, value: Any) -> None:
    if not _is_traced(value):
        checks.number(name, value, low=0.0, high=1.0, high_open=True)


def _check_bounds(name: str, bounds: Any) -> tuple[float | None, float | None] | None:
    """Validate a static ``(lo, hi)`` pair (either end may be None); returns it as floats."""
    if bounds is None:
        return None
    try:
        lo, hi = bounds
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair (lo, hi), got {bounds!r}") from None
    lo = None if lo is None else checks.number(f"{name}[0]", lo)
    hi = None if hi is None else checks.number(f"{name}[1]", hi)
    if lo is not None and hi is not None and not lo < hi:
        raise ValueError(f"{name} must satisfy lo < hi, got {bounds!r}")
    return lo, hi


def _positive_clip(x: jax.Array, bounds: tuple[float | None, float | None] | None) -> jax.Array:
    """Clip a learning rate to ``bounds`` and to ``finfo(dtype).tiny`` at least (never <= 0)."""
    lo, hi = bounds or (None, None)
    floor = float(jnp.finfo(x.dtype).tiny)
    lo = floor if lo is None else max(lo, floor)
    return jnp.clip(x, lo, hi).astype(x.dtype)


# ----------------------------------------------------------------------------- tree helpers


def _lr_dtype(params: optax.Params) -> jnp.dtype:
    """Widest floating dtype among the leaves of ``params``, at least float32."""
    dtype = jnp.dtype(jnp.float32)
    for leaf in jax.tree.leaves(params):
        leaf_dtype = jnp.asarray(leaf).dtype
        if jnp.issubdtype(leaf_dtype, jnp.floating):
            dtype = jnp.promote_types(dtype, leaf_dtype)
    return dtype


def _widened(dtype) -> jnp.dtype:
    """``dtype`` promoted to at least float32 (float16 and bfloat16 become float32)."""
    return jnp.promote_types(dtype, jnp.float32)


def _widen(tree: Any) -> Any:
    """``tree`` with its floating leaves narrower than float32 cast to float32 (others kept)."""

    def leaf(x):
        x = jnp.asarray(x)
        if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != _widened(x.dtype):
            return x.astype(_widened(x.dtype))
        return x

    return None if tree is None else jax.tree.map(leaf, tree)


def _narrow_like(updates: Any, like: Any) -> Any:
    """``updates`` cast back, leaf by leaf, to the dtypes of ``like`` (the incoming gradient)."""
    return jax.tree.map(lambda u, g: u.astype(jnp.result_type(g)), updates, like)


def _zero_sum(tree: Any, dtype) -> jax.Array:
    """``sum(0 * leaf)`` over the floating leaves: 0, or NaN when a leaf has a NaN or inf.

    Elementwise ``0 * x`` before the sum, so that large finite values cannot overflow the sum.
    XLA fuses these reductions into the computation that produces ``tree``.
    """
    total = jnp.zeros((), dtype)
    for leaf in jax.tree.leaves(tree):
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            total = total + jnp.sum(leaf * 0).astype(dtype)
    return total


@jax.custom_jvp
def _sums(*xs):
    """The sums of same-shaped arrays in one pass over memory (one variadic reduction)."""
    if xs[0].ndim == 0:
        return xs
    zeros = tuple(jnp.zeros((), x.dtype) for x in xs)
    add = lambda u, v: tuple(p + q for p, q in zip(u, v, strict=True))
    return tuple(jax.lax.reduce(xs, zeros, add, tuple(range(xs[0].ndim))))


@_sums.defjvp
def _sums_jvp(primals, tangents):
    # a sum is linear: the tangents are summed with jnp.sum, which JAX can also transpose
    return _sums(*primals), tuple(jnp.sum(t) for t in tangents)


def _fused_stats(a, b, checks, dtype, multiplicative):
    """:func:`_hypergradient_stats` for the recomputed directions, one reduction per leaf.

    ``checks`` are lists of leaves aligned with ``a``; ``z - z`` (0, or NaN when ``z`` is not
    finite) is added to the inner product's terms for each of them. Everything a leaf needs
    (the product, the squares) comes out of one variadic reduction, so that ``b``, which is
    recomputed from the optimizer state, is never written to memory.
    """
    dot = sq_a = sq_b = jnp.zeros((), dtype)
    for x, y, *zs in zip(a, b, *checks, strict=True):
        x, y = x.astype(dtype), y.astype(dtype)
        term = x * y
        for z in zs:
            z = z.astype(dtype)
            term = term + (z - z)
        if multiplicative:
            d, s_a, s_b = _sums(term, x * x, y * y)
            sq_a, sq_b = sq_a + s_a, sq_b + s_b
        else:
            (d,) = _sums(term)
        dot = dot + d
    return dot, sq_a, sq_b


def _hypergradient_stats(a, b, sentinels, dtype, multiplicative):
    """``<a, b>`` (and ``||a||^2``, ``||b||^2`` for the multiplicative rule) over lists of leaves.

    ``a`` is the gradient (or ``hyper_grads``), ``b`` the previous direction (always finite) and
    ``sentinels`` lists of leaves aligned with them (the new direction, the gradient when ``a``
    is ``hyper_grads``). ``0 * z`` is added inside the same sum for each sentinel ``z``, so that
    one fused pass over memory yields the inner product and makes it non-finite exactly when
    ``a`` or a sentinel has a non-finite entry (``inf * 0`` is NaN).
    """
    dot = sq_a = sq_b = jnp.zeros((), dtype)
    for x, y, *zs in zip(a, b, *sentinels, strict=True):
        x, y = x.astype(dtype), y.astype(dtype)
        term = x * y
        for z in zs:
            term = term + 0 * z.astype(dtype)
        dot = dot + jnp.sum(term)
        if multiplicative:
            sq_a = sq_a + jnp.sum(x * x)
            sq_b = sq_b + jnp.sum(y * y)
    return dot, sq_a, sq_b


def _signal(dot, sq_a, sq_b, multiplicative):
    """``<a, b>`` (additive rule) or ``cos(a, b)`` clipped to [-1, 1], 0 when a norm is 0 or
    overflows (multiplicative rule)."""
    if not multiplicative:
        return dot
    denom = jnp.sqrt(sq_a) * jnp.sqrt(sq_b)
    usable = (denom > 0) & jnp.isfinite(denom)
    cos = jnp.where(usable, dot / jnp.where(usable, denom, 1), 0)
    return jnp.clip(cos, -1, 1)


#: Cosine below which the multiplicative rule with ``safeguards`` treats the last step as an
#: overshoot and cuts the rate faster (down to half at a cosine of -1).
OVERSHOOT_COSINE = 0.3


def _apply_signal(lr, beta, signal, multiplicative, safeguards=False):
    """``lr + beta * signal`` or ``lr * factor(signal)`` (before schedule and clip).

    The multiplicative factor is ``1 + beta c``; with ``safeguards``, below ``c = -tau``
    (``tau`` = ``bilevel._hd.OVERSHOOT_COSINE``) it is at most the line from ``1 - beta tau`` at
    ``c = -tau`` down to ``1/2`` at ``c = -1``.
    """
    if not multiplicative:
        return lr + beta * signal
    factor = 1 + beta * signal
    if safeguards:
        tau = OVERSHOOT_COSINE
        top = 1 - beta * tau
        cut = top - (top - 0.5) * (-tau - signal) / (1 - tau)
        factor = jnp.where(signal < -tau, jnp.minimum(factor, cut), factor)
    return lr * factor


def _hd_rate(lr, beta, dot, sq_a, sq_b, multiplicative, safeguards=False):
    """The hypergradient-descent candidate for the learning rate (before schedule and clip)."""
    signal = _signal(dot, sq_a, sq_b, multiplicative)
    return _apply_signal(lr, beta, signal, multiplicative, safeguards)


def _rate_groups(learning_rate, per_leaf):
    """The rates as a list, their treedef (None: one global rate), the leaf groups, a flattener."""
    if per_leaf:
        rates, treedef = jax.tree.flatten(learning_rate)
        return rates, treedef, [[i] for i in range(len(rates))], treedef.flatten_up_to
    return [learning_rate], None, None, jax.tree.leaves


def _follow_schedule(rate, s_prev, s_now):
    """Carry the schedule's relative change ``s_now / s_prev`` over to the adapted rate."""
    moved = s_now != s_prev
    positive = s_prev > 0
    scaled = jnp.where(positive, rate * (s_now / jnp.where(positive, s_prev, 1)), s_now)
    return jnp.where(moved, scaled, rate)


# ----------------------------------------------------------------------------- transforms


def hypergradient_lr(
    direction: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    hyper_lr: jax.typing.ArrayLike,
    multiplicative: bool = False,
    *,
    per_leaf: bool = False,
    lr_bounds: tuple[float | None, float | None] | None = None,
    safeguards: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""Learning rate adapted online by hypergradient descent, around any Optax direction.

    With gradient :math:`g_t`, the direction :math:`d_t` computed by ``direction`` from
    :math:`g_t` (e.g. the Adam step :math:`\hat m_t / (\sqrt{\hat v_t} + \epsilon)`) and
    :math:`d_0 = 0`, the learning rate is updated *before* the parameter step, from the previous
    direction:

    .. math::

      \alpha_t = \Pi\big(\alpha_{t-1} + \beta \langle g_t, d_{t-1} \rangle\big)
      \quad\text{or (multiplicative)}\quad
      \alpha_t = \Pi\Big(\alpha_{t-1} \Big(1 + \beta
        \frac{\langle g_t, d_{t-1} \rangle}{\|g_t\| \, \|d_{t-1}\|}\Big)\Big),
      \qquad u_t = -\alpha_t d_t .

    :math:`-\langle g_t, d_{t-1}\rangle` is the derivative of the loss at the current parameters
    with respect to the learning rate used at the previous step. Inner products and norms run
    over the whole pytree (one global rate) unless ``per_leaf=True`` (one rate per leaf).
    The multiplicative rule leaves :math:`\alpha` unchanged when a norm is zero.

    Positive rates: :math:`\Pi` clips to ``lr_bounds`` and, always, to at least
    ``jnp.finfo(dtype).tiny`` (the smallest positive normal number), so the rate never becomes
    zero or negative, which the raw additive rule does when :math:`\beta` is too large (the
    update would then climb the loss). A rate at the floor recovers as soon as
    :math:`\langle g_t, d_{t-1}\rangle > 0`. The floor does not stop a too large
    :math:`\beta` from making the rate oscillate: bound it with ``lr_bounds=(lo, hi)``.
    Safeguard (``safeguards=True``, the default; ``False`` gives the rule above as written),
    multiplicative rule: a cosine below :math:`-\tau`, :math:`\tau` =
    ``bilevel._hd.OVERSHOOT_COSINE`` = 0.3, says the gradient reversed along the last step: the rate is
    past the local stability limit, where the error along the stiff directions grows
    geometrically, and :math:`1 + \beta\cos \ge 1 - \beta` shrinks it too slowly (the loss
    spikes until it has). There the factor is at most the line from :math:`1 - \beta\tau` at
    :math:`-\tau` down to :math:`1/2` at :math:`-1` (halving, the backtracking factor, for a
    reversed step); cosines in :math:`[-\tau, 1]`, where minibatch noise keeps them, are
    unchanged. Two rounding-sensitive failures of the rule as written, both measured under the
    default XLA flags and under
    ``XLA_FLAGS="--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"``:
    ``hd_sgd(1e-3)`` on softmax regression of the digits pixels / 16 (300 full-batch steps)
    ended at loss 0.49 and 37.3 (the rate rides the edge of stability and the loss spikes; the
    last step caught a spike), with the safeguard 0.07 and 0.07; ``hd_adam(1e-2)`` on
    Rosenbrock in float32 reached the optimum, then at the float noise floor (the parameters
    stop moving, :math:`g_t` repeats, the cosine is 1) grew its rate until the steps left the
    optimum (loss 253, rate 59 after 10,000 steps under the second flags); with the safeguard
    the reversed gradient cuts the rate back at once, and both runs end below 1e-11 with rates
    below 1e-6. A mask of the entries that the last step left unchanged (below float
    resolution) was tried instead and rejected: it also freezes a rate too small to move the
    parameters (bfloat16 Adam on a quadratic stuck at loss 0.38), which the rule must grow.

    Schedules: with ``learning_rate`` a schedule :math:`s` (e.g. :func:`optax.linear_schedule`),
    :math:`\alpha_0 = \Pi(s(0))` and the adapted rate follows the schedule's relative changes,
    :math:`\alpha_t = \Pi\big(\tilde\alpha_t\, s(t) / s(t-1)\big)` with :math:`\tilde\alpha_t`
    the hypergradient step above; equivalently :math:`\alpha_t = s(t)\, c_t` where the factor
    :math:`c_t` (:math:`c_0 = 1`) takes hypergradient steps measured in learning-rate units. A
    constant schedule gives exactly the constant rate; after a step with :math:`s(t-1) = 0` the
    rate restarts at :math:`\Pi(s(t))`. The schedule is indexed by ``state.count`` (every
    ``update`` call, as :func:`optax.inject_hyperparams` does), and an injected
    ``learning_rate`` (``optax.inject_hyperparams(bilevel.hd_adam)(learning_rate=schedule,
    ...)``) acts the same way.

    Online validation hypergradient: ``update(grads, state, params, hyper_grads=val_grads)``
    uses the gradient of a held-out loss in place of :math:`g_t` in the rule above (the
    direction still comes from ``grads``).

    Mixed precision: the rule runs in at least float32 whatever the parameters' dtype. The
    gradient, ``hyper_grads`` and ``params`` are cast to float32 when they are narrower
    (bfloat16, float16; float32 and float64 leaves are kept) before they reach ``direction``,
    so the direction's state (Adam's moments, a momentum buffer: ``mu_dtype`` or
    ``accumulator_dtype`` still choose their storage), ``prev_direction``, the inner products
    and the learning rate are float32; only the returned update is cast back to the dtype of
    the incoming gradient. A bfloat16 accumulator breaks Adam: ``b2 = 0.999`` itself rounds
    to 1 in bfloat16 (8 significant bits), so the second moment never decays (0.76 instead of
    0.089 after 1000 steps of unit normal gradients and 2000 of a tenth of that size). Under :func:`optax.inject_hyperparams` pass
    ``hyperparam_dtype=jnp.float32``: by default it casts the injected ``learning_rate`` to
    the parameters' dtype, i.e. rounds it to bfloat16 before this transformation sees it.

    Non-finite steps: a step is applied only when the gradient, ``hyper_grads``, the new
    direction, the new state of ``direction`` (e.g. Adam's moments, whose second moment
    overflows to inf for a float32 gradient of 1e25) and the new learning rate are all finite
    (:func:`solvers.guard`, with the flag fused into the hypergradient's inner product).
    Otherwise the update is zero, the whole previous state (learning rate, stored direction,
    wrapped state) is kept and ``state.skipped`` increments: the next finite step continues as
    if the bad one never happened.

    The current learning rate is ``optax.tree_utils.tree_get(state, "learning_rate")``. Inside
    :func:`optax.inject_hyperparams` that name also denotes the injected *initial* value, so read
    ``optax.tree_utils.tree_get(state.inner_state, "learning_rate")`` there.

    Args:
      direction: an Optax transformation producing the direction :math:`d_t` from the gradient
        (``optax.identity()``, ``optax.trace(...)``, ``optax.scale_by_adam()``,
        ``optax.scale_by_rms()``, ``optax.scale_by_lion()``, ...). Extra keyword arguments of
        ``update`` are passed on to it.
      learning_rate: initial learning rate :math:`\alpha_0 \ge 0` (a Python, NumPy or JAX
        scalar, which may be traced, e.g. under ``jax.vmap`` over a population of initial
        rates), or a schedule :math:`s` (see above).
      hyper_lr: hypergradient step size :math:`\beta \ge 0` (0 gives the base optimizer).
      multiplicative: use the multiplicative (normalized) rule instead of the additive one.
      per_leaf: one learning rate per parameter leaf instead of one global rate.
      lr_bounds: optional ``(lo, hi)`` clipping of the learning rate after each update (either
        end may be ``None``; the positive floor applies in any case). A numeric
        ``learning_rate`` must lie within them.
      safeguards: the overshoot safeguard above (default ``True``; it acts on the
        multiplicative rule); ``False``: the rule of Baydin et al. as written.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs` whose state is a
      :class:`HypergradientLRState`.

    Raises:
      ValueError: a negative or non-finite ``learning_rate`` or ``hyper_lr``, ``lr_bounds``
        with ``lo >= hi``, or a numeric ``learning_rate`` outside ``lr_bounds``.
      TypeError: ``direction`` is not an Optax transformation, or a value is not a number.

    Example:
      >>> import jax.numpy as jnp, optax, bilevel
      >>> tx = bilevel.hypergradient_lr(optax.scale_by_rms(), 1e-2, hyper_lr=1e-4)
      >>> params = jnp.array([1.0, -2.0])
      >>> state = tx.init(params)
      >>> for _ in range(3):
      ...     grads = 2 * params
      ...     updates, state = tx.update(grads, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> print(optax.tree_utils.tree_get(state, "learning_rate") > 1e-2)
      True

    References:
      Baydin et al., `Online Learning Rate Adaptation with Hypergradient Descent
      <https://arxiv.org/abs/1703.04782>`_, ICLR 2018.
    """
    if not isinstance(direction, optax.GradientTransformation):
        raise TypeError(
            f"direction must be an optax.GradientTransformation, got {type(direction).__name__}"
        )
    schedule, lr_bounds = _check_rule(learning_rate, hyper_lr, multiplicative, lr_bounds)
    direction = optax.with_extra_args_support(direction)

    def schedule_value(count):
        return schedule(count) if schedule is not None else learning_rate

    def init_fn(params):
        return _init_state(_widen(params), schedule_value(0), lr_bounds, per_leaf, direction, True)

    def update_fn(updates, state, params=None, *, hyper_grads=None, **extra_args):
        incoming = updates
        grads, hyper_grads, params = _widen(updates), _widen(hyper_grads), _widen(params)
        source = grads if hyper_grads is None else hyper_grads
        s_prev = state.schedule_value
        dtype = s_prev.dtype
        s_now = jnp.asarray(schedule_value(state.count), dtype)
        beta = jnp.asarray(hyper_lr, dtype)

        new_direction, inner_state = direction.update(
            grads, state.inner_state, params, **extra_args
        )

        # alpha_t from <g_t, d_{t-1}>, applied to this step's direction d_t. The same pass
        # yields the finiteness flag of the gradient(s) and of d_t.
        rates, treedef, groups, flat = _rate_groups(state.learning_rate, per_leaf)
        a, b, d = flat(source), flat(state.prev_direction), flat(new_direction)
        sentinels = [d] if hyper_grads is None else [d, flat(grads)]
        groups = groups or [list(range(len(a)))]
        candidates, total = [], _zero_sum(inner_state, dtype)
        for lr, group in zip(rates, groups, strict=True):
            pick = lambda leaves, group=group: [leaves[i] for i in group]
            dot, sq_a, sq_b = _hypergradient_stats(
                pick(a), pick(b), [pick(z) for z in sentinels], dtype, multiplicative
            )
            rate = _hd_rate(lr, beta, dot, sq_a, sq_b, multiplicative, safeguards)
            candidates.append(_positive_clip(_follow_schedule(rate, s_prev, s_now), lr_bounds))
            total = total + dot
        finite = jnp.isfinite(total) & jnp.all(jnp.isfinite(jnp.stack(candidates)))
        candidate = candidates[0] if treedef is None else jax.tree.unflatten(treedef, candidates)

        guarded = solvers.guard(
            (state.learning_rate, state.prev_direction, state.inner_state, s_prev),
            (
                candidate,
                optax.tree.cast_like(new_direction, state.prev_direction),
                inner_state,
                s_now,
            ),
            state.skipped,
            finite=finite,
        )
        lr, prev, inner_state, s = guarded.value
        ok = guarded.applied
        new_updates = _scaled(lr, new_direction, per_leaf, lambda rate, d: ok)
        return _narrow_like(new_updates, incoming), HypergradientLRState(
            count=optax.safe_increment(state.count),
            learning_rate=lr,
            prev_direction=prev,
            skipped=guarded.skipped,
            inner_state=inner_state,
            schedule_value=s,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_rule(learning_rate, hyper_lr, multiplicative, lr_bounds):
    """Validate the static arguments shared by every variant; returns (schedule, lr_bounds)."""
    schedule = learning_rate if callable(learning_rate) else None
    if schedule is not None:
        lr0 = _check_nonnegative("learning_rate(0)", schedule(0))
    else:
        lr0 = _check_nonnegative("learning_rate", learning_rate)
    _check_nonnegative("hyper_lr", hyper_lr)
    lr_bounds = _check_bounds("lr_bounds", lr_bounds)
    if schedule is None and lr0 is not None and lr_bounds is not None:
        lo, hi = lr_bounds
        if (lo is not None and lr0 < lo) or (hi is not None and lr0 > hi):
            raise ValueError(
                f"learning_rate={lr0} lies outside lr_bounds={lr_bounds}; it would be clipped "
                "before the first step: pass a learning_rate within lr_bounds"
            )
    if multiplicative and schedule is None and lr0 == 0:
        raise ValueError("a multiplicative rule cannot move a learning rate of 0")
    return schedule, lr_bounds


def _init_state(params, s0, lr_bounds, per_leaf, direction, store_direction):
    """The initial :class:`HypergradientLRState` (``prev_direction`` zeros or ``None``)."""
    dtype = _lr_dtype(params)
    s0 = jnp.asarray(s0, dtype)
    if s0.shape != ():
        raise ValueError(f"learning_rate must be a scalar, got shape {s0.shape}")
    lr = _positive_clip(s0, lr_bounds)
    if per_leaf:
        lr = jax.tree.map(lambda _: lr, params)
    return HypergradientLRState(
        count=jnp.zeros([], jnp.int32),
        learning_rate=lr,
        prev_direction=optax.tree.zeros_like(params) if store_direction else None,
        skipped=jnp.zeros([], jnp.int32),
        inner_state=direction.init(params),
        schedule_value=s0,
    )


def _scaled(lr, direction, per_leaf, keep):
    """``-rate * d`` per leaf where ``keep(rate, d)`` holds, else 0, in the dtype of ``d``."""

    def step(rate, d):
        return jnp.where(keep(rate, d), -rate * d, 0).astype(d.dtype)

    if per_leaf:
        return jax.tree.map(step, lr, direction)
    return jax.tree.map(lambda d: step(lr, d), direction)


# ----------------------------------------------------------------------------- recomputed d_{t-1}

#: Default hypergradient step size :math:`\beta` of the multiplicative rule of :func:`hd_adam`
#: and :func:`hd_sgd` (chosen by ``python -m experiments.hd_optimizers``'s sweep section).
DEFAULT_HYPER_LR = 0.1


class _Recomputable(NamedTuple):
    """An Optax direction whose previous output is a function of its own state.

    Attributes:
      transform: the Optax direction (``optax.scale_by_adam``, ``optax.trace``).
      previous: ``previous(inner_state)``: :math:`d_{t-1}` recomputed from the state (zeros
        before the first step), a tree shaped like the parameters.
      checks: ``checks(grads, inner_state)``: trees of cheap elementwise values, computed from
        the step's inputs, that are all finite if and only if (up to rounding at the edge of
        the floating-point range) the new direction and state are, given a finite ``grads``
        and the (always finite) stored state; plus a scalar flag for the scalars involved.
      moments: ``moments(inner_state)``: the state's parameter-shaped trees.
      replace: ``replace(inner_state, trees)``: the state with those trees replaced.
    """

    transform: optax.GradientTransformation
    previous: Callable[[Any], Any]
    checks: Callable[[Any, Any], tuple[list, jax.Array]]
    moments: Callable[[Any], list]
    replace: Callable[[Any, list], Any]


def _positive_in(value, leaves) -> bool:
    """Whether ``value`` is a concrete number that stays > 0 in the dtype of every leaf."""
    if _is_traced(value):
        return False
    return (
        all(float(np.asarray(value).astype(jnp.result_type(leaf))) > 0 for leaf in leaves)
        and float(value) > 0
    )


def _adam_direction(b1, b2, eps, eps_root, mu_dtype) -> _Recomputable:
    r"""Adam: :math:`d_{t-1} = \hat m_{t-1} / (\sqrt{\hat v_{t-1} + \epsilon_{root}} + \epsilon)`
    with the bias corrections of step :math:`t-1`, the operations of
    :func:`optax.scale_by_adam` (the first moment read as stored, i.e. rounded to
    ``mu_dtype``)."""
    transform = optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype)

    def previous(state):
        started = state.count > 0
        count = jnp.maximum(state.count, 1)  # no 0/0 before the first step (nor under jax.grad)
        mu = jax.tree.map(
            lambda m, v: m.astype(jnp.promote_types(m.dtype, v.dtype)), state.mu, state.nu
        )
        mu_hat = optax.tree.bias_correction(mu, b1, count)
        nu_hat = optax.tree.bias_correction(state.nu, b2, count)

        def leaf(m, v, nu):
            return jnp.where(started, m / (jnp.sqrt(v + eps_root) + eps), 0).astype(nu.dtype)

        return jax.tree.map(leaf, mu_hat, nu_hat, state.nu)

    def checks(grads, state):
        # m_t, v_t are convex combinations of finite values and g_t^2; the bias corrections are
        # scalars; with eps > 0 (and eps_root >= 0) d_t = m_hat / (sqrt(v_hat) + eps) is finite
        # when they are (|m_hat| <= sqrt(v_hat) up to a constant of b1, b2). Otherwise (eps
        # traced, or 0 in a leaf's dtype) d_t itself is recomputed in the reduction.
        leaves = jax.tree.leaves(grads)
        terms = [jax.tree.map(lambda g: g * g, grads)]
        if not (_positive_in(eps, leaves) and not _is_traced(eps_root)):
            terms.append(transform.update(grads, state)[0])
        count = optax.safe_increment(state.count)
        scalars = jnp.stack([1 / (1 - jnp.asarray(b, jnp.float32) ** count) for b in (b1, b2)])
        return terms, jnp.all(jnp.isfinite(scalars))

    return _Recomputable(
        transform,
        previous,
        checks,
        lambda state: [state.mu, state.nu],
        lambda state, trees: state._replace(mu=trees[0], nu=trees[1]),
    )


def _heavy_ball_direction(momentum, accumulator_dtype) -> _Recomputable:
    r"""Heavy ball: :math:`d_{t-1} = v_{t-1}`, the stored trace (as stored, i.e. rounded to
    ``accumulator_dtype``)."""
    transform = optax.trace(decay=momentum, nesterov=False, accumulator_dtype=accumulator_dtype)
    return _Recomputable(
        transform,
        lambda state: state.trace,
        lambda grads, state: ([transform.update(grads, state)[0]], jnp.bool_(True)),
        lambda state: [state.trace],
        lambda state, trees: state._replace(trace=trees[0]),
    )


def _recomputed_hd(
    kind: _Recomputable,
    learning_rate: optax.ScalarOrSchedule,
    hyper_lr: jax.typing.ArrayLike,
    multiplicative: bool,
    *,
    per_leaf: bool,
    lr_bounds: tuple[float | None, float | None] | None,
    lagged: bool,
    safeguards: bool,
) -> optax.GradientTransformationExtraArgs:
    r""":func:`hypergradient_lr` around ``kind.transform`` with :math:`d_{t-1}` recomputed from
    the direction's state instead of stored, or the one-step-lagged rule.

    Exact rule: one fused reduction over the gradient and the stored moments gives
    :math:`\langle g_t, d_{t-1}\rangle` (and the norms), with ``0 * z`` terms for the new
    direction and moments so that it is non-finite exactly when the step produced a NaN or inf;
    the elementwise update then runs with the new rate. Lagged rule: the rate of step :math:`t`
    comes from the statistic of step :math:`t-1` (``state.pending``), so the update's values do
    not depend on this step's reduction, and the finiteness test acts per entry within it. The
    update is still ordered after the reduction (a dependence on a flag that is always true), so
    that it can write the moments in place: on XLA:CPU both passes are memory-bound and
    overlapping them saved nothing, while the copies of the old moments that XLA made for a
    reduction running after the update cost a pass each.
    """
    schedule, lr_bounds = _check_rule(learning_rate, hyper_lr, multiplicative, lr_bounds)
    transform = kind.transform

    def schedule_value(count):
        return schedule(count) if schedule is not None else learning_rate

    def init_fn(params):
        state = _init_state(
            _widen(params), schedule_value(0), lr_bounds, per_leaf, transform, False
        )
        if lagged:
            state = state._replace(pending=jax.tree.map(jnp.zeros_like, state.learning_rate))
        return state

    def update_fn(updates, state, params=None, *, hyper_grads=None, **extra_args):
        del extra_args  # scale_by_adam and trace take none
        incoming = updates
        grads, hyper_grads, params = _widen(updates), _widen(hyper_grads), _widen(params)
        source = grads if hyper_grads is None else hyper_grads
        s_prev = state.schedule_value
        dtype = s_prev.dtype
        s_now = jnp.asarray(schedule_value(state.count), dtype)
        beta = jnp.asarray(hyper_lr, dtype)

        # The reduction reads only the step's inputs (g, the stored moments), recomputing
        # what it needs from its own copy of them (the barrier keeps XLA from sharing, and so
        # materializing, intermediates with the elementwise update below).
        g_r, h_r, inner_r = jax.lax.optimization_barrier((grads, source, state.inner_state))
        previous = kind.previous(inner_r)
        checks, scalars_ok = kind.checks(g_r, inner_r)

        # one reduction per rate: <a, d_{t-1}> (+ norms), non-finite iff something is
        rates, treedef, groups, flat = _rate_groups(state.learning_rate, per_leaf)
        a, b = flat(h_r), flat(previous)
        sentinels = [flat(c) for c in checks]
        groups = groups or [list(range(len(a)))]
        signals, total = [], jnp.where(scalars_ok, 0, jnp.nan).astype(dtype)
        for group in groups:
            pick = lambda leaves, group=group: [leaves[i] for i in group]
            dot, sq_a, sq_b = _fused_stats(
                pick(a), pick(b), [pick(z) for z in sentinels], dtype, multiplicative
            )
            signals.append(_signal(dot, sq_a, sq_b, multiplicative))
            total = total + dot

        def tree(values):
            return values[0] if treedef is None else jax.tree.unflatten(treedef, values)

        def rate_from(lr, signal):
            rate = _apply_signal(lr, beta, signal, multiplicative, safeguards)
            return _positive_clip(_follow_schedule(rate, s_prev, s_now), lr_bounds)

        if not lagged:
            inner_state = transform.update(grads, state.inner_state, params)[1]
            candidates = [rate_from(lr, sig) for lr, sig in zip(rates, signals, strict=True)]
            finite = jnp.isfinite(total) & jnp.all(jnp.isfinite(jnp.stack(candidates)))
            guarded = solvers.guard(
                (state.learning_rate, state.inner_state, s_prev),
                (tree(candidates), inner_state, s_now),
                state.skipped,
                finite=finite,
            )
            lr, inner_state, s = guarded.value
            ok = guarded.applied
            # d_t read back from the guarded moments (the transform's output where the step is
            # applied, masked where it is not): the update then reads the buffers the step
            # writes instead of recomputing them from the old moments, which XLA would have to
            # keep alive in copies (experiments.bench_optax, 10M-parameter MLP: 2.11x Adam -> 1.4x).
            new_updates = _scaled(lr, kind.previous(inner_state), per_leaf, lambda rate, d: ok)
            pending = None
        else:
            # The moments update reads a flag computed from the reductions' result (always
            # true: NaN, inf or finite), so the reductions, which read the old moments, run
            # first and the update writes the moments in place; without the dependence XLA
            # kept the old moments alive in copies for the reductions.
            after = jnp.isnan(total) | jnp.isinf(total) | jnp.isfinite(total)
            inner_state = transform.update(grads, state.inner_state, params)[1]
            new_moments = kind.moments(inner_state)
            pending_prev = _rate_groups(state.pending, per_leaf)[0]
            used = [rate_from(lr, sig) for lr, sig in zip(rates, pending_prev, strict=True)]
            used_ok = jnp.all(jnp.isfinite(jnp.stack(used)))
            finite = jnp.isfinite(total) & used_ok & jnp.all(jnp.isfinite(jnp.stack(signals)))
            # the per-entry test runs in the elementwise pass of the update itself, on values
            # computed from that pass's inputs
            entry_checks, _ = kind.checks(grads, state.inner_state)
            entry_ok = jax.tree.map(
                lambda *xs: (
                    functools.reduce(jnp.logical_and, map(jnp.isfinite, xs))
                    & used_ok
                    & scalars_ok
                    & after
                ),
                grads,
                *entry_checks,
            )
            moments = [
                jax.tree.map(jnp.where, entry_ok, new, old)
                for new, old in zip(new_moments, kind.moments(state.inner_state), strict=True)
            ]
            candidate = kind.replace(inner_state, moments)
            guarded = solvers.guard(
                (
                    state.learning_rate,
                    state.pending,
                    kind.replace(state.inner_state, moments),
                    s_prev,
                ),
                (tree(used), tree(signals), candidate, s_now),
                state.skipped,
                finite=finite,
            )
            lr, pending, inner_state, s = guarded.value
            # d_t read back from the new moments, as the exact rule does (the masked entries
            # are zeroed below): the update reads the buffers the step writes, not the old
            # moments (experiments.bench_optax, 10M-parameter MLP: with both changes 2.5x
            # Adam -> 1.5x)
            direction = kind.previous(candidate)
            if per_leaf:
                new_updates = jax.tree.map(
                    lambda rate, d, ok: jnp.where(ok, -rate * d, 0).astype(d.dtype),
                    tree(used),
                    direction,
                    entry_ok,
                )
            else:
                new_updates = jax.tree.map(
                    lambda d, ok: jnp.where(ok, -used[0] * d, 0).astype(d.dtype),
                    direction,
                    entry_ok,
                )
        return _narrow_like(new_updates, incoming), HypergradientLRState(
            count=optax.safe_increment(state.count),
            learning_rate=lr,
            prev_direction=None,
            skipped=guarded.skipped,
            inner_state=inner_state,
            schedule_value=s,
            pending=pending,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _resolve_rule(hyper_lr, multiplicative, lagged, recomputable, factory):
    """``(hyper_lr, multiplicative)`` after defaults; refuses combinations that cannot work."""
    if multiplicative is None:
        multiplicative = hyper_lr is None
    if hyper_lr is None:
        if not multiplicative:
            raise ValueError(
                f"{factory}(..., multiplicative=False) needs a hyper_lr: the additive rule's "
                "step size has the units of 1 / (gradient x direction) and no default; pass "
                "hyper_lr=..., or drop multiplicative=False to use the scale-free "
                f"multiplicative rule (hyper_lr={DEFAULT_HYPER_LR} by default)"
            )
        hyper_lr = DEFAULT_HYPER_LR
    if lagged and not recomputable:
        raise ValueError(
            f"lagged=True needs a direction recomputed from the optimizer state: {factory} "
            "without nesterov" + (" and with a momentum" if factory == "hd_sgd" else "")
        )
    return hyper_lr, bool(multiplicative)


# ----------------------------------------------------------------------------- drop-ins


_DEFAULT_DOC = """
    Default rule (``hyper_lr`` and ``multiplicative`` left unset): the multiplicative rule with
    :math:`\\beta` = :data:`DEFAULT_HYPER_LR`,

    .. math::

      \\alpha_t = \\Pi\\big(\\alpha_{t-1}\\,(1 + \\beta \\cos(g_t, d_{t-1}))\\big),

    which is scale-free: :math:`\\cos` does not depend on the units of the loss, the
    parameters or the rate, so one :math:`\\beta` serves every initial rate and model (a rate
    changes by a factor within :math:`1 \\pm \\beta` per step, or down to 1/2 after an
    overshoot (the safeguard, end of this section); it reaches 100 times its
    initial value in about 50 steps of agreeing directions). The factor
    :math:`1 + \\beta\\cos` (the multiplicative rule of Baydin et al.) rather than
    :math:`e^{\\beta\\cos}`: both agree to first order in :math:`\\beta`; the former stays in
    :math:`[1-\\beta, 1+\\beta]` (for cosines above -0.3) and, under noisy (minibatch) signals,
    :math:`\\log(1 + \\beta c) \\approx \\beta c - \\beta^2 c^2 / 2` drifts slightly down, so
    the rate settles where consecutive steps still agree a little rather than at the edge of
    stability. The default :math:`\\beta = 0.1` had the smallest worst-case loss gap to the best
    fixed rate in a sweep (0.02 to 0.2) over SGD, SGD with Nesterov momentum and Adam, initial
    rates 1e-5 to 1, on MNIST logistic regression (minibatches) and full-batch digits
    logistic regression; 0.2 diverged on the latter, 0.05 left SGD started at 1e-5 far
    behind (MNIST: loss 1.9 after 10 epochs, 0.49 at the best fixed rate). Override it with
    ``hyper_lr=beta, multiplicative=True``. Passing ``hyper_lr`` alone selects the additive rule
    :math:`\\alpha_t = \\Pi(\\alpha_{t-1} + \\beta \\langle g_t, d_{t-1} \\rangle)` of the paper
    (whose :math:`\\beta` has units and must be tuned), as in earlier versions;
    ``multiplicative=False`` without ``hyper_lr`` is an error.
    The multiplicative rule comes with the overshoot safeguard of :func:`hypergradient_lr` (a
    faster cut, down to 1/2, after a step that reversed the gradient) unless
    ``safeguards=False``.

"""


def hd_sgd(
    learning_rate: optax.ScalarOrSchedule,
    hyper_lr: jax.typing.ArrayLike | None = None,
    momentum: jax.typing.ArrayLike | None = None,
    nesterov: bool = False,
    multiplicative: bool | None = None,
    *,
    per_leaf: bool = False,
    lr_bounds: tuple[float | None, float | None] | None = None,
    accumulator_dtype: Any | None = None,
    lagged: bool = False,
    safeguards: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""SGD (plain, heavy-ball or Nesterov) with a hypergradient-descent learning rate (SGD-HD).

    Directions (:math:`\mu` = ``momentum``):

    .. math::

      d_t = g_t \ \text{(SGD)}, \quad
      v_t = \mu v_{t-1} + g_t,\ d_t = v_t \ \text{(heavy ball)}, \quad
      v_t = \mu v_{t-1} + g_t,\ d_t = g_t + \mu v_t \ \text{(Nesterov)},

    :math:`\alpha_t` from :math:`\langle g_t, d_{t-1}\rangle` (rules below) and
    :math:`u_t = -\alpha_t d_t`, where :math:`\Pi` keeps the rate positive and within
    ``lr_bounds``. See :func:`hypergradient_lr` for schedules, the per-leaf rates, the
    validation-gradient mode and non-finite steps (zero update, whole state kept,
    ``state.skipped`` counts them).
    {default}
    Cost: the heavy-ball direction :math:`d_{t-1} = v_{t-1}` is the momentum buffer itself,
    so no copy of it is stored (state: one array per parameter, as :func:`optax.sgd`); plain
    SGD and Nesterov need :math:`g_{t-1}` and store it in ``state.prev_direction``.
    ``lagged=True`` (heavy ball only) is the one-step-lagged rule of :func:`hd_adam`.

    Limit: SGD's direction is not normalized, so where the directions agree for long and the
    curvature then rises (Rosenbrock's valley from :math:`(0, 0)`), the rate can grow past the
    stability limit before the signal turns, and the iterate diverges (its gradient then
    overflows and every later step is skipped): plain ``hd_sgd(1e-3)`` does, heavy ball
    ``hd_sgd(1e-3, momentum=0.9)`` did without the safeguard (with it, it converges). Bound the rate there,
    ``lr_bounds=(None, hi)`` with ``hi`` at most about :math:`2 (1 + \mu) / L` for curvature
    :math:`L`; :func:`hd_adam`, whose step is normalized, did not need it in the tests.

    Args:
      learning_rate: initial learning rate :math:`\alpha_0`, or a schedule.
      hyper_lr: hypergradient step size :math:`\beta`: ``None`` for the default multiplicative
        rule; a number alone selects the additive rule (the paper uses ``1e-3`` on MNIST).
      momentum: :math:`\mu \in [0, 1)`, or ``None`` (the default, as in :func:`optax.sgd`) for
        no momentum buffer; any number, ``0.0`` included, uses :func:`optax.trace`.
      nesterov: Nesterov momentum (SGDN-HD); needs a ``momentum``.
      multiplicative: the multiplicative rule (SGD-HDM); ``None``: multiplicative unless a
        ``hyper_lr`` is given.
      per_leaf: one learning rate per parameter leaf.
      lr_bounds: optional ``(lo, hi)`` clipping of the learning rate.
      accumulator_dtype: dtype of the momentum buffer (default: that of the parameters, at
        least float32: see mixed precision in :func:`hypergradient_lr`); the
        heavy-ball :math:`d_{t-1}` is read from the buffer as stored, i.e. rounded to it.
      lagged: the one-step-lagged rule (see :func:`hd_adam`); heavy ball only.
      safeguards: the overshoot safeguard of :func:`hypergradient_lr` (default ``True``;
        ``False``: the paper's rule as written).

    Returns:
      A :class:`optax.GradientTransformationExtraArgs` whose state is a
      :class:`HypergradientLRState`; the current learning rate is
      ``optax.tree_utils.tree_get(state, "learning_rate")``.

    Raises:
      ValueError: ``nesterov`` without ``momentum``, ``lagged`` without a heavy-ball momentum,
        ``multiplicative=False`` without ``hyper_lr``, or an invalid value (see
        :func:`hypergradient_lr`).

    Example:
      >>> import jax, jax.numpy as jnp, optax, bilevel
      >>> loss = lambda w: jnp.sum((w - 1.0) ** 2)
      >>> tx = bilevel.hd_sgd(1e-3)  # instead of optax.sgd(1e-3)
      >>> w = jnp.zeros(3)
      >>> state = tx.init(w)
      >>> @jax.jit
      ... def step(w, state):
      ...     updates, state = tx.update(jax.grad(loss)(w), state, w)
      ...     return optax.apply_updates(w, updates), state
      >>> for _ in range(100):
      ...     w, state = step(w, state)
      >>> print(bool(loss(w) < 1e-3), optax.tree_utils.tree_get(state, "learning_rate") > 1e-3)
      True True
      >>> additive = bilevel.hd_sgd(1e-3, hyper_lr=1e-2)  # the paper's additive rule

    References:
      Baydin et al., `Online Learning Rate Adaptation with Hypergradient Descent
      <https://arxiv.org/abs/1703.04782>`_, ICLR 2018 (additive and multiplicative rules).
    """
    heavy_ball = momentum is not None and not nesterov
    hyper_lr, multiplicative = _resolve_rule(hyper_lr, multiplicative, lagged, heavy_ball, "hd_sgd")
    if momentum is None:
        if nesterov:
            raise ValueError("nesterov=True needs a momentum (got momentum=None)")
        direction = optax.identity()
    else:
        _check_probability_like("momentum", momentum)
        if heavy_ball:
            return _recomputed_hd(
                _heavy_ball_direction(momentum, accumulator_dtype),
                learning_rate,
                hyper_lr,
                multiplicative,
                per_leaf=per_leaf,
                lr_bounds=lr_bounds,
                lagged=lagged,
                safeguards=safeguards,
            )
        direction = optax.trace(
            decay=momentum, nesterov=nesterov, accumulator_dtype=accumulator_dtype
        )
    return hypergradient_lr(
        direction,
        learning_rate,
        hyper_lr,
        multiplicative,
        per_leaf=per_leaf,
        lr_bounds=lr_bounds,
        safeguards=safeguards,
    )


def hd_adam(
    learning_rate: optax.ScalarOrSchedule,
    hyper_lr: jax.typing.ArrayLike | None = None,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    multiplicative: bool | None = None,
    *,
    eps_root: jax.typing.ArrayLike = 0.0,
    mu_dtype: Any | None = None,
    nesterov: bool = False,
    per_leaf: bool = False,
    lr_bounds: tuple[float | None, float | None] | None = None,
    lagged: bool = False,
    safeguards: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""Adam with a hypergradient-descent learning rate (Adam-HD); a drop-in for ``optax.adam``.

    The direction is the bias-corrected Adam step of :func:`optax.scale_by_adam`,

    .. math::

      m_t = b_1 m_{t-1} + (1-b_1) g_t,\quad v_t = b_2 v_{t-1} + (1-b_2) g_t^2,\quad
      d_t = \frac{m_t / (1-b_1^t)}{\sqrt{v_t / (1-b_2^t) + \epsilon_{root}} + \epsilon},

    :math:`\alpha_t` from :math:`\langle g_t, d_{t-1}\rangle` (rules below) and
    :math:`u_t = -\alpha_t d_t`, where :math:`\Pi` keeps the rate positive and within
    ``lr_bounds``. See :func:`hypergradient_lr` for schedules, the per-leaf rates, the
    validation-gradient mode and non-finite steps: a NaN gradient, or a second moment
    overflowing to inf, gives a zero update and keeps the whole previous state (the moments
    included), counted in ``state.skipped``.
    {default}
    Cost: :math:`d_{t-1}` is recomputed from the moments :math:`m_{t-1}, v_{t-1}` that the
    step reads anyway (with the bias corrections of step :math:`t-1`), so the state holds two
    arrays per parameter, as :func:`optax.adam`. The exact rule adds one reduction over
    :math:`g_t, m_{t-1}, v_{t-1}` (the inner product, the norms and the finiteness test in one
    pass, :math:`d_{t-1}` never written to memory) that must finish before the elementwise
    update, which needs :math:`\alpha_t`: one more read of three arrays and one more square root
    and division per parameter (``python -m experiments.bench_optax`` measures it). The
    finiteness test needs no extra array: the new moments are finite when :math:`g_t` and
    :math:`g_t^2` are, and so is :math:`d_t` when ``eps`` is a positive constant (otherwise
    :math:`d_t` is recomputed in the reduction). With ``mu_dtype`` the first moment is read as
    stored (rounded to it). ``nesterov=True`` (NAdam) needs :math:`g_{t-1}` and stores
    :math:`d_{t-1}` instead.

    One-step-lagged rule (``lagged=True``), a different algorithm: the rate of step :math:`t`
    comes from the hypergradient of step :math:`t-1`,

    .. math::

      \alpha_t = \Pi\big(\alpha_{t-1} (1 + \beta \cos(g_{t-1}, d_{t-2}))\big)
      \ \text{(or the additive form)},

    so the reduction that measures :math:`\langle g_t, d_{t-1}\rangle` (kept in
    ``state.pending`` for the next step) no longer has to finish before the update: both read
    the same inputs and can run as one pass, Adam's, on a compiler that fuses a reduction with
    elementwise outputs (multi-output fusion). XLA:CPU does not, so there the lagged rule costs
    what the exact rule costs. The finiteness test acts per entry, within the update: an entry
    whose gradient (or :math:`g^2`) is not finite keeps its moments and gets a zero update; when
    any entry, or ``hyper_grads``, was not finite, the learning rate, ``pending``, the schedule
    value and Adam's count are kept and ``state.skipped`` counts the step (a NaN loss, which
    makes every entry NaN, gives exactly the exact rule's skip).

    Args:
      learning_rate: initial learning rate :math:`\alpha_0`, or a schedule :math:`s` (then
        :math:`\alpha_t = s(t)\,c_t` with an adapted factor :math:`c_t`, :math:`c_0 = 1`).
      hyper_lr: hypergradient step size :math:`\beta`: ``None`` for the default multiplicative
        rule; a number alone selects the additive rule (the paper uses ``1e-7`` on MNIST; its
        scale depends on the model, the loss and the rate).
      b1: decay of the first moment.
      b2: decay of the second moment.
      eps: term added to the denominator.
      multiplicative: the multiplicative rule (Adam-HDM); ``None``: multiplicative unless a
        ``hyper_lr`` is given.
      eps_root: term added inside the square root.
      mu_dtype: dtype of the first moment (default: that of the parameters, at least float32,
        as the second moment's: see mixed precision in :func:`hypergradient_lr`).
      nesterov: use the Nesterov (NAdam) direction of :func:`optax.scale_by_adam`.
      per_leaf: one learning rate per parameter leaf.
      lr_bounds: optional ``(lo, hi)`` clipping of the learning rate.
      lagged: the one-step-lagged rule above (not with ``nesterov``).
      safeguards: the overshoot safeguard of :func:`hypergradient_lr` (default ``True``;
        ``False``: the paper's rule as written).

    Returns:
      A :class:`optax.GradientTransformationExtraArgs` whose state is a
      :class:`HypergradientLRState` (``inner_state`` is :func:`optax.scale_by_adam`'s); the
      current learning rate is ``optax.tree_utils.tree_get(state, "learning_rate")``.

    Raises:
      ValueError: ``lagged`` with ``nesterov``, ``multiplicative=False`` without ``hyper_lr``,
        ``b1`` or ``b2`` outside ``[0, 1)``, or an invalid value (see :func:`hypergradient_lr`).

    Example:
      >>> import jax, jax.numpy as jnp, optax, bilevel
      >>> loss = lambda w: jnp.sum((w - 1.0) ** 2)
      >>> tx = bilevel.hd_adam(1e-3)  # instead of optax.adam(1e-3)
      >>> w = jnp.zeros(3)
      >>> state = tx.init(w)
      >>> @jax.jit
      ... def step(w, state):
      ...     updates, state = tx.update(jax.grad(loss)(w), state, w)
      ...     return optax.apply_updates(w, updates), state
      >>> for _ in range(200):
      ...     w, state = step(w, state)
      >>> print(bool(loss(w) < 1e-3))  # optax.adam(1e-3) moves w by at most 0.2 in 200 steps
      True
      >>> slower = bilevel.hd_adam(1e-3, hyper_lr=0.01, multiplicative=True)  # other beta
      >>> warm = bilevel.hd_adam(optax.linear_schedule(0.0, 1e-2, 100))

    References:
      Baydin et al., `Online Learning Rate Adaptation with Hypergradient Descent
      <https://arxiv.org/abs/1703.04782>`_, ICLR 2018 (additive and multiplicative rules);
      Kingma and Ba, `Adam <https://arxiv.org/abs/1412.6980>`_, ICLR 2015.
    """
    hyper_lr, multiplicative = _resolve_rule(
        hyper_lr, multiplicative, lagged, not nesterov, "hd_adam"
    )
    _check_probability_like("b1", b1)
    _check_probability_like("b2", b2)
    _check_nonnegative("eps", eps)
    _check_nonnegative("eps_root", eps_root)
    if not nesterov:
        return _recomputed_hd(
            _adam_direction(b1, b2, eps, eps_root, mu_dtype),
            learning_rate,
            hyper_lr,
            multiplicative,
            per_leaf=per_leaf,
            lr_bounds=lr_bounds,
            lagged=lagged,
            safeguards=safeguards,
        )
    return hypergradient_lr(
        optax.scale_by_adam(
            b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype, nesterov=nesterov
        ),
        learning_rate,
        hyper_lr,
        multiplicative,
        per_leaf=per_leaf,
        lr_bounds=lr_bounds,
        safeguards=safeguards,
    )


hd_sgd.__doc__ = hd_sgd.__doc__.replace("    {default}\n", _DEFAULT_DOC)
hd_adam.__doc__ = hd_adam.__doc__.replace("    {default}\n", _DEFAULT_DOC)
