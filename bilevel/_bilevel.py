r"""The online bilevel optimizer: inner training steps alternating with hypergradient steps.

Notation: ``w`` the parameters, ``u`` the unconstrained hyperparameters, ``h = c(u)`` their
constrained values (:mod:`bilevel.hparams`), ``L_B(w, h)`` the inner (training) loss on batch ``B``
and ``L_V(w, h)`` the outer (validation) loss on the outer batch. Every hypergradient is taken with
respect to ``u``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.flatten_util import ravel_pytree

import solvers
from bilevel import hparams as hp
from solvers import tree as T

PyTree = Any


@dataclasses.dataclass(frozen=True, kw_only=True)
class Forward:
    r"""Online forward-mode hypergradient (RTHO; MARTHE when ``decay < 1``).

    Carries the tangent :math:`Z_t = d(w_t, s_t)/du` of the parameters and optimizer state through
    every inner step since the start of training, by ``jax.jvp`` of the full inner step
    :math:`(w, s) \leftarrow \Phi(w, s, u, B_t)`:

    .. math:: Z_t = \partial_{(w,s)}\Phi\; (\mu Z_{t-1}) + \partial_u \Phi, \qquad
       g = Z_w^\top \nabla_w L_V(w, h) + \nabla_u L_V(w, h)

    with :math:`\mu` = ``decay``. Costs one Jacobian-vector product per hyperparameter per inner
    step: meant for a few hyperparameters.

    Args:
      decay: tangent decay ``mu`` in ``(0, 1]``; 1 is RTHO (Franceschi et al., ICML 2017), ``< 1``
        is MARTHE (Donini et al., ICLR 2020).
    """

    decay: float = 1.0

    def __post_init__(self):
        if not (isinstance(self.decay, int | float) and 0 < self.decay <= 1):
            raise ValueError(f"Forward.decay must be in (0, 1], got {self.decay!r}")


Method = solvers.Implicit | solvers.Unrolled | solvers.Truncated | Forward


class BilevelState(NamedTuple):
    """State of :class:`BilevelOptimizer` (a pytree: jit, vmap and checkpoint it).

    Attributes:
      params: model parameters ``w``.
      inner_state: inner optimizer state.
      hparams: unconstrained hyperparameters ``u``.
      outer_state: outer optimizer state.
      method_state: per-method memory: the previous linear solution (Implicit), the tangents
        ``(Z_w, Z_s)`` (Forward), or ``()``.
      step: outer steps taken (int32).
      skipped: outer steps skipped because of a non-finite hypergradient (int32).
      inner_skipped: inner steps skipped because of a non-finite loss or gradient (int32).
      key: a PRNG key for the training loop's own use (data order, dropout); see
        :func:`minibatches`. Not consumed by :meth:`BilevelOptimizer.step`.
    """

    params: PyTree
    inner_state: PyTree
    hparams: PyTree
    outer_state: PyTree
    method_state: PyTree
    step: jax.Array
    skipped: jax.Array
    inner_skipped: jax.Array
    key: jax.Array


def _check_method(method: Any, inner_steps: int | None = None) -> None:
    if not isinstance(method, solvers.Implicit | solvers.Unrolled | solvers.Truncated | Forward):
        raise TypeError(
            "method must be solvers.Implicit(...), solvers.Unrolled(), solvers.Truncated(steps=K) "
            f"or bilevel.Forward(...), got {method!r}"
        )
    if (
        inner_steps is not None
        and isinstance(method, solvers.Truncated)
        and (method.steps > inner_steps)
    ):
        raise ValueError(
            f"Truncated(steps={method.steps}) cannot exceed inner_steps={inner_steps}: the online "
            "window is the current cycle of inner steps"
        )


def _loss_value(loss_fn, has_aux):
    """``(params, h, batch) -> (value, aux)`` whatever the user's convention."""
    if has_aux:
        return loss_fn
    return lambda p, h, b: (loss_fn(p, h, b), None)


