"""``argmin``: minimize with any Optax optimizer, differentiably w.r.t. the objective's arguments.

How the solution is differentiated is a strategy object (an *adjoint*), not a flag:

- :class:`Implicit`: implicit function theorem at the returned point (the steps are not
  differentiated; memory independent of the number of steps). Forward and reverse mode.
- :class:`Unrolled`: differentiate through every step (reverse mode stores every step unless
  ``checkpoint_every`` rematerializes segments). Forward and reverse mode.
- :class:`Truncated`: differentiate through the last ``K`` steps only (earlier steps held constant).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from solvers import checks
from solvers import tree as T
from solvers._methods import AbstractMethod, Implicit, InnerLoop
from solvers._status import Status, error_if_failed, guard

PyTree = Any


class ArgminInfo(NamedTuple):
    """Forward diagnostics of :func:`argmin`.

    Attributes:
      steps: optimizer steps taken (int32).
      grad_norm: norm of the gradient at the returned parameters.
      value: objective at the returned parameters.
      status: a :class:`Status` code (int32).
    """

    steps: jax.Array
    grad_norm: jax.Array
    value: jax.Array
    status: jax.Array


# ----------------------------------------------------------------------------- argmin


class _Carry(NamedTuple):
    params: PyTree
    opt_state: PyTree
    value: jax.Array
    grad: PyTree
    grad_norm: jax.Array
    steps: jax.Array
    status: jax.Array
    forced: jax.Array  # a differentiated window always runs its steps (no early stop at tol)


class _ArgminLoop(InnerLoop):
    """``argmin``'s optimizer loop as an :class:`InnerLoop` over ``theta = args``."""

    def __init__(self, fun, optimizer, steps, tol):
        self.fun, self.opt, self.num_steps, self.tol = fun, optimizer, steps, tol

    def curvature_args(self, theta):
        """``fun``'s arguments after ``params``: a ``GaussNewton``'s pieces take the same."""
        return tuple(theta)

    def evaluate(self, params, opt_state, steps, status, forced, args):
        value, grad = jax.value_and_grad(self.fun)(params, *args)
        return _Carry(params, opt_state, value, grad, T.tree_norm(grad), steps, status, forced)

    def start(self, params, args):
        zero = jnp.asarray(0, jnp.int32)
        c = self.evaluate(
            params,
            self.opt.init(params),
            zero,
            jnp.asarray(Status.SUCCESS, jnp.int32),
            jnp.asarray(False),
            args,
        )
        finite = jnp.isfinite(c.value) & jnp.isfinite(c.grad_norm)
        return c._replace(status=jnp.where(finite, c.status, Status.NONFINITE).astype(jnp.int32))

    def running(self, c, limit):
        go = (c.steps < limit) & (c.status == Status.SUCCESS)
        if self.tol is not None:
            go &= c.forced | (c.grad_norm > self.tol)
        return go

    def _update(self, c, args):
        value_fn = lambda p: self.fun(p, *args)
        updates, opt_state = self.opt.update(
            c.grad, c.opt_state, c.params, value=c.value, grad=c.grad, value_fn=value_fn
        )
        params = optax.apply_updates(c.params, updates)
        new = self.evaluate(params, opt_state, c.steps + 1, c.status, c.forced, args)
        # One rule for every step: applied only if the new point, its optimizer state, value
        # and gradient are finite; otherwise the run stops at the last finite iterate.
        r = guard(c, new, jnp.asarray(0, jnp.int32))
        return r.value._replace(
            status=jnp.where(r.applied, new.status, Status.NONFINITE).astype(jnp.int32)
        )

    def step(self, c, args, x):
        del x
        new = self._update(c, args)
        return optax.tree.where(self.running(c, self.num_steps), new, c), None

    def run(self, carry, theta, start, stop, *, differentiable=True, checkpoint_every=None):
        if differentiable:
            return super().run(carry, theta, start, stop, checkpoint_every=checkpoint_every)
        c = lax.while_loop(lambda c: self.running(c, stop), lambda c: self._update(c, theta), carry)
        return c, None

    def scan(self, body, init, start, stop, checkpoint_every=None):
        c, _ = super().scan(body, init, start, stop, checkpoint_every)
        return c, None

    def restart(self, c, args, start):
        # Recompute the value and gradient with the differentiable args; a window that starts
        # after step 0 (Truncated) always runs its steps.
        status = jnp.where(c.status == Status.NONFINITE, c.status, Status.SUCCESS)
        fresh = self.evaluate(c.params, c.opt_state, c.steps, status, jnp.asarray(start > 0), args)
        return fresh

    def params(self, c):
        return c.params

    def replace_params(self, c, params):
        return c._replace(params=params)

    def optimality(self, params, args):
        return jax.grad(self.fun)(params, *args)


