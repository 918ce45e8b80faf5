"""Implicit differentiation of roots and fixed points, in forward and reverse mode.

If ``F(w*, theta) = 0`` defines ``w*(theta)``, the implicit function theorem gives

.. math:: \\partial_w F \\; \\frac{dw^*}{d\\theta} = -\\partial_\\theta F.

:func:`custom_root` attaches this derivative to any solver as a ``jax.custom_jvp`` rule whose
linear solve is a ``lax.custom_linear_solve``: forward mode (``jax.jvp``, ``jax.jacfwd``) uses the
rule directly, reverse mode (``jax.grad``, ``jax.vjp``) transposes it, so both modes share one
implementation. Values the optimality function closes over (traced under ``jit``, ``vmap`` or an
outer ``grad``) are hoisted with ``jax.closure_convert`` and differentiated like explicit arguments.

What a rule can report from inside a derivative. The linear solve runs inside JAX's
differentiation machinery, whose outputs are only the derivative values: its
:class:`~solvers.SolveStats` cannot be returned to the caller, and a failed solve cannot change
the derivative into a status code. The rules therefore report through host callbacks
(``jax.debug.callback``), which work eagerly and under ``jit``/``vmap``/``grad``:

- ``warn=True`` (default): an :class:`ImplicitSolveWarning` the first time a solve inside a rule
  does not converge (once per process for each rule name and linear solver configuration);
- ``throw=True``: a ``RuntimeError`` (under ``jit`` a ``jax.errors.JaxRuntimeError``, a subclass,
  carrying the message) whenever such a solve does not converge, names ``LINEAR_SOLVE_FAILED`` or
  ``NONFINITE``.

Neither changes the derivative, which is computed from the solver's last iterate. To *get* the
statistics (iterations, residual, converged) use :func:`root_vjp`, which returns them.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from solvers import tree as T
from solvers._linear import CG, GMRES, LinearSolver
from solvers._status import Status, error_if_failed

PyTree = Any


class ImplicitSolveWarning(RuntimeWarning):
    """A linear solve inside an implicit derivative did not converge (the derivative is approximate).

    Silence it with ``warnings.filterwarnings("ignore", category=ImplicitSolveWarning)`` when an
    inexact solve is intended (a capped CG, a truncated Neumann series).
    """


# (rule name, linear solver) pairs already warned about: one warning per process for each.
_WARNED: set = set()


def _warn_once(key, what, converged, residual, iterations):
    converged = np.asarray(converged)
    if converged.all() or key in _WARNED:
        return
    _WARNED.add(key)
    residual = np.asarray(residual)[~converged].reshape(-1)[0]
    iterations = np.asarray(iterations)[~converged].reshape(-1)[0]
    warnings.warn(
        f"{what}: the linear solve of the implicit derivative with {key[1]!r} did not converge "
        f"(relative residual {float(residual):.3g} after {int(iterations)} iterations); the "
        "derivative is approximate (NaN residual: not finite). Raise maxiter or tol, add ridge, "
        "or change linear_solver; pass throw=True to raise, use solvers.root_vjp to get the "
        "statistics. Shown once per process for this rule and linear solver.",
        ImplicitSolveWarning,
        stacklevel=2,
    )


def _report(stats, linear_solver: LinearSolver, what: str, throw: bool, warn: bool) -> None:
    """Raise (``throw``) or warn once (``warn``) from a traced solve that did not converge."""
    if throw:
        status = jnp.where(
            stats.converged,
            Status.SUCCESS,
            jnp.where(jnp.isfinite(stats.residual), Status.LINEAR_SOLVE_FAILED, Status.NONFINITE),
        ).astype(jnp.int32)
        error_if_failed(status, f"{what} (linear solve of the implicit derivative)")
    if warn:
        callback = functools.partial(_warn_once, (what, linear_solver), what)
        if T.is_concrete(stats):
            callback(*stats[::-1])
        else:
            jax.debug.callback(callback, stats.converged, stats.residual, stats.iterations)


def _check_solver(linear_solver: Any) -> None:
    if not isinstance(linear_solver, LinearSolver):
        raise TypeError(
            "linear_solver must be a solvers linear solver such as solvers.cg() or solvers.gmres(), "
            f"got {linear_solver!r}"
        )


class _Options(tuple):
    """Static options of a rule (hashable): linear solver, symmetric, rule name, throw, warn."""

    linear_solver = property(lambda self: self[0])
    symmetric = property(lambda self: self[1])
    what = property(lambda self: self[2])
    throw = property(lambda self: self[3])
    warn = property(lambda self: self[4])


def _linear_solve(matvec, b, opts: _Options):
    """``A^{-1} b`` through ``lax.custom_linear_solve`` so that it can be transposed."""

    def solve(mv, rhs):
        x, stats = opts.linear_solver._solve_with_stats(mv, rhs)
        _report(stats, opts.linear_solver, opts.what, opts.throw, opts.warn)
        return x

    return lax.custom_linear_solve(
        matvec,
        b,
        solve,
        transpose_solve=None if opts.symmetric else solve,
        symmetric=opts.symmetric,
    )


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _implicit_identity(optimality_fn, opts, params, args):
    """The identity on ``params`` whose derivative w.r.t. ``args`` is the implicit one."""
    del optimality_fn, opts, args
    return params


@_implicit_identity.defjvp
def _implicit_identity_jvp(optimality_fn, opts, primals, tangents):
    params, args = primals
    _, args_dot = tangents
    # Re-attach the implicit derivative to the primal point, so that differentiating this rule
    # again (higher order, or an outer transform over closed-over values) sees w*(args), not a
    # constant.
    params = _implicit_identity(optimality_fn, opts, params, args)
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
    params_dot = _linear_solve(matvec, T.tree_neg(rhs), opts)
    return params, params_dot


def _check_optimality_output(optimality_fn, params, args) -> None:
    out = jax.eval_shape(optimality_fn, params, *args)
    T.check_same_structure(
        params, out, "optimality_fn(params, *args) must return a pytree shaped like params"
    )


def _implicit(optimality_fn, params, args, kwargs, linear_solver, symmetric, throw, warn, what):
    _check_solver(linear_solver)
    if kwargs:
        keys = tuple(kwargs)
        fn_kw, n_pos = optimality_fn, len(args)

        def optimality_fn(p, *a):
            return fn_kw(p, *a[:n_pos], **dict(zip(keys, a[n_pos:], strict=True)))

        args = (*args, *kwargs.values())
    params = lax.stop_gradient(params)
    _check_optimality_output(optimality_fn, params, args)
    converted, consts = jax.closure_convert(optimality_fn, params, *args)
    n_args = len(args)

    def fn(p, *a):
        return converted(p, *a[:n_args], *a[n_args:])

    opts = _Options((linear_solver, bool(symmetric), what, bool(throw), bool(warn)))
    return _implicit_identity(fn, opts, params, (*args, *consts))


def implicit_solution(
    optimality_fn: Callable,
    params: PyTree,
    args: tuple,
    linear_solver: LinearSolver,
    symmetric: bool = False,
    *,
    kwargs: dict | None = None,
    throw: bool = False,
    warn: bool = True,
) -> PyTree:
    r"""Return ``params`` (a root of ``optimality_fn``) carrying implicit derivatives w.r.t. ``args``.

    .. math:: \frac{\partial w^*}{\partial \theta} = -(\partial_w F)^{-1} \partial_\theta F
       \quad\text{at } (w^*, \theta) = (\text{params}, \text{args})

    ``params`` itself is treated as a constant (its own derivatives are stopped).

    Args:
      optimality_fn: ``F(params, *args, **kwargs) -> pytree shaped like params``.
      params: the root ``w*``.
      args: tuple of the arguments ``theta``.
      linear_solver: solver for systems in ``d_w F`` (or its transpose).
      symmetric: ``d_w F`` is symmetric, so reverse mode reuses the forward matvec.
      kwargs: keyword arguments of ``optimality_fn``, differentiated like ``args``.
      throw: raise when a linear solve of the derivative does not converge (see the module
        docstring for what can be reported from inside a derivative).
      warn: warn once (:class:`ImplicitSolveWarning`) when one does not converge.

    Returns:
      ``params``, with the implicit derivatives attached.

    Example:
      >>> import jax, solvers
      >>> F = lambda w, a: w - 2.0 * a                     # root w* = 2a
      >>> jax.grad(lambda a: solvers.implicit_solution(F, 2.0 * a, (a,), solvers.cg()))(1.0)
      Array(2., dtype=float32, weak_type=True)
    """
    return _implicit(
        optimality_fn, params, args, kwargs, linear_solver, symmetric, throw, warn,
        "implicit_solution",
    )  # fmt: skip


def _bind(signature: inspect.Signature | None, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Arguments of a call as ``(positional, keyword)``: keywords become positional where the
    signature allows (so that ``solver(w0, lam=1.0)`` calls ``F(w, 1.0)``), defaults not added."""
    if signature is None or not kwargs:
        return args, kwargs
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"the decorated solver was called with invalid arguments: {e}") from None
    return bound.args, bound.kwargs