def _check_scalar(value, name):
    if jnp.shape(value) != () or not jnp.issubdtype(jnp.result_type(value), jnp.floating):
        raise TypeError(
            f"{name} must return a real scalar, got shape {jnp.shape(value)} "
            f"dtype {jnp.result_type(value)}"
        )


def _call(loss_fn, name, space_keys):
    def call(p, h, b):
        try:
            value, aux = loss_fn(p, h, b)
        except KeyError as e:
            raise KeyError(
                f"{name} asked for hyperparameter {e} that the space lacks; the space has "
                f"{space_keys}"
            ) from None
        _check_scalar(value, name)
        return value, aux

    return call


class BilevelOptimizer:
    r"""Tune hyperparameters online: ``inner_steps`` training steps, then one hypergradient step.

    Each :meth:`step` runs ``inner_steps`` steps of ``inner_optimizer`` on
    ``inner_loss(params, h, batch)`` (one batch of ``inner_batches`` each), then one step of
    ``outer_optimizer`` on the unconstrained hyperparameters ``u`` along the hypergradient of
    ``outer_loss(params, h, outer_batch)``, computed by ``method``:

    - ``solvers.Implicit(linear_solver, warm_start=True)`` - implicit function theorem at the
      current iterate ``w``; the Hessian and mixed derivatives come from the **last inner batch**
      ``B``:

      .. math:: H v = \nabla_w L_V, \quad H = \nabla^2_{ww} L_B(w, c(u)),\qquad
         g = \nabla_u L_V - (\nabla^2_{uw} L_B)^\top v

      The solve starts from the previous step's ``v`` when ``warm_start``. With
      ``solvers.neumann(steps=1, scale=rho)`` this is the SOBA-style stochastic bilevel method
      (Dagreou et al., NeurIPS 2022): ``v`` moves by one step
      :math:`v \leftarrow v - \rho (H v - \nabla_w L_V)` per outer step.
    - ``solvers.Truncated(steps=K)`` - reverse mode through the last ``K`` inner steps of the
      cycle, with the parameters and optimizer state at the start of that window held constant
      (Shaban et al., AISTATS 2019). Biased towards short horizons (Wu et al., ICLR 2018): its
      fixed point is where the ``K``-step hypergradient vanishes, not the true optimum.
    - ``solvers.Unrolled()`` - the same with ``K = inner_steps``.
    - ``bilevel.Forward(decay)`` - forward mode through every inner step since the start
      (RTHO / MARTHE); see :class:`Forward`.

    Differentiating *through* inner steps (Truncated, Unrolled, Forward) differentiates the inner
    optimizer too: ``optax.adam`` with its default ``eps_root=0`` has an infinite derivative
    where a gradient entry is exactly zero (``sqrt`` at 0), which makes the hypergradient NaN and
    every outer step skipped (``metrics["skipped"]`` counts them). Use
    ``optax.adam(lr, eps_root=1e-8)`` there.

    Randomness (dropout, augmentation) reaches the losses inside the batch (the library-wide loss
    convention is ``loss(params, h, batch)``): put a key in each batch, e.g. with
    :func:`minibatches`. A non-finite inner step is not applied and a non-finite hypergradient
    step is skipped; both are counted in the state and metrics.

    Args:
      inner_loss: ``inner_loss(params, h, batch) -> scalar`` (``(scalar, aux)`` if ``has_aux``),
        ``h`` the constrained hyperparameters.
      outer_loss: ``outer_loss(params, h, batch) -> scalar`` (or ``(scalar, aux)``).
      inner_optimizer: Optax transformation for the parameters.
      outer_optimizer: Optax transformation for the unconstrained hyperparameters.
      space: hyperparameter space (pytree of :mod:`bilevel.hparams` specs).
      method: a strategy object (above).
      inner_steps: inner steps per outer step (``>= 1``).
      has_aux: the losses return ``(value, aux)``; the last aux values are in the metrics.

    Example:
      >>> import jax, jax.numpy as jnp, optax, solvers, bilevel
      >>> X, y = jax.random.normal(jax.random.PRNGKey(0), (64, 5)), jnp.ones(64)
      >>> inner = lambda w, h, b: jnp.mean((b[0] @ w - b[1]) ** 2) + h["wd"] * jnp.sum(w ** 2)
      >>> outer = lambda w, h, b: jnp.mean((b[0] @ w - b[1]) ** 2)
      >>> opt = bilevel.BilevelOptimizer(
      ...     inner, outer, inner_optimizer=optax.sgd(0.1), outer_optimizer=optax.adam(0.05),
      ...     space={"wd": bilevel.hparams.log(0.1)}, method=solvers.Implicit(), inner_steps=5)
      >>> state = opt.init(jnp.zeros(5))
      >>> batches = (jnp.stack([X[:32]] * 5), jnp.stack([y[:32]] * 5))
      >>> state, metrics = jax.jit(opt.step)(state, batches, (X[32:], y[32:]))
      >>> metrics["linear_converged"].item(), opt.hparams(state)["wd"].shape
      (True, ())

    References: Pedregosa, ICML 2016; Lorraine et al., AISTATS 2020 (implicit); Shaban et al.,
    AISTATS 2019 (truncated); Franceschi et al., ICML 2017 and Donini et al., ICLR 2020 (forward);
    Dagreou et al., NeurIPS 2022 (SOBA).
    """

    def __init__(
        self,
        inner_loss: Callable,
        outer_loss: Callable,
        *,
        inner_optimizer: optax.GradientTransformation,
        outer_optimizer: optax.GradientTransformation,
        space: PyTree,
        method: Method,
        inner_steps: int,
        has_aux: bool = False,
    ):
        if not callable(inner_loss) or not callable(outer_loss):
            raise TypeError("inner_loss and outer_loss must be callables (params, h, batch)")
        for name, o in (("inner_optimizer", inner_optimizer), ("outer_optimizer", outer_optimizer)):
            if not isinstance(o, optax.GradientTransformation):
                raise TypeError(f"{name} must be an optax.GradientTransformation, got {o!r}")
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(f"inner_steps must be an int >= 1, got {inner_steps!r}")
        _check_method(method, inner_steps)
        self._u0 = hp.init(space)  # validates the space
        self.space = space
        self.method = method
        self.inner_steps = inner_steps
        self.has_aux = has_aux
        self.inner_optimizer = optax.with_extra_args_support(inner_optimizer)
        self.outer_optimizer = outer_optimizer
        keys = sorted(str(k) for k in (space.keys() if isinstance(space, dict) else []))
        self._inner = _call(_loss_value(inner_loss, has_aux), "inner_loss", keys)
        self._outer = _call(_loss_value(outer_loss, has_aux), "outer_loss", keys)

    # ------------------------------------------------------------------ public API

    def init(
        self, params: PyTree, hparams: PyTree | None = None, key: jax.Array | None = None
    ) -> BilevelState:
        """The initial state.

        Args:
          params: initial parameters.
          hparams: optional **unconstrained** hyperparameters (default: the space's initial
            values). Pass one per population member under ``jax.vmap``; build them from values
            with ``bilevel.hparams.unconstrain``.
          key: PRNG key stored in the state for the training loop (default ``PRNGKey(0)``).

        Returns:
          A :class:`BilevelState`.
        """
        params = jax.tree.map(jnp.asarray, params)
        for leaf in jax.tree.leaves(params):
            if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
                raise TypeError(f"params must have floating leaves, got {T.describe(params)}")
        if hparams is None:
            u = self._u0
        else:
            hp.constrain(self.space, hparams)  # structure and shape check, names the entry
            u = jax.tree.map(lambda a, ref: jnp.asarray(a, ref.dtype), hparams, self._u0)
            # NumPy, not jnp: inside an outer jit even concrete values would be staged out.
            if T.is_concrete(u) and not all(
                np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(u)
            ):
                raise ValueError("hparams contains non-finite values")
        if isinstance(self.method, solvers.Implicit):
            method_state = T.tree_zeros_like(params)
        elif isinstance(self.method, Forward):
            m = ravel_pytree(u)[0].size
            inner_state = self.inner_optimizer.init(params)
            zp = jax.tree.map(lambda a: jnp.zeros((m, *jnp.shape(a)), a.dtype), params)
            zs = [jnp.zeros((m, *jnp.shape(a)), a.dtype) for a in _float_leaves(inner_state)]
            method_state = (zp, zs)
        else:
            method_state = ()
        key = jax.random.PRNGKey(0) if key is None else key
        zero = jnp.asarray(0, jnp.int32)
        return BilevelState(
            params,
            self.inner_optimizer.init(params),
            u,
            self.outer_optimizer.init(u),
            method_state,
            zero,
            zero,
            zero,
            key,
        )

    def hparams(self, state: BilevelState) -> PyTree:
        """Constrained hyperparameter values of ``state``."""
        return hp.constrain(self.space, state.hparams)

    def params(self, state: BilevelState) -> PyTree:
        """Model parameters of ``state``."""
        return state.params

    def step(
        self, state: BilevelState, inner_batches: PyTree, outer_batch: PyTree
    ) -> tuple[BilevelState, dict[str, Any]]:
        """One outer step: ``inner_steps`` inner steps, then one hypergradient step.

        Args:
          state: current state.
          inner_batches: pytree whose leaves have a leading axis of length ``inner_steps`` (one
            batch per inner step), or of length 1: one batch (e.g. the full training set) reused
            by every inner step without copying it.
          outer_batch: one validation batch.

        Returns:
          ``(state, metrics)``; metrics: ``inner_loss`` (mean over the cycle), ``outer_loss``,
          ``hypergrad`` (w.r.t. the unconstrained hyperparameters) and ``hypergrad_norm``, ``linear_iterations`` / ``linear_residual`` /
          ``linear_converged`` (Implicit; 0 / 0 / True otherwise), ``hparams`` (after the
          update), ``skipped`` / ``inner_skipped`` (cumulative counts), and ``inner_aux`` /
          ``outer_aux`` with ``has_aux``.
        """
        self._check_batches(inner_batches)
        method = self.method
        if isinstance(method, solvers.Implicit):
            out = self._step_implicit(state, inner_batches, outer_batch)
        elif isinstance(method, Forward):
            out = self._step_forward(state, inner_batches, outer_batch)
        else:
            k = self.inner_steps if isinstance(method, solvers.Unrolled) else method.steps
            out = self._step_truncated(state, inner_batches, outer_batch, k)
        params, inner_state, inner_losses, n_bad, g, outer_value, method_state, lin, aux = out
        state = state._replace(
            params=params,
            inner_state=inner_state,
            method_state=method_state,
            inner_skipped=state.inner_skipped + n_bad,
        )
        return self._apply_hypergradient(state, g, outer_value, inner_losses, lin, aux)

    # ------------------------------------------------------------------ internals

    def _check_batches(self, inner_batches):
        leaves = jax.tree.leaves(inner_batches)
        if not leaves:
            raise ValueError("inner_batches is empty")
        for leaf in leaves:
            if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] not in (self.inner_steps, 1):
                raise ValueError(
                    f"every leaf of inner_batches needs a leading axis of length inner_steps="
                    f"{self.inner_steps} (or 1: one batch reused by every inner step); got "
                    f"shapes {jax.tree.map(jnp.shape, inner_batches)}"
                )
        if len({jnp.shape(leaf)[0] for leaf in leaves}) > 1:
            raise ValueError(
                "the leaves of inner_batches disagree on their leading axis: "
                f"{jax.tree.map(jnp.shape, inner_batches)}"
            )

    def _inner_update(self, params, inner_state, u, batch):
        """One guarded inner step: returns new params/state, loss, whether it was applied."""
        return _guarded_step(
            self._inner,
            self.inner_optimizer,
            params,
            inner_state,
            hp.constrain(self.space, u),
            batch,
        )

    def _run_inner(self, params, inner_state, u, batches, length):
        def body(carry, batch):
            p, s = carry
            p, s, value, ok = self._inner_update(p, s, u, batch)
            return (p, s), (value, ok)

        (params, inner_state), (values, oks) = _scan_batches(
            body, (params, inner_state), batches, length
        )
        return params, inner_state, values, jnp.sum(~oks).astype(jnp.int32)

    def _outer_grads(self, params, u, outer_batch):
        def f(p, u):
            return self._outer(p, hp.constrain(self.space, u), outer_batch)

        (value, aux), (g_w, g_u) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, u)
        return value, aux, g_w, g_u

    def _step_implicit(self, state, inner_batches, outer_batch):
        u = state.hparams
        params, inner_state, values, n_bad = self._run_inner(
            state.params, state.inner_state, u, inner_batches, self.inner_steps
        )
        last = jax.tree.map(lambda a: a[-1], inner_batches)
        g, v, stats, outer_value, outer_aux = implicit_hypergradient(
            lambda p, u, b: self._inner(p, hp.constrain(self.space, u), b)[0],
            lambda p, u, b: self._outer(p, hp.constrain(self.space, u), b),
            params,
            u,
            last,
            outer_batch,
            self.method.linear_solver,
            init=state.method_state if self.method.warm_start else None,
        )
        inner_aux = self._inner(params, hp.constrain(self.space, u), last)[1]
        return (
            params,
            inner_state,
            values,
            n_bad,
            g,
            outer_value,
            v,
            stats,
            (inner_aux, outer_aux),
        )

    def _step_truncated(self, state, inner_batches, outer_batch, k):
        u = state.hparams
        n = self.inner_steps
        head = _window(inner_batches, 0, n - k)
        tail = _window(inner_batches, n - k, n)
        params, inner_state, head_values, head_bad = self._run_inner(
            state.params, state.inner_state, u, head, n - k
        )
        params, inner_state = lax.stop_gradient((params, inner_state))

        def window(u):
            p, s, values, bad = self._run_inner(params, inner_state, u, tail, k)
            value, aux = self._outer(p, hp.constrain(self.space, u), outer_batch)
            return value, (p, s, values, bad, aux)

        (outer_value, (p, s, values, bad, outer_aux)), g = jax.value_and_grad(window, has_aux=True)(
            u
        )
        values = jnp.concatenate([head_values, values])
        inner_aux = self._inner(
            p, hp.constrain(self.space, u), jax.tree.map(lambda a: a[-1], inner_batches)
        )[1]
        return (p, s, values, head_bad + bad, g, outer_value, (), None, (inner_aux, outer_aux))

    def _step_forward(self, state, inner_batches, outer_batch):
        u = state.hparams
        u_flat, unravel_u = ravel_pytree(u)
        m = u_flat.size
        eye = jnp.eye(m, dtype=u_flat.dtype)
        decay = self.method.decay

        def body(carry, batch):
            p, s, zp, zs = carry
            s_leaves, s_tree = jax.tree.flatten(s)
            mask = [_is_float(a) for a in s_leaves]

            def phi(p, s_float, uf):
                it = iter(s_float)
                full = jax.tree.unflatten(
                    s_tree, [next(it) if f else a for a, f in zip(s_leaves, mask, strict=True)]
                )
                p2, s2, value, ok = self._inner_update(p, full, unravel_u(uf), batch)
                return (p2, _float_leaves(s2)), (s2, value, ok)

            (p2, _), lin, (s2, value, ok) = jax.linearize(
                phi, p, _float_leaves(s), u_flat, has_aux=True
            )
            zp2, zs2 = jax.vmap(lin)(T.tree_scale(decay, zp), T.tree_scale(decay, zs), eye)
            # A skipped (non-finite) inner step leaves the tangents as they were.
            zp2 = T.tree_select(ok, zp2, zp)
            zs2 = T.tree_select(ok, zs2, zs)
            return (p2, s2, zp2, zs2), (value, ok)

        zp, zs = state.method_state
        (p, s, zp, zs), (values, oks) = _scan_batches(
            body, (state.params, state.inner_state, zp, zs), inner_batches, self.inner_steps
        )
        outer_value, outer_aux, g_w, g_u = self._outer_grads(p, u, outer_batch)
        # g = Z_w^T grad_w L_V + grad_u L_V, one entry per hyperparameter direction.
        g_flat = jax.vmap(lambda z: T.tree_vdot(z, g_w))(zp) + ravel_pytree(g_u)[0]
        g = unravel_u(g_flat.astype(u_flat.dtype))
        inner_aux = self._inner(
            p, hp.constrain(self.space, u), jax.tree.map(lambda a: a[-1], inner_batches)
        )[1]
        return (
            p,
            s,
            values,
            jnp.sum(~oks).astype(jnp.int32),
            g,
            outer_value,
            (zp, zs),
            None,
            (inner_aux, outer_aux),
        )

    def _apply_hypergradient(self, state, g, outer_value, inner_losses, stats, aux):
        ok = T.tree_all_finite(g) & jnp.isfinite(outer_value)
        g_safe = T.tree_select(ok, g, T.tree_zeros_like(g))
        updates, outer_state = self.outer_optimizer.update(g_safe, state.outer_state, state.hparams)
        u = optax.apply_updates(state.hparams, updates)
        finite_u = T.tree_all_finite(u)
        ok = ok & finite_u
        u = T.tree_select(ok, u, state.hparams)
        outer_state = T.tree_select(ok, outer_state, state.outer_state)
        skipped = state.skipped + (~ok).astype(jnp.int32)
        state = state._replace(
            hparams=u, outer_state=outer_state, step=state.step + 1, skipped=skipped
        )
        if stats is None:
            stats = solvers.SolveStats(
                jnp.asarray(0, jnp.int32), jnp.zeros((), T.result_dtype(g)), jnp.asarray(True)
            )
        metrics = {
            "inner_loss": jnp.mean(inner_losses),
            "outer_loss": outer_value,
            "hypergrad_norm": T.tree_norm(g),
            "hypergrad": g,
            "linear_iterations": stats.iterations,
            "linear_residual": stats.residual,
            "linear_converged": stats.converged,
            "hparams": self.hparams(state),
            "skipped": skipped,
            "inner_skipped": state.inner_skipped,
        }
        if self.has_aux:
            metrics["inner_aux"], metrics["outer_aux"] = aux
        return state, metrics