def _validate(fun, init_params, args, optimizer, steps, tol, adjoint) -> tuple[int, float | None]:
    if not callable(fun):
        raise TypeError(f"fun must be callable, got {fun!r}")
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(f"optimizer must be an optax.GradientTransformation, got {optimizer!r}")
    steps = checks.integer("steps", steps)
    tol = checks.optional_number("tol", tol, low=0.0)
    if not isinstance(adjoint, AbstractMethod):
        raise TypeError(
            "adjoint must be a method such as solvers.Implicit(...), solvers.Unrolled(...), "
            f"solvers.Truncated(steps=K) or solvers.Forward(), got {adjoint!r}"
        )
    adjoint.validate(steps)
    leaves = jax.tree.leaves(init_params)
    if not leaves:
        raise ValueError("init_params must contain at least one array")
    for leaf in leaves:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise TypeError(f"init_params must have floating leaves, got {T.describe(init_params)}")
    out = jax.eval_shape(fun, init_params, *args)
    if not (
        isinstance(out, jax.ShapeDtypeStruct)
        and out.shape == ()
        and jnp.issubdtype(out.dtype, jnp.floating)
    ):
        raise TypeError(
            f"fun(params, *args) must return a real scalar, got {jax.tree.map(str, out)}"
        )
    for name, tree in (("init_params", init_params), ("args", args)):
        if T.is_concrete(tree):
            floats = [
                x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
            ]
            # NumPy, not jnp: under an outer jit even concrete values would be staged out.
            if not all(np.isfinite(np.asarray(x)).all() for x in floats):
                raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return steps, tol


def argmin(
    fun: Callable[..., jax.Array],
    init_params: PyTree,
    *args: Any,
    optimizer: optax.GradientTransformation,
    steps: int,
    tol: float | None = None,
    adjoint: AbstractMethod | None = None,
    return_info: bool = False,
    throw: bool = False,
):
    r"""Minimize ``fun(params, *args)`` over ``params`` with an Optax optimizer, differentiably.

    .. math:: w^*(\theta) = \arg\min_w f(w, \theta), \qquad
       \frac{dw^*}{d\theta} = -\left(\nabla^2_{ww} f\right)^{-1} \nabla^2_{w\theta} f
       \quad\text{(Implicit)}

    Runs at most ``steps`` optimizer steps, stopping early once ``||grad|| <= tol``. Every step
    passes ``value``, ``grad`` and ``value_fn`` as extra arguments, so line-search optimizers such as
    ``optax.lbfgs()`` work as they are. A step whose loss, gradient, parameters or optimizer state
    is not finite is not applied (:func:`solvers.guard`): the run stops at the last finite iterate
    with ``status = Status.NONFINITE``. The result is differentiable w.r.t. ``*args`` (and anything
    ``fun`` closes over) as the ``adjoint`` method says, and w.r.t. ``init_params`` under
    :class:`Unrolled` and :class:`Forward` (MAML); ``init_params`` gets no derivative under
    :class:`Implicit` (the solution does not depend on it) nor :class:`Truncated` (the window's
    start is held constant).

    :class:`Unrolled`, :class:`Truncated` and :class:`Forward` differentiate the optimizer itself:
    use ``optax.adam(lr, eps_root=1e-8)`` rather than the default ``eps_root=0``, whose ``sqrt``
    has an infinite derivative where a gradient entry is exactly zero.

    Args:
      fun: scalar objective ``fun(params, *args)``.
      init_params: starting point (pytree of floating arrays).
      *args: differentiable arguments (hyperparameters, data).
      optimizer: any ``optax.GradientTransformation``.
      steps: maximum number of optimizer steps (``>= 1``; NumPy/JAX integers are fine).
      tol: stop when the gradient norm is ``<= tol`` (``None``: run all steps).
      adjoint: a method (:class:`Implicit` by default, :class:`Unrolled`, :class:`Truncated`,
        :class:`Forward`); see :class:`AbstractMethod`.
      return_info: also return an :class:`ArgminInfo`.
      throw: raise ``RuntimeError`` (inside ``jit`` too) when the run ends ``NONFINITE`` or, with
        ``tol``, ``MAX_STEPS``, instead of reporting the status.

    Returns:
      ``params``, or ``(params, info)`` when ``return_info``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, solvers
      >>> f = lambda w, lam: jnp.sum((w - 1.0) ** 2) + lam * jnp.sum(w ** 2)
      >>> def sol(lam):
      ...     return solvers.argmin(f, jnp.zeros(2), lam, optimizer=optax.sgd(0.2), steps=100)
      >>> round(float(jax.grad(lambda lam: sol(lam).sum())(1.0)), 4)   # d/dlam 2/(1+lam)
      -0.5

    References:
      Implicit: Bengio, "Gradient-based optimization of hyperparameters", 2000; Blondel et al.,
      NeurIPS 2022. Unrolled: Maclaurin et al., ICML 2015; Franceschi et al., ICML 2017.
      Truncated: Shaban et al., AISTATS 2019.
    """
    adjoint = Implicit() if adjoint is None else adjoint
    steps, tol = _validate(fun, init_params, args, optimizer, steps, tol, adjoint)
    loop = _ArgminLoop(fun, optax.with_extra_args_support(optimizer), steps, tol)
    init_params = jax.tree.map(jnp.asarray, init_params)
    c0 = loop.start(init_params, lax.stop_gradient(args))
    c, _ = adjoint.solve(loop, c0, args)
    status = c.status
    if tol is not None:
        status = jnp.where(
            (status == Status.SUCCESS) & (c.grad_norm > tol), Status.MAX_STEPS, status
        )
    status = jnp.asarray(status, jnp.int32)
    if throw:
        error_if_failed(status, "solvers.argmin")
    if not return_info:
        return c.params
    info = ArgminInfo(
        c.steps,
        lax.stop_gradient(c.grad_norm),
        lax.stop_gradient(c.value),
        status,
    )
    return c.params, info
