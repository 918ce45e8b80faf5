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
from optax._src import numerics

from solvers import tree as T

__all__ = ["HypergradientLRState", "hd_adam", "hd_sgd", "hypergradient_lr"]


class HypergradientLRState(NamedTuple):
    """State of :func:`hypergradient_lr`.

    Attributes:
      count: number of ``update`` calls, int32 (saturates instead of overflowing).
      learning_rate: the current learning rate :math:`\\alpha_t`; a scalar, or with
        ``per_leaf=True`` a pytree of scalars shaped like the parameters. Stored in the widest
        floating dtype of the parameters, at least float32.
      prev_direction: the previous direction :math:`d_{t-1}` (zeros before the first step).
      skipped: number of steps whose gradient (or direction) was not finite, int32; on those steps
        neither ``learning_rate`` nor ``prev_direction`` changed.
      inner_state: the state of the wrapped direction transformation.
    """

    count: jax.Array
    learning_rate: Any
    prev_direction: optax.Updates
    skipped: jax.Array
    inner_state: optax.OptState


# ----------------------------------------------------------------------------- validation


def _concrete(value: Any) -> np.ndarray | None:
    """``value`` as a NumPy array, or None when it is traced (inside jit / vmap / grad)."""
    if isinstance(value, jax.core.Tracer):
        return None
    return np.asarray(value)


def _check_nonnegative(name: str, value: Any) -> None:
    concrete = _concrete(value)
    if concrete is None:
        return
    if not np.issubdtype(concrete.dtype, np.number) or np.iscomplexobj(concrete):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if np.any(~np.isfinite(concrete)) or np.any(concrete < 0):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")


def _check_bounds(name: str, bounds: Any) -> tuple[float | None, float | None] | None:
    """Validate a static ``(lo, hi)`` pair (either end may be None); returns it as floats."""
    if bounds is None:
        return None
    try:
        lo, hi = bounds
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair (lo, hi), got {bounds!r}") from None
    lo = None if lo is None else float(lo)
    hi = None if hi is None else float(hi)
    if lo is not None and hi is not None and not lo < hi:
        raise ValueError(f"{name} must satisfy lo < hi, got {bounds!r}")
    if (lo is not None and np.isnan(lo)) or (hi is not None and np.isnan(hi)):
        raise ValueError(f"{name} must not contain NaN, got {bounds!r}")
    return lo, hi


def _clip(x: jax.Array, bounds: tuple[float | None, float | None] | None) -> jax.Array:
    if bounds is None:
        return x
    lo, hi = bounds
    return jnp.clip(x, lo, hi)


# ----------------------------------------------------------------------------- tree helpers


def _lr_dtype(params: optax.Params) -> jnp.dtype:
    """Widest floating dtype among the leaves of ``params``, at least float32."""
    dtype = jnp.dtype(jnp.float32)
    for leaf in jax.tree.leaves(params):
        leaf_dtype = jnp.asarray(leaf).dtype
        if jnp.issubdtype(leaf_dtype, jnp.floating):
            dtype = jnp.promote_types(dtype, leaf_dtype)
    return dtype


def _hypergradient_stats(a, b, d, dtype, multiplicative):
    """``<a, b>`` (and ``||a||^2``, ``||b||^2`` for the multiplicative rule) over a pytree.

    ``a`` is the gradient, ``b`` the previous direction (always finite) and ``d`` the new
    direction. ``0 * d`` is added inside the same sum, so that one fused pass over memory yields
    the inner product and makes it non-finite exactly when ``a`` or ``d`` has a non-finite entry
    (``inf * 0`` is NaN), which is how non-finite steps are detected without extra passes.
    """
    dot = sq_a = sq_b = jnp.zeros((), dtype)
    for x, y, z in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(d), strict=True):
        x, y, z = x.astype(dtype), y.astype(dtype), z.astype(dtype)
        dot = dot + jnp.sum(x * y + 0 * z)
        if multiplicative:
            sq_a = sq_a + jnp.sum(x * x)
            sq_b = sq_b + jnp.sum(y * y)
    return dot, sq_a, sq_b