def _scan_batches(body, carry, batches, length):
    """``lax.scan`` over stacked batches, or over ``length`` steps of one batch (leading axis 1)."""
    if jnp.shape(jax.tree.leaves(batches)[0])[0] == 1 and length != 1:
        batch = jax.tree.map(lambda a: a[0], batches)
        return lax.scan(lambda c, _: body(c, batch), carry, None, length=length)
    return lax.scan(body, carry, batches)


def _window(batches, start, stop):
    """Inner steps ``start:stop`` of stacked batches (a shared batch is its own window)."""
    if jnp.shape(jax.tree.leaves(batches)[0])[0] == 1:
        return batches
    return jax.tree.map(lambda a: a[start:stop], batches)


def _guarded_step(inner, optimizer, params, opt_state, h, batch):
    """One inner optimizer step on ``inner(params, h, batch)``, not applied if non-finite.

    Returns ``(params, opt_state, loss, applied)``.
    """
    (value, _), grad = jax.value_and_grad(inner, has_aux=True)(params, h, batch)
    value_fn = lambda p: inner(p, h, batch)[0]
    updates, new_state = optimizer.update(
        grad, opt_state, params, value=value, grad=grad, value_fn=value_fn
    )
    new_params = optax.apply_updates(params, updates)
    ok = jnp.isfinite(value) & T.tree_all_finite(grad) & T.tree_all_finite(new_params)
    return (
        T.tree_select(ok, new_params, params),
        T.tree_select(ok, new_state, opt_state),
        value,
        ok,
    )


