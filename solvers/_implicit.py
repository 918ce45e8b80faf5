"""Implicit differentiation of roots and fixed points, in forward and reverse mode.

If ``F(w*, theta) = 0`` defines ``w*(theta)``, the implicit function theorem gives

.. math:: \\partial_w F \\; \\frac{dw^*}{d\\theta} = -\\partial_\\theta F.

:func:`custom_root` attaches this derivative to any solver as a ``jax.custom_jvp`` rule whose
linear solve is a ``lax.custom_linear_solve``: forward mode (``jax.jvp``, ``jax.jacfwd``) uses the
rule directly, reverse mode (``jax.grad``, ``jax.vjp``) transposes it, so both modes share one
implementation. Values the optimality function closes over (traced under ``jit``, ``vmap`` or an
outer ``grad``) are hoisted with ``jax.closure_convert`` and differentiated like explicit arguments.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from solvers import tree as T
from solvers._linear import CG, GMRES, LinearSolver

PyTree = Any


def _check_solver(linear_solver: Any) -> None:
    if not isinstance(linear_solver, LinearSolver):
        raise TypeError(
            "linear_solver must be a solvers linear solver such as solvers.cg() or solvers.gmres(), "
            f"got {linear_solver!r}"
        )


def _linear_solve(matvec, b, linear_solver: LinearSolver, symmetric: bool):
    """``A^{-1} b`` through ``lax.custom_linear_solve`` so that it can be transposed."""
    solve = lambda mv, rhs: linear_solver(mv, rhs)[0]
    return lax.custom_linear_solve(
        matvec, b, solve, transpose_solve=None if symmetric else solve, symmetric=symmetric
    )


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _implicit_identity(optimality_fn, linear_solver, symmetric, params, args):
    """The identity on ``params`` whose derivative w.r.t. ``args`` is the implicit one."""
    del optimality_fn, linear_solver, symmetric, args
    return params


@_implicit_identity.defjvp
def _implicit_identity_jvp(optimality_fn, linear_solver, symmetric, primals, tangents):
    params, args = primals
    _, args_dot = tangents
    # Re-attach the implicit derivative to the primal point, so that differentiating this rule
    # again (higher order, or an outer transform over closed-over values) sees w*(args), not a
    # constant.
    params = _implicit_identity(optimality_fn, linear_solver, symmetric, params, args)
    # -d/dt F(w*, theta + t dtheta): the right-hand side of the tangent system.
    _, rhs = jax.jvp(lambda a: optimality_fn(params, *a), (args,), (args_dot,))
    # Leaves of the right-hand side that do not depend on args (e.g. an unpenalized bias) would
    # be constants, which lax.custom_linear_solve cannot transpose: tie each leaf to the tangent
    # with an exact zero so that reverse mode sees a linear function of it everywhere.
    tangent_leaves = [
        t for t in jax.tree.leaves(args_dot) if jnp.issubdtype(jnp.result_type(t), jnp.inexact)
    ]
    if tangent_leaves:
        zero = 0 * sum(jnp.sum(t) for t in tangent_leaves)
        rhs = jax.tree.map(lambda r: r + zero.astype(r.dtype), rhs)
    matvec = lambda v: jax.jvp(lambda p: optimality_fn(p, *args), (params,), (v,))[1]
    params_dot = _linear_solve(matvec, T.tree_neg(rhs), linear_solver, symmetric)
    return params, params_dot


def _check_optimality_output(optimality_fn, params, args) -> None:
    out = jax.eval_shape(optimality_fn, params, *args)
    T.check_same_structure(
        params, out, "optimality_fn(params, *args) must return a pytree shaped like params"
    )


def implicit_solution(
    optimality_fn: Callable,
    params: PyTree,
    args: tuple,
    linear_solver: LinearSolver,
    symmetric: bool = False,
) -> PyTree:
    """Return ``params`` (a root of ``optimality_fn``) carrying implicit derivatives w.r.t. ``args``.

    ``params`` itself is treated as a constant (its own derivatives are stopped): the derivative of
    the result is ``-(d_w F)^{-1} d_theta F`` at ``(params, args)``.
    """
    _check_solver(linear_solver)
    params = lax.stop_gradient(params)
    _check_optimality_output(optimality_fn, params, args)
    converted, consts = jax.closure_convert(optimality_fn, params, *args)
    n_args = len(args)

    def fn(p, *a):
        return converted(p, *a[:n_args], *a[n_args:])

    return _implicit_identity(fn, linear_solver, symmetric, params, (*args, *consts))


def custom_root(
    optimality_fn: Callable,
    linear_solver: LinearSolver | None = None,
    has_aux: bool = False,
    symmetric: bool = False,
) -> Callable:
    r"""Decorator: make ``solver(init_params, *args)`` differentiable by the implicit function theorem.

    If ``solver`` returns ``w*`` with ``optimality_fn(w*, *args) = 0``, the decorated solver returns
    the same ``w*`` with derivatives

    .. math:: \frac{\partial w^*}{\partial \theta} = -(\partial_w F)^{-1} \partial_\theta F

    in reverse mode (``jax.grad``/``jax.vjp``: one transposed linear solve) **and** forward mode
    (``jax.jvp``/``jax.jacfwd``: one linear solve per tangent). The solver's own iterations are never
    differentiated, and ``init_params`` gets a zero derivative. The optimality function may close
    over traced values (inside ``jit``, ``vmap`` or an outer ``grad``); they are differentiated too.

    Args:
      optimality_fn: ``F(params, *args) -> pytree shaped like params``, zero at the solution.
      linear_solver: solver for systems in ``d_w F`` (default ``solvers.cg()``, which needs
        ``d_w F`` symmetric positive definite, as when ``F`` is a gradient of a convex objective;
        use ``solvers.gmres()`` or ``solvers.bicgstab()`` otherwise).
      has_aux: ``solver`` returns ``(params, aux)``; ``aux`` is passed through, not differentiated.
      symmetric: ``d_w F`` is symmetric (a Hessian), so reverse mode reuses the forward matvec.

    Returns:
      A decorator; the decorated function has the solver's signature.

    Example:
      >>> import jax, jax.numpy as jnp, solvers
      >>> F = lambda w, lam: 2 * (w - 3.0) + 2 * lam * w     # grad of (w-3)^2 + lam w^2
      >>> @solvers.custom_root(F)
      ... def solve(w0, lam):
      ...     return 3.0 / (1.0 + lam)
      >>> round(float(jax.grad(solve, argnums=1)(0.0, 1.0)), 4)   # d/dlam 3/(1+lam) = -3/4
      -0.75

    Reference: Blondel et al., "Efficient and Modular Implicit Differentiation", NeurIPS 2022.
    """
    linear_solver = CG() if linear_solver is None else linear_solver
    _check_solver(linear_solver)
    if not callable(optimality_fn):
        raise TypeError(f"optimality_fn must be callable, got {optimality_fn!r}")

    def decorator(solver: Callable) -> Callable:
        @functools.wraps(solver)
        def wrapped(init_params, *args):
            out = solver(init_params, *args)
            params, aux = out if has_aux else (out, None)
            params = implicit_solution(optimality_fn, params, args, linear_solver, symmetric)
            return (params, aux) if has_aux else params

        return wrapped

    return decorator


def custom_fixed_point(
    fixed_point_fn: Callable, linear_solver: LinearSolver | None = None, has_aux: bool = False
) -> Callable:
    r"""Decorator: make a fixed-point solver differentiable by the implicit function theorem.

    For ``w* = T(w*, *args)`` the root is of ``F(w, theta) = T(w, theta) - w``, so

    .. math:: \frac{\partial w^*}{\partial \theta} = (I - \partial_w T)^{-1} \partial_\theta T.

    Args:
      fixed_point_fn: ``T(params, *args) -> pytree shaped like params``.
      linear_solver: solver for systems in ``I - d_w T`` (non-symmetric in general; default
        ``solvers.gmres()``).
      has_aux: ``solver`` returns ``(params, aux)``.

    Returns:
      A decorator, as :func:`custom_root`.

    Example:
      >>> import jax, jax.numpy as jnp, solvers
      >>> Tm = lambda w, a: 0.5 * w + a                    # fixed point w* = 2a
      >>> @solvers.custom_fixed_point(Tm)
      ... def solve(w0, a):
      ...     return jax.lax.fori_loop(0, 60, lambda _, w: Tm(w, a), w0)
      >>> round(float(jax.grad(solve, argnums=1)(0.0, 1.0)), 4)
      2.0

    Reference: Blondel et al., "Efficient and Modular Implicit Differentiation", NeurIPS 2022.
    """
    linear_solver = GMRES() if linear_solver is None else linear_solver

    def optimality_fn(params, *args):
        return T.tree_sub(fixed_point_fn(params, *args), params)

    return custom_root(optimality_fn, linear_solver, has_aux=has_aux)


def root_vjp(
    optimality_fn: Callable,
    params: PyTree,
    args: tuple,
    cotangent: PyTree,
    linear_solver: LinearSolver | None = None,
    init: PyTree | None = None,
):
    r"""Vector-Jacobian product of a root ``w*(args)`` with backward-pass diagnostics.

    .. math:: u = (\partial_w F)^{-\top} \bar w, \qquad \bar\theta = -(\partial_\theta F)^\top u

    The same quantity ``jax.vjp`` computes through :func:`custom_root`, but returning the linear
    solve's statistics and its solution ``u`` (to warm-start the next solve in an online loop).

    Args:
      optimality_fn: ``F(params, *args)``.
      params: the root ``w*``.
      args: tuple of the arguments ``theta``.
      cotangent: ``\bar w``, shaped like ``params``.
      linear_solver: solver for the transposed system (default ``solvers.cg()``).
      init: warm start for ``u``.

    Returns:
      ``(args_cotangent, u, stats)``: a tuple shaped like ``args``, the adjoint vector ``u`` and
      the :class:`SolveStats` of the solve.
    """
    linear_solver = CG() if linear_solver is None else linear_solver
    _check_solver(linear_solver)
    T.check_same_structure(params, cotangent, "cotangent must be shaped like params")
    _, vjp_params = jax.vjp(lambda p: optimality_fn(p, *args), params)
    u, stats = linear_solver(lambda v: vjp_params(v)[0], cotangent, init=init)
    _, vjp_args = jax.vjp(lambda *a: optimality_fn(params, *a), *args)
    args_cotangent = vjp_args(T.tree_neg(u))
    return args_cotangent, u, stats
