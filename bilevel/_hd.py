"""Hypergradient-descent learning rates as drop-in Optax transformations.

Baydin, Cornish, Martinez Rubio, Schmidt and Wood, "Online Learning Rate Adaptation with
Hypergradient Descent", ICLR 2018, https://arxiv.org/abs/1703.04782.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import solvers
from solvers import checks

__all__ = ["HypergradientLRState", "hd_adam", "hd_sgd", "hypergradient_lr"]


class HypergradientLRState(NamedTuple):
    """State of :func:`hypergradient_lr`.

    Attributes:
      count: number of ``update`` calls (skipped ones included), int32, saturating.
      learning_rate: the current learning rate :math:`\\alpha_t`; a scalar, or with
        ``per_leaf=True`` a pytree of scalars shaped like the parameters. Stored in the widest
        floating dtype of the parameters, at least float32.
      prev_direction: the previous direction :math:`d_{t-1}` (zeros before the first step).
      skipped: number of steps that were not applied because something they produced was not
        finite, int32, saturating; such a step changed nothing but ``count`` and ``skipped``.
      inner_state: the state of the wrapped direction transformation.
      schedule_value: the value :math:`s(t)` of the learning-rate schedule at the last applied
        step (the constant initial rate when ``learning_rate`` is a number).
    """

    count: jax.Array
    learning_rate: Any
    prev_direction: optax.Updates
    skipped: jax.Array
    inner_state: optax.OptState
    schedule_value: jax.Array


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


def _hd_rate(lr, beta, dot, sq_a, sq_b, multiplicative):
    """The hypergradient-descent candidate for the learning rate (before schedule and clip)."""
    if not multiplicative:
        return lr + beta * dot
    # lr * (1 + beta * cos); lr unchanged when a norm is 0 (or overflows).
    denom = jnp.sqrt(sq_a) * jnp.sqrt(sq_b)
    usable = (denom > 0) & jnp.isfinite(denom)
    cos = jnp.where(usable, dot / jnp.where(usable, denom, 1), 0)
    return lr * (1 + beta * jnp.clip(cos, -1, 1))


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
    direction = optax.with_extra_args_support(direction)

    def schedule_value(count):
        return schedule(count) if schedule is not None else learning_rate

    def init_fn(params):
        dtype = _lr_dtype(params)
        s0 = jnp.asarray(schedule_value(0), dtype)
        if s0.shape != ():
            raise ValueError(f"learning_rate must be a scalar, got shape {s0.shape}")
        lr = _positive_clip(s0, lr_bounds)
        if per_leaf:
            lr = jax.tree.map(lambda _: lr, params)
        return HypergradientLRState(
            count=jnp.zeros([], jnp.int32),
            learning_rate=lr,
            prev_direction=optax.tree.zeros_like(params),
            skipped=jnp.zeros([], jnp.int32),
            inner_state=direction.init(params),
            schedule_value=s0,
        )

    def update_fn(updates, state, params=None, *, hyper_grads=None, **extra_args):
        grads = updates
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
        if per_leaf:
            rates, treedef = jax.tree.flatten(state.learning_rate)
            groups = [[i] for i in range(len(rates))]
            flat = treedef.flatten_up_to
        else:
            rates, treedef = [state.learning_rate], None
            groups = None
            flat = jax.tree.leaves
        a, b, d = flat(source), flat(state.prev_direction), flat(new_direction)
        sentinels = [d] if hyper_grads is None else [d, flat(grads)]
        groups = groups or [list(range(len(a)))]
        candidates, total = [], _zero_sum(inner_state, dtype)
        for lr, group in zip(rates, groups, strict=True):
            pick = lambda leaves, group=group: [leaves[i] for i in group]
            dot, sq_a, sq_b = _hypergradient_stats(
                pick(a), pick(b), [pick(z) for z in sentinels], dtype, multiplicative
            )
            rate = _hd_rate(lr, beta, dot, sq_a, sq_b, multiplicative)
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

        def step(rate, d):
            return jnp.where(ok, -rate * d, 0).astype(d.dtype)

        if per_leaf:
            new_updates = jax.tree.map(step, lr, new_direction)
        else:
            new_updates = jax.tree.map(lambda d: step(lr, d), new_direction)
        return new_updates, HypergradientLRState(
            count=optax.safe_increment(state.count),
            learning_rate=lr,
            prev_direction=prev,
            skipped=guarded.skipped,
            inner_state=inner_state,
            schedule_value=s,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def hd_sgd(
    learning_rate: optax.ScalarOrSchedule,
    hyper_lr: jax.typing.ArrayLike,
    momentum: jax.typing.ArrayLike | None = None,
    nesterov: bool = False,
    multiplicative: bool = False,
    *,
    per_leaf: bool = False,
    lr_bounds: tuple[float | None, float | None] | None = None,
    accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""SGD (plain, heavy-ball or Nesterov) with a hypergradient-descent learning rate (SGD-HD).

    Directions (:math:`\mu` = ``momentum``):

    .. math::

      d_t = g_t \ \text{(SGD)}, \quad
      v_t = \mu v_{t-1} + g_t,\ d_t = v_t \ \text{(heavy ball)}, \quad
      v_t = \mu v_{t-1} + g_t,\ d_t = g_t + \mu v_t \ \text{(Nesterov)},

    and :math:`\alpha_t = \Pi(\alpha_{t-1} + \beta\langle g_t, d_{t-1}\rangle)`,
    :math:`u_t = -\alpha_t d_t`, where :math:`\Pi` keeps the rate positive and within
    ``lr_bounds``. See :func:`hypergradient_lr` for the multiplicative rule, schedules, the
    per-leaf rates, the validation-gradient mode and non-finite steps (zero update, whole state
    kept, ``state.skipped`` counts them).

    Args:
      learning_rate: initial learning rate :math:`\alpha_0`, or a schedule.
      hyper_lr: hypergradient step size :math:`\beta` (the paper uses ``1e-3`` on MNIST).
      momentum: :math:`\mu \in [0, 1)`, or ``None`` (the default, as in :func:`optax.sgd`) for
        no momentum buffer; any number, ``0.0`` included, uses :func:`optax.trace`.
      nesterov: Nesterov momentum (SGDN-HD); needs a ``momentum``.
      multiplicative: multiplicative rule (SGD-HDM).
      per_leaf: one learning rate per parameter leaf.
      lr_bounds: optional ``(lo, hi)`` clipping of the learning rate.
      accumulator_dtype: dtype of the momentum buffer (default: that of the parameters).

    Returns:
      A :class:`optax.GradientTransformationExtraArgs`; the current learning rate is
      ``optax.tree_utils.tree_get(state, "learning_rate")``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, bilevel
      >>> loss = lambda w: jnp.sum((w - 1.0) ** 2)
      >>> tx = bilevel.hd_sgd(1e-3, hyper_lr=1e-2)
      >>> w = jnp.zeros(3)
      >>> state = tx.init(w)
      >>> for _ in range(100):
      ...     updates, state = tx.update(jax.grad(loss)(w), state, w)
      ...     w = optax.apply_updates(w, updates)
      >>> print(bool(loss(w) < 1e-3), optax.tree_utils.tree_get(state, "learning_rate") > 1e-3)
      True True

    References:
      Baydin et al., `Online Learning Rate Adaptation with Hypergradient Descent
      <https://arxiv.org/abs/1703.04782>`_, ICLR 2018.
    """
    if momentum is None:
        if nesterov:
            raise ValueError("nesterov=True needs a momentum (got momentum=None)")
        direction = optax.identity()
    else:
        _check_probability_like("momentum", momentum)
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
    )