def _is_float(a) -> bool:
    return jnp.issubdtype(jnp.result_type(a), jnp.inexact)


def _float_leaves(tree) -> list:
    return [a for a in jax.tree.leaves(tree) if _is_float(a)]


def implicit_hypergradient(
    inner_loss: Callable,
    outer_loss: Callable,
    params: PyTree,
    hparams: PyTree,
    inner_batch: PyTree,
    outer_batch: PyTree,
    linear_solver: solvers.LinearSolver,
    init: PyTree | None = None,
):
    r"""Implicit hypergradient at ``params`` with the linear solve's diagnostics.

    .. math:: H v = \nabla_w L_V, \quad H = \nabla^2_{ww} L_B(w, h), \qquad
       g = \nabla_h L_V - (\nabla^2_{hw} L_B)^\top v

    Returns:
      ``(g, v, stats, outer_value, outer_aux)``.
    """

    def outer(p, h):
        return outer_loss(p, h, outer_batch)

    (outer_value, outer_aux), (g_w, g_h) = jax.value_and_grad(outer, argnums=(0, 1), has_aux=True)(
        params, hparams
    )
    optimality = lambda p, h: jax.grad(inner_loss)(p, h, inner_batch)
    (mixed,), v, stats = solvers.root_vjp(
        optimality, params, (hparams,), g_w, linear_solver, init=init
    )
    g = jax.tree.map(jnp.add, g_h, mixed)
    return g, v, stats, outer_value, outer_aux


