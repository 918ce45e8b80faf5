"""``argmin``: minimize with any Optax optimizer, differentiably w.r.t. the objective's arguments.

How the solution is differentiated is a strategy object (an *adjoint*), not a flag:

- :class:`Implicit`: implicit function theorem at the returned point (the steps are not
  differentiated; memory independent of the number of steps). Forward and reverse mode.
- :class:`Unrolled`: differentiate through every step (reverse mode stores every step unless
  ``checkpoint_every`` rematerializes segments). Forward and reverse mode.
- :class:`Truncated`: differentiate through the last ``K`` steps only (earlier steps held constant).
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
from jax.extend import core as jex_core
from jax.interpreters import ad, batching, mlir

from solvers import tree as T
from solvers._implicit import implicit_solution
from solvers._linear import CG, LinearSolver
from solvers._status import Status

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


# ----------------------------------------------------------------------------- adjoints


@dataclasses.dataclass(frozen=True, kw_only=True)
class Implicit:
    """Differentiate the solution by the implicit function theorem.

    Args:
      linear_solver: solver for the Hessian system (default ``solvers.cg()``).
      warm_start: online loops reuse the previous linear solution as the initial guess (ignored by
        a one-shot :func:`argmin`).
    """

    linear_solver: LinearSolver = dataclasses.field(default_factory=CG)
    warm_start: bool = True

    def __post_init__(self):
        if not isinstance(self.linear_solver, LinearSolver):
            raise TypeError(
                f"linear_solver must be a solvers linear solver, got {self.linear_solver!r}"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Unrolled:
    """Differentiate through every inner step (reverse or forward mode).

    Args:
      checkpoint_every: rematerialize segments of this many steps (``jax.checkpoint``) in reverse
        mode: memory ``O(T / k + k)`` instead of ``O(T)`` for about one extra forward pass.
        ``~sqrt(steps)`` is the classic choice (Griewank, 1992). ``None``: store every step.
    """

    checkpoint_every: int | None = None

    def __post_init__(self):
        c = self.checkpoint_every
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise ValueError(f"checkpoint_every must be None or an int >= 1, got {c!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Truncated:
    """Differentiate through the last ``steps`` inner steps only (Shaban et al., AISTATS 2019).

    The earlier steps run without derivatives (with early stopping at ``tol``); the last
    ``steps`` steps always run and are differentiated.

    Args:
      steps: number ``K >= 1`` of differentiated steps.
    """

    steps: int

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"Truncated.steps must be an int >= 1, got {self.steps!r}")


Adjoint = Implicit | Unrolled | Truncated


# ----------------------------------------------------------------------------- guard for while loops

_REVERSE_MESSAGE = (
    "Reverse-mode differentiation (jax.grad / jax.vjp) through solvers.{adjoint} is not possible "
    "here: the inner optimizer step contains a lax.while_loop (for example the line search of "
    "optax.lbfgs). Use adjoint=solvers.Implicit(...) for reverse mode, or forward mode "
    "(jax.jvp / jax.jacfwd) with this adjoint."
)

_no_reverse_p = jex_core.Primitive("solvers_no_reverse")
_no_reverse_p.def_impl(lambda x, *, message: x)
_no_reverse_p.def_abstract_eval(lambda aval, *, message: aval)
mlir.register_lowering(_no_reverse_p, lambda ctx, x, *, message: [x])
batching.defvectorized(_no_reverse_p)


def _no_reverse_transpose(ct, x, *, message):
    raise ValueError(message)


ad.deflinear2(_no_reverse_p, _no_reverse_transpose)


def _forbid_reverse(tree: PyTree, message: str) -> PyTree:
    """Identity whose transpose (reverse mode) raises ``ValueError(message)``; forward mode passes."""
    return jax.tree.map(
        lambda x: (
            _no_reverse_p.bind(x, message=message) if jnp.issubdtype(x.dtype, jnp.inexact) else x
        ),
        tree,
    )


def _has_while(jaxpr) -> bool:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "while":
            return True
        for value in eqn.params.values():
            for sub in value if isinstance(value, list | tuple) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns") and _has_while(inner):
                    return True
    return False


# ----------------------------------------------------------------------------- argmin


class _Carry(NamedTuple):
    params: PyTree
    opt_state: PyTree
    value: jax.Array
    grad: PyTree
    grad_norm: jax.Array
    steps: jax.Array
    status: jax.Array


def _validate(fun, init_params, args, optimizer, steps, tol, adjoint) -> None:
    if not callable(fun):
        raise TypeError(f"fun must be callable, got {fun!r}")
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(f"optimizer must be an optax.GradientTransformation, got {optimizer!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if tol is not None and not (isinstance(tol, int | float) and 0 <= tol < float("inf")):
        raise ValueError(f"tol must be None or a finite number >= 0, got {tol!r}")
    if not isinstance(adjoint, Implicit | Unrolled | Truncated):
        raise TypeError(
            "adjoint must be solvers.Implicit(...), solvers.Unrolled(...) or "
            f"solvers.Truncated(...), got {adjoint!r}"
        )
    if isinstance(adjoint, Truncated) and adjoint.steps > steps:
        raise ValueError(
            f"Truncated(steps={adjoint.steps}) needs at least that many steps; "
            f"argmin was given steps={steps}"
        )
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


def argmin(
    fun: Callable[..., jax.Array],
    init_params: PyTree,
    *args: Any,
    optimizer: optax.GradientTransformation,
    steps: int,
    tol: float | None = None,
    adjoint: Adjoint | None = None,
    return_info: bool = False,
):
    r"""Minimize ``fun(params, *args)`` over ``params`` with an Optax optimizer, differentiably.

    .. math:: w^*(\theta) = \arg\min_w f(w, \theta), \qquad
       \frac{dw^*}{d\theta} = -\left(\nabla^2_{ww} f\right)^{-1} \nabla^2_{w\theta} f
       \quad\text{(Implicit)}

    Runs at most ``steps`` optimizer steps, stopping early once ``||grad|| <= tol``. Every step
    passes ``value``, ``grad`` and ``value_fn`` as extra arguments, so line-search optimizers such as
    ``optax.lbfgs()`` work as they are. A non-finite loss or gradient stops the run and the last
    finite iterate is returned with ``status = Status.NONFINITE``. The result is differentiable
    w.r.t. ``*args`` (and anything ``fun`` closes over) as the ``adjoint`` says; ``init_params``
    gets no derivative under :class:`Implicit`.

    :class:`Unrolled` and :class:`Truncated` differentiate the optimizer itself: use
    ``optax.adam(lr, eps_root=1e-8)`` rather than the default ``eps_root=0``, whose ``sqrt`` has
    an infinite derivative where a gradient entry is exactly zero.

    Args:
      fun: scalar objective ``fun(params, *args)``.
      init_params: starting point (pytree of floating arrays).
      *args: differentiable arguments (hyperparameters, data).
      optimizer: any ``optax.GradientTransformation``.
      steps: maximum number of optimizer steps (``>= 1``).
      tol: stop when the gradient norm is ``<= tol`` (``None``: run all steps).
      adjoint: :class:`Implicit` (default), :class:`Unrolled` or :class:`Truncated`.
      return_info: also return an :class:`ArgminInfo`.

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
    _validate(fun, init_params, args, optimizer, steps, tol, adjoint)
    opt = optax.with_extra_args_support(optimizer)
    init_params = jax.tree.map(jnp.asarray, init_params)

    def make_step(args):
        value_fn = lambda p: fun(p, *args)
        value_and_grad = jax.value_and_grad(value_fn)

        def evaluate(params, opt_state, steps_taken, status):
            value, grad = value_and_grad(params)
            return _Carry(params, opt_state, value, grad, T.tree_norm(grad), steps_taken, status)

        def step(c: _Carry) -> _Carry:
            updates, opt_state = opt.update(
                c.grad, c.opt_state, c.params, value=c.value, grad=c.grad, value_fn=value_fn
            )
            params = optax.apply_updates(c.params, updates)
            new = evaluate(params, opt_state, c.steps + 1, c.status)
            finite = jnp.isfinite(new.value) & jnp.isfinite(new.grad_norm)
            finite &= T.tree_all_finite(params)
            bad = c._replace(status=jnp.asarray(Status.NONFINITE, jnp.int32))
            return T.tree_select(finite, new, bad)

        def start(params):
            c = evaluate(
                params,
                opt.init(params),
                jnp.asarray(0, jnp.int32),
                jnp.asarray(Status.SUCCESS, jnp.int32),
            )
            finite = jnp.isfinite(c.value) & jnp.isfinite(c.grad_norm)
            return c._replace(status=jnp.where(finite, c.status, Status.NONFINITE))

        return start, step

    def running(c: _Carry, max_steps) -> jax.Array:
        go = (c.steps < max_steps) & (c.status == Status.SUCCESS)
        if tol is not None:
            go &= c.grad_norm > tol
        return go

    def run_while(args, params, max_steps, carry=None):
        start, step = make_step(args)
        c = start(params) if carry is None else carry
        return lax.while_loop(lambda c: running(c, max_steps), step, c)

    def run_scan(args, c: _Carry, n: int, masked: bool, checkpoint_every: int | None):
        _, step = make_step(args)

        def body(c, _):
            new = step(c)
            return (T.tree_select(running(c, steps), new, c) if masked else new), None

        if checkpoint_every is None or checkpoint_every >= n:
            c, _ = lax.scan(body, c, None, length=n)
            return c
        k = checkpoint_every
        n_seg, rest = divmod(n, k)

        @jax.checkpoint
        def segment(c, _):
            return lax.scan(body, c, None, length=k)[0], None

        c, _ = lax.scan(segment, c, None, length=n_seg)
        if rest:
            c, _ = lax.scan(body, c, None, length=rest)
        return c

    if isinstance(adjoint, Implicit):
        c = run_while(tuple(lax.stop_gradient(a) for a in args), init_params, steps)
        optimality_fn = lambda p, *a: jax.grad(fun)(p, *a)
        params = implicit_solution(
            optimality_fn, c.params, args, adjoint.linear_solver, symmetric=True
        )
    else:
        start, step = make_step(args)
        c0 = start(init_params)
        step_jaxpr = jax.make_jaxpr(step)(c0).jaxpr
        if isinstance(adjoint, Unrolled):
            c = run_scan(args, c0, steps, masked=True, checkpoint_every=adjoint.checkpoint_every)
        else:
            k = adjoint.steps
            frozen_args = tuple(lax.stop_gradient(a) for a in args)
            c = lax.stop_gradient(
                run_while(frozen_args, init_params, steps - k, carry=lax.stop_gradient(c0))
            )
            # The last k steps always run: restart the status so they are not skipped.
            c = c._replace(status=jnp.where(c.status == Status.NONFINITE, c.status, Status.SUCCESS))
            # Recompute value/grad at the frozen point with the differentiable args.
            c = make_step(args)[0](c.params)._replace(
                opt_state=c.opt_state, steps=c.steps, status=c.status
            )
            c = run_scan(args, c, k, masked=False, checkpoint_every=None)
        params = c.params
        if _has_while(step_jaxpr):
            params = _forbid_reverse(
                params, _REVERSE_MESSAGE.format(adjoint=type(adjoint).__name__)
            )

    if not return_info:
        return params
    status = c.status
    if tol is not None:
        status = jnp.where(
            (status == Status.SUCCESS) & (c.grad_norm > tol), Status.MAX_STEPS, status
        )
    info = ArgminInfo(
        c.steps,
        lax.stop_gradient(c.grad_norm),
        lax.stop_gradient(c.value),
        jnp.asarray(status, jnp.int32),
    )
    return params, info