def hd_adam(
    learning_rate: optax.ScalarOrSchedule,
    hyper_lr: jax.typing.ArrayLike,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    multiplicative: bool = False,
    *,
    eps_root: jax.typing.ArrayLike = 0.0,
    mu_dtype: Any | None = None,
    nesterov: bool = False,
    per_leaf: bool = False,
    lr_bounds: tuple[float | None, float | None] | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Adam with a hypergradient-descent learning rate (Adam-HD); a drop-in for ``optax.adam``.

    The direction is the bias-corrected Adam step of :func:`optax.scale_by_adam`,

    .. math::

      m_t = b_1 m_{t-1} + (1-b_1) g_t,\quad v_t = b_2 v_{t-1} + (1-b_2) g_t^2,\quad
      d_t = \frac{m_t / (1-b_1^t)}{\sqrt{v_t / (1-b_2^t) + \epsilon_{root}} + \epsilon},

    and :math:`\alpha_t = \Pi(\alpha_{t-1} + \beta\langle g_t, d_{t-1}\rangle)`,
    :math:`u_t = -\alpha_t d_t`, where :math:`\Pi` keeps the rate positive and within
    ``lr_bounds``. See :func:`hypergradient_lr` for the multiplicative rule, schedules, the
    per-leaf rates, the validation-gradient mode and non-finite steps: a NaN gradient, or a
    second moment overflowing to inf, gives a zero update and keeps the whole previous state
    (the moments included), counted in ``state.skipped``.

    Args:
      learning_rate: initial learning rate :math:`\alpha_0`, or a schedule :math:`s` (then
        :math:`\alpha_t = s(t)\,c_t` with an adapted factor :math:`c_t`, :math:`c_0 = 1`).
      hyper_lr: hypergradient step size :math:`\beta` (the paper uses ``1e-7`` on MNIST; the
        hypergradient of Adam is larger than that of SGD because :math:`d_t` is normalized).
      b1: decay of the first moment.
      b2: decay of the second moment.
      eps: term added to the denominator.
      multiplicative: multiplicative rule (Adam-HDM).
      eps_root: term added inside the square root.
      mu_dtype: dtype of the first moment.
      nesterov: use the Nesterov (NAdam) direction of :func:`optax.scale_by_adam`.
      per_leaf: one learning rate per parameter leaf.
      lr_bounds: optional ``(lo, hi)`` clipping of the learning rate.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs`; the current learning rate is
      ``optax.tree_utils.tree_get(state, "learning_rate")``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, bilevel
      >>> loss = lambda w: jnp.sum((w - 1.0) ** 2)
      >>> tx = bilevel.hd_adam(1e-3, hyper_lr=1e-3)  # instead of optax.adam(1e-3)
      >>> w = jnp.zeros(3)
      >>> state = tx.init(w)
      >>> for _ in range(200):
      ...     updates, state = tx.update(jax.grad(loss)(w), state, w)
      ...     w = optax.apply_updates(w, updates)
      >>> print(optax.tree_utils.tree_get(state, "learning_rate") > 1e-3)
      True
      >>> warm = bilevel.hd_adam(optax.linear_schedule(0.0, 1e-2, 100), hyper_lr=1e-4)

    References:
      Baydin et al., `Online Learning Rate Adaptation with Hypergradient Descent
      <https://arxiv.org/abs/1703.04782>`_, ICLR 2018; Kingma and Ba, `Adam
      <https://arxiv.org/abs/1412.6980>`_, ICLR 2015.
    """
    _check_probability_like("b1", b1)
    _check_probability_like("b2", b2)
    _check_nonnegative("eps", eps)
    _check_nonnegative("eps_root", eps_root)
    return hypergradient_lr(
        optax.scale_by_adam(
            b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype, nesterov=nesterov
        ),
        learning_rate,
        hyper_lr,
        multiplicative,
        per_leaf=per_leaf,
        lr_bounds=lr_bounds,
    )