class HypergradientInfo(NamedTuple):
    """Backward diagnostics of :func:`hypergradient`.

    Attributes:
      linear_iterations: iterations of the linear solve (Implicit; 0 otherwise).
      linear_residual: its relative residual (Implicit; 0 otherwise).
      status: ``solvers.Status``: ``SUCCESS``, ``MAX_STEPS`` (the linear solve did not reach its
        tolerance) or ``NONFINITE`` (the hypergradient is not finite).
      linear_solution: the adjoint ``v`` (Implicit; ``None`` otherwise), to warm-start.
    """

    linear_iterations: jax.Array
    linear_residual: jax.Array
    status: jax.Array
    linear_solution: PyTree


def hypergradient(
    inner_loss: Callable,
    outer_loss: Callable,
    params: PyTree,
    hparams: PyTree,
    inner_batch: PyTree,
    outer_batch: PyTree,
    *,
    method: Method | None = None,
    inner_optimizer: optax.GradientTransformation | None = None,
    return_info: bool = False,
):
    r"""One-shot hypergradient :math:`d L_V / d h` at given parameters.

    - ``solvers.Implicit(linear_solver)``: at ``params`` (assumed to minimize ``inner_loss`` on
      ``inner_batch``),

      .. math:: H v = \nabla_w L_V, \quad H = \nabla^2_{ww} L_B(w, h), \qquad
         g = \nabla_h L_V - (\nabla^2_{hw} L_B)^\top v

    - ``solvers.Unrolled()`` / ``solvers.Truncated(steps=K)`` / ``bilevel.Forward()``: run one
      ``inner_optimizer`` step per leading entry of ``inner_batch`` (stacked batches) from
      ``params`` and a fresh optimizer state, then differentiate ``L_V`` at the end w.r.t. ``h``
      through all steps (reverse mode), the last ``K`` (reverse mode), or all (forward mode).

    Args:
      inner_loss, outer_loss: ``loss(params, h, batch) -> scalar``.
      params: parameters.
      hparams: hyperparameter values ``h`` (the loss convention's constrained values; the
        gradient is w.r.t. these).
      inner_batch: the batch defining the Hessian (Implicit), or stacked batches.
      outer_batch: validation batch.
      method: strategy (default ``solvers.Implicit()``).
      inner_optimizer: Optax transformation, required by the unrolled methods.
      return_info: also return :class:`HypergradientInfo`.

    Returns:
      ``g`` shaped like ``hparams``, or ``(g, info)``.

    Example:
      >>> import jax.numpy as jnp, bilevel
      >>> inner = lambda w, h, b: jnp.sum((w - b) ** 2) + h * jnp.sum(w ** 2)
      >>> outer = lambda w, h, b: jnp.sum((w - b) ** 2)
      >>> w = jnp.ones(2) / 1.5                                  # argmin at h = 0.5, b = 1
      >>> float(bilevel.hypergradient(inner, outer, w, 0.5, jnp.ones(2), jnp.ones(2)))
      0.5925...
    """
    method = solvers.Implicit() if method is None else method
    _check_method(method)
    inner = _call(_loss_value(inner_loss, False), "inner_loss", [])
    outer = _call(_loss_value(outer_loss, False), "outer_loss", [])
    if isinstance(method, solvers.Implicit):
        g, v, stats, _, _ = implicit_hypergradient(
            lambda p, h, b: inner(p, h, b)[0],
            outer,
            params,
            hparams,
            inner_batch,
            outer_batch,
            method.linear_solver,
        )
        status = jnp.where(stats.converged, solvers.Status.SUCCESS, solvers.Status.MAX_STEPS)
        info = HypergradientInfo(stats.iterations, stats.residual, status, v)
    else:
        if not isinstance(inner_optimizer, optax.GradientTransformation):
            raise TypeError(
                f"{type(method).__name__} needs inner_optimizer= (an Optax "
                "transformation) to run the inner steps"
            )
        leaves = jax.tree.leaves(inner_batch)
        n = jnp.shape(leaves[0])[0] if leaves and jnp.ndim(leaves[0]) else 0
        if n < 1 or any(jnp.ndim(a) == 0 or jnp.shape(a)[0] != n for a in leaves):
            raise ValueError(
                "unrolled methods take inner_batch as stacked batches: every leaf "
                "needs the same leading axis (one entry per inner step)"
            )
        k = method.steps if isinstance(method, solvers.Truncated) else n
        if k > n:
            raise ValueError(f"Truncated(steps={k}) needs at least {k} stacked inner batches")
        opt = optax.with_extra_args_support(inner_optimizer)

        def run(p, s, h, batches):
            def body(c, b):
                p, s, _, _ = _guarded_step(inner, opt, *c, h, b)
                return (p, s), None

            return lax.scan(body, (p, s), batches)[0]

        head = jax.tree.map(lambda a: a[: n - k], inner_batch)
        tail = jax.tree.map(lambda a: a[n - k :], inner_batch)
        p0, s0 = lax.stop_gradient(run(params, opt.init(params), lax.stop_gradient(hparams), head))

        def val(h):
            p, _ = run(p0, s0, h, tail)
            return outer(p, h, outer_batch)[0]

        if isinstance(method, Forward):
            h_flat, unravel = ravel_pytree(hparams)
            g = unravel(jax.jacfwd(lambda hf: val(unravel(hf)))(h_flat))
        else:
            g = jax.grad(val)(hparams)
        zero = jnp.zeros((), T.result_dtype(g))
        info = HypergradientInfo(
            jnp.asarray(0, jnp.int32), zero, jnp.asarray(solvers.Status.SUCCESS, jnp.int32), None
        )
    finite = T.tree_all_finite(g)
    info = info._replace(
        status=jnp.where(finite, info.status, solvers.Status.NONFINITE).astype(jnp.int32)
    )
    return (g, info) if return_info else g