def _next_rate(lr, hyper_lr, a, b, d, multiplicative):
    """Candidate learning rate and whether the step is finite (see _hypergradient_stats)."""
    dot, sq_a, sq_b = _hypergradient_stats(a, b, d, lr.dtype, multiplicative)
    if multiplicative:
        # lr * (1 + hyper_lr * cos); lr unchanged when a norm is 0.
        denom = jnp.sqrt(sq_a) * jnp.sqrt(sq_b)
        positive = denom > 0
        cos = jnp.where(positive, dot / jnp.where(positive, denom, 1), 0)
        candidate = lr * (1 + hyper_lr * cos)
        finite = jnp.isfinite(dot) & jnp.isfinite(denom)
    else:
        candidate = lr + hyper_lr * dot
        finite = jnp.isfinite(dot)
    return candidate, finite & jnp.isfinite(candidate)


# ----------------------------------------------------------------------------- transforms


def hypergradient_lr(
    direction: optax.GradientTransformation,
    learning_rate: jax.typing.ArrayLike,
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

      \alpha_t = \alpha_{t-1} + \beta \langle g_t, d_{t-1} \rangle
      \quad\text{or (multiplicative)}\quad
      \alpha_t = \alpha_{t-1} \left(1 + \beta
        \frac{\langle g_t, d_{t-1} \rangle}{\|g_t\| \, \|d_{t-1}\|}\right),
      \qquad u_t = -\alpha_t d_t .

    :math:`-\langle g_t, d_{t-1}\rangle` is the derivative of the loss at the current parameters
    with respect to the learning rate used at the previous step. Inner products and norms run
    over the whole pytree (one global rate) unless ``per_leaf=True`` (one rate per leaf).
    The multiplicative rule leaves :math:`\alpha` unchanged when a norm is zero.

    Online validation hypergradient: ``update(grads, state, params, hyper_grads=val_grads)``
    uses the gradient of a held-out loss in place of :math:`g_t` in the rule above (the
    direction still comes from ``grads``).

    Non-finite gradients: on a step whose gradient (or ``hyper_grads``, or the new direction)
    is not finite, the learning rate keeps its value, the stored direction is kept, and
    ``state.skipped`` increments. The returned update is still :math:`-\alpha d_t` (wrap the
    optimizer in :func:`optax.apply_if_finite` to drop such steps altogether).

    The current learning rate is ``optax.tree_utils.tree_get(state, "learning_rate")``. Inside
    :func:`optax.inject_hyperparams` that name also denotes the injected *initial* value, so read
    ``optax.tree_utils.tree_get(state.inner_state, "learning_rate")`` there.

    Args:
      direction: an Optax transformation producing the direction :math:`d_t` from the gradient
        (``optax.identity()``, ``optax.trace(...)``, ``optax.scale_by_adam()``,
        ``optax.scale_by_rms()``, ``optax.scale_by_lion()``, ...). Extra keyword arguments of
        ``update`` are passed on to it.
      learning_rate: initial learning rate :math:`\alpha_0 \ge 0` (a number or a scalar array,
        which may be traced, e.g. under ``jax.vmap`` over a population of initial rates).
      hyper_lr: hypergradient step size :math:`\beta \ge 0` (0 gives the base optimizer).
      multiplicative: use the multiplicative (normalized) rule instead of the additive one.
      per_leaf: one learning rate per parameter leaf instead of one global rate.
      lr_bounds: optional ``(lo, hi)`` clipping of the learning rate after each update (either
        end may be ``None``).

    Returns:
      A :class:`optax.GradientTransformationExtraArgs` whose state is a
      :class:`HypergradientLRState`.

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
    _check_nonnegative("learning_rate", learning_rate)
    _check_nonnegative("hyper_lr", hyper_lr)
    lr_bounds = _check_bounds("lr_bounds", lr_bounds)
    if multiplicative:
        concrete = _concrete(learning_rate)
        if concrete is not None and np.any(concrete == 0):
            raise ValueError("a multiplicative rule cannot move a learning rate of 0")
    direction = optax.with_extra_args_support(direction)

    def init_fn(params):
        dtype = _lr_dtype(params)
        lr = jnp.asarray(learning_rate, dtype)
        if lr.shape != ():
            raise ValueError(f"learning_rate must be a scalar, got shape {lr.shape}")
        lr = _clip(lr, lr_bounds)
        if per_leaf:
            lr = jax.tree.map(lambda _: lr, params)
        return HypergradientLRState(
            count=jnp.zeros([], jnp.int32),
            learning_rate=lr,
            prev_direction=optax.tree.zeros_like(params),
            skipped=jnp.zeros([], jnp.int32),
            inner_state=direction.init(params),
        )

    def update_fn(updates, state, params=None, *, hyper_grads=None, **extra_args):
        grads = updates
        source = grads if hyper_grads is None else hyper_grads
        prev = state.prev_direction
        beta = jnp.asarray(hyper_lr)

        new_direction, inner_state = direction.update(
            grads, state.inner_state, params, **extra_args
        )

        # alpha_t from <g_t, d_{t-1}>, applied to this step's direction d_t.
        if per_leaf:
            lrs, treedef = jax.tree.flatten(state.learning_rate)
            results = [
                _next_rate(lr, beta.astype(lr.dtype), a, b, d, multiplicative)
                for lr, a, b, d in zip(
                    lrs,
                    treedef.flatten_up_to(source),
                    treedef.flatten_up_to(prev),
                    treedef.flatten_up_to(new_direction),
                    strict=True,
                )
            ]
            candidate = jax.tree.unflatten(treedef, [c for c, _ in results])
            finite = jnp.all(jnp.stack([f for _, f in results]))
        else:
            lr = state.learning_rate
            candidate, finite = _next_rate(
                lr, beta.astype(lr.dtype), source, prev, new_direction, multiplicative
            )
        candidate = jax.tree.map(lambda x: _clip(x, lr_bounds), candidate)
        if hyper_grads is not None:
            # a non-finite g_t already makes d_t, hence the fused sum, non-finite; this covers
            # directions that could map it to finite values.
            finite = finite & T.tree_all_finite(grads)
        lr = optax.tree.where(finite, candidate, state.learning_rate)

        if per_leaf:
            new_updates = jax.tree.map(lambda a, d: (-a * d).astype(d.dtype), lr, new_direction)
        else:
            new_updates = jax.tree.map(lambda d: (-lr * d).astype(d.dtype), new_direction)
        stored = optax.tree.where(finite, optax.tree.cast_like(new_direction, prev), prev)
        return new_updates, HypergradientLRState(
            count=numerics.safe_increment(state.count),
            learning_rate=lr,
            prev_direction=stored,
            skipped=jnp.where(finite, state.skipped, numerics.safe_increment(state.skipped)),
            inner_state=inner_state,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _is_python_zero(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and x == 0


def hd_sgd(
    learning_rate: jax.typing.ArrayLike,
    hyper_lr: jax.typing.ArrayLike,
    momentum: jax.typing.ArrayLike = 0.0,
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

    and :math:`\alpha_t = \alpha_{t-1} + \beta\langle g_t, d_{t-1}\rangle`,
    :math:`u_t = -\alpha_t d_t` (see :func:`hypergradient_lr` for the multiplicative rule, the
    per-leaf rates, the validation-gradient mode and non-finite handling).

    Args:
      learning_rate: initial learning rate :math:`\alpha_0`.
      hyper_lr: hypergradient step size :math:`\beta` (the paper uses ``1e-3`` on MNIST).
      momentum: :math:`\mu`. A Python ``0`` (the default, without Nesterov) keeps no momentum
        buffer; any other value, or an array (e.g. under :func:`optax.inject_hyperparams`),
        uses :func:`optax.trace`.
      nesterov: Nesterov momentum (SGDN-HD).
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
    if _is_python_zero(momentum) and not nesterov:
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


def _check_probability_like(name: str, value: Any) -> None:
    concrete = _concrete(value)
    if concrete is not None and np.any(~((concrete >= 0) & (concrete < 1))):
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def hd_adam(
    learning_rate: jax.typing.ArrayLike,
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

    and :math:`\alpha_t = \alpha_{t-1} + \beta\langle g_t, d_{t-1}\rangle`,
    :math:`u_t = -\alpha_t d_t` (see :func:`hypergradient_lr` for the multiplicative rule, the
    per-leaf rates, the validation-gradient mode and non-finite handling).

    Args:
      learning_rate: initial learning rate :math:`\alpha_0`.
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

    References:
      Baydin et al., `Online Learning Rate Adaptation with Hypergradient Descent
      <https://arxiv.org/abs/1703.04782>`_, ICLR 2018; Kingma and Ba, `Adam
      <https://arxiv.org/abs/1412.6980>`_, ICLR 2015.
    """
    _check_probability_like("b1", b1)
    _check_probability_like("b2", b2)
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