def _signature(fn: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # builtins, some C callables
        return None


def custom_root(
    optimality_fn: Callable,
    linear_solver: LinearSolver | None = None,
    has_aux: bool = False,
    symmetric: bool = False,
    *,
    throw: bool = False,
    warn: bool = True,
) -> Callable:
    r"""Decorator: make ``solver(init_params, *args)`` differentiable by the implicit function theorem.

    If ``solver`` returns ``w*`` with ``optimality_fn(w*, *args) = 0``, the decorated solver returns
    the same ``w*`` with derivatives

    .. math:: \frac{\partial w^*}{\partial \theta} = -(\partial_w F)^{-1} \partial_\theta F

    in reverse mode (``jax.grad``/``jax.vjp``: one transposed linear solve) **and** forward mode
    (``jax.jvp``/``jax.jacfwd``: one linear solve per tangent). The solver's own iterations are never
    differentiated, and ``init_params`` gets a zero derivative. The optimality function may close
    over traced values (inside ``jit``, ``vmap`` or an outer ``grad``); they are differentiated too.

    The derivative can only *report* a failed linear solve, not return its statistics: by default
    a warning (once per process for this rule and linear solver), with ``throw=True`` an error;
    use :func:`root_vjp` for the statistics (module docstring: what can be reported).

    Args:
      optimality_fn: ``F(params, *args, **kwargs) -> pytree shaped like params``, zero at the
        solution; it receives the solver's arguments, those passed by keyword moved to their
        positions where the solver's signature allows (defaults are not filled in).
      linear_solver: solver for systems in ``d_w F`` (default ``solvers.cg()``, which needs
        ``d_w F`` symmetric positive definite, as when ``F`` is a gradient of a convex objective;
        use ``solvers.gmres()`` or ``solvers.bicgstab()`` otherwise).
      has_aux: ``solver`` returns ``(params, aux)``; ``aux`` is passed through, not differentiated.
      symmetric: ``d_w F`` is symmetric (a Hessian), so reverse mode reuses the forward matvec.
      throw: raise a ``RuntimeError`` (``jax.errors.JaxRuntimeError`` under ``jit``) when a linear
        solve of the derivative does not converge or is not finite (a singular ``d_w F``).
      warn: emit an :class:`ImplicitSolveWarning` the first time one does not converge.

    Returns:
      A decorator; the decorated function has the solver's signature (keyword arguments too).

    Example:
      >>> import jax, jax.numpy as jnp, solvers
      >>> F = lambda w, lam: 2 * (w - 3.0) + 2 * lam * w     # grad of (w-3)^2 + lam w^2
      >>> @solvers.custom_root(F)
      ... def solve(w0, lam):
      ...     return 3.0 / (1.0 + lam)
      >>> round(float(jax.grad(solve, argnums=1)(0.0, 1.0)), 4)   # d/dlam 3/(1+lam) = -3/4
      -0.75
      >>> round(float(jax.grad(lambda lam: solve(0.0, lam=lam))(1.0)), 4)
      -0.75

    Reference: Blondel et al., "Efficient and Modular Implicit Differentiation", NeurIPS 2022.
    """
    return _custom_root(
        optimality_fn, linear_solver, has_aux, symmetric, throw, warn, "custom_root"
    )


def _custom_root(optimality_fn, linear_solver, has_aux, symmetric, throw, warn, what):
    linear_solver = CG() if linear_solver is None else linear_solver
    _check_solver(linear_solver)
    if not callable(optimality_fn):
        raise TypeError(f"optimality_fn must be callable, got {optimality_fn!r}")

    def decorator(solver: Callable) -> Callable:
        signature = _signature(solver)

        @functools.wraps(solver)
        def wrapped(*args, **kwargs):
            args, kwargs = _bind(signature, args, kwargs)
            if not args:
                raise TypeError("the decorated solver needs init_params as its first argument")
            out = solver(*args, **kwargs)
            params, aux = out if has_aux else (out, None)
            params = _implicit(
                optimality_fn, params, args[1:], kwargs, linear_solver, symmetric, throw, warn,
                what,
            )  # fmt: skip
            return (params, aux) if has_aux else params

        return wrapped

    return decorator


def custom_fixed_point(
    fixed_point_fn: Callable,
    linear_solver: LinearSolver | None = None,
    has_aux: bool = False,
    *,
    throw: bool = False,
    warn: bool = True,
) -> Callable:
    r"""Decorator: make a fixed-point solver differentiable by the implicit function theorem.

    For ``w* = T(w*, *args)`` the root is of ``F(w, theta) = T(w, theta) - w``, so

    .. math:: \frac{\partial w^*}{\partial \theta} = (I - \partial_w T)^{-1} \partial_\theta T.

    Args:
      fixed_point_fn: ``T(params, *args, **kwargs) -> pytree shaped like params``.
      linear_solver: solver for systems in ``I - d_w T`` (non-symmetric in general; default
        ``solvers.gmres()``).
      has_aux: ``solver`` returns ``(params, aux)``.
      throw: raise when a linear solve of the derivative does not converge (as
        :func:`custom_root`).
      warn: warn once when one does not converge (as :func:`custom_root`).

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

    def optimality_fn(params, *args, **kwargs):
        return T.tree_sub(fixed_point_fn(params, *args, **kwargs), params)

    return _custom_root(
        optimality_fn, linear_solver, has_aux, False, throw, warn, "custom_fixed_point"
    )


def root_vjp(
    optimality_fn: Callable,
    params: PyTree,
    args: tuple,
    cotangent: PyTree,
    linear_solver: LinearSolver | None = None,
    init: PyTree | None = None,
    *,
    throw: bool = False,
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
      throw: raise a ``RuntimeError`` (``jax.errors.JaxRuntimeError`` under ``jit``) when the solve
        does not converge; otherwise only ``stats`` says so.

    Returns:
      ``(args_cotangent, u, stats)``: a tuple shaped like ``args``, the adjoint vector ``u`` and
      the :class:`SolveStats` of the solve. A singular ``d_w F`` (a degenerate root) shows as
      ``stats.converged == False`` with a residual that is large (no progress) or not finite.

    Example:
      >>> import jax.numpy as jnp, solvers
      >>> F = lambda w, a: w**2 - a                        # root w* = sqrt(a), dw*/da = 1/(2w*)
      >>> (g,), u, stats = solvers.root_vjp(F, jnp.array(2.0), (jnp.array(4.0),), jnp.array(1.0))
      >>> float(g), bool(stats.converged)
      (0.25, True)
      >>> _, _, stats = solvers.root_vjp(F, jnp.array(0.0), (jnp.array(0.0),), jnp.array(1.0))
      >>> bool(stats.converged)                            # singular at a = 0: reported
      False
    """
    linear_solver = CG() if linear_solver is None else linear_solver
    _check_solver(linear_solver)
    T.check_same_structure(params, cotangent, "cotangent must be shaped like params")
    _, vjp_params = jax.vjp(lambda p: optimality_fn(p, *args), params)
    u, stats = linear_solver(lambda v: vjp_params(v)[0], cotangent, init=init)
    if throw:
        _report(stats, linear_solver, "root_vjp", throw=True, warn=False)
    _, vjp_args = jax.vjp(lambda *a: optimality_fn(params, *a), *args)
    args_cotangent = vjp_args(T.tree_neg(u))
    return args_cotangent, u, stats
