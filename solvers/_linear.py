"""Matrix-free linear solvers over pytrees for the implicit-function-theorem system ``A x = b``.

Every solver is an immutable (frozen, hashable) configuration object. Calling it as
``solve(matvec, b, init=None)`` returns ``(x, stats)`` where ``stats`` is a :class:`SolveStats`.
``matvec`` is only ever called, never materialized (except by :class:`Direct`), so ``A`` can be a
Hessian given as a Hessian-vector product. A solve that stops before reaching ``tol`` returns its
last iterate (never zeros in place of an answer) and says so in ``stats.converged``; a NaN or inf
in ``b`` or in ``A v`` always shows as a non-finite ``stats.residual`` (never as a finite answer).

Solves are differentiable in both modes: ``x`` is returned through ``lax.custom_linear_solve``, so
``jax.grad``/``jax.jvp`` of ``x`` with respect to ``b``, to values ``matvec`` closes over, and to a
call-time ``ridge`` use the implicit derivative ``A^{-1}`` (one more solve), never the iterations.
The stats are not differentiated.

Mixed precision: a system whose ``b`` has bfloat16 or float16 leaves is solved in float32 (``b``,
the warm start, the iterates and ``stats.residual`` are float32; ``matvec`` receives vectors in
the dtypes of ``b`` and its outputs are cast up) and ``x`` is returned in the dtypes of ``b``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

from solvers import checks
from solvers import tree as T

PyTree = Any
Matvec = Callable[[PyTree], PyTree]


class SolveStats(NamedTuple):
    """Diagnostics of one linear solve.

    Attributes:
      iterations: iterations performed (int32; one matrix-vector product each, two for BiCGSTAB).
      residual: relative residual ``||b - A x|| / ||b||`` of the (damped) system, as tracked by the
        iteration (``||b - A x||`` itself when ``b = 0``).
      converged: ``residual <= tol`` and everything finite.
      ridge: the damping ``lambda`` of the system solved, ``(A + lambda I) x = b``: the
        configured (or call-time) ``ridge``, or with ``ridge="auto"`` the damping the solve
        ended with (see :class:`CG`).
    """

    iterations: jax.Array
    residual: jax.Array
    converged: jax.Array
    ridge: jax.Array | float = 0.0


MAXITER_CAP = 1000
"""Largest default iteration budget of CG and BiCGSTAB (see :func:`default_maxiter`)."""


def default_maxiter(n: int) -> int:
    """Default iteration budget of CG and BiCGSTAB for ``n`` unknowns: ``min(10 n, 1000)``.

    ``n`` iterations are exact only in exact arithmetic: in floating point CG loses conjugacy and
    a 10 x 10 system of condition 1e4 still has a relative residual of 0.17 after 10 iterations
    in float32 (and 3 x 3 systems need a 4th). ``10 n`` is the budget of jaxopt and SciPy; the
    cap keeps a non-converging solve on a large network (``n`` in the millions) from running
    millions of Hessian-vector products. Pass ``maxiter`` to choose another budget.
    """
    return min(10 * n, MAXITER_CAP)


def _set(obj: Any, name: str, value: Any) -> None:
    """Store a normalized field on a frozen dataclass (plain Python numbers stay hashable)."""
    object.__setattr__(obj, name, value)


def _is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LinearSolver:
    """Base class: validates inputs, applies Tikhonov damping, computes the relative residual.

    Subclasses implement ``_solve(matvec, b, x0, bnorm) -> (x, iterations, residual_norm)``;
    those that support automatic damping (``ridge="auto"``: :class:`CG`) also
    ``_solve_auto(matvec, b, x0, bnorm, ridge) -> (x, iterations, residual_norm, ridge)``.
    """

    ridge: float | str = 0.0
    # The operator is assumed symmetric (CG, Neumann): reverse mode reuses the forward solve.
    _symmetric: ClassVar[bool] = False
    _auto_ridge: ClassVar[bool] = False  # implements ridge="auto"

    def __post_init__(self):
        if isinstance(self.ridge, str):
            if self.ridge != "auto" or not self._auto_ridge:
                supported = " or 'auto'" if self._auto_ridge else " (ridge='auto' needs solvers.cg)"
                raise ValueError(
                    f"{type(self).__name__}: ridge must be a number >= 0{supported}, got "
                    f"{self.ridge!r}"
                )
            return
        _set(self, "ridge", checks.number("ridge", self.ridge, low=0.0))

    @property
    def adaptive(self) -> bool:
        """Whether the damping is chosen by the solve (``ridge="auto"``)."""
        return isinstance(self.ridge, str)

    @property
    def _tol(self) -> float:
        return getattr(self, "tol", 0.0)

    def __call__(
        self,
        matvec: Matvec,
        b: PyTree,
        init: PyTree | None = None,
        *,
        ridge: float | jax.Array | None = None,
    ):
        """Solve ``(A + ridge I) x = b``.

        Args:
          matvec: linear function ``v -> A v`` on pytrees shaped like ``b``.
          b: right-hand side pytree (floating leaves; Python floats are converted to arrays).
          init: optional initial guess shaped like ``b`` (warm start); zeros when ``None``. A
            guess whose residual exceeds ``||b||`` (worse than zero) is replaced by zeros, so a
            warm start never makes a solve worse than a cold one. It gets no derivative.
          ridge: damping for this call, overriding the configured ``ridge``; may be a traced JAX
            scalar (a hyperparameter inside ``jit``/``grad``), in which case it is not validated
            and ``x`` is differentiable with respect to it. With ``ridge="auto"`` it is the
            damping the solve *starts* from (default 0), e.g. the one a previous solve ended
            with (``stats.ridge``).

        Returns:
          ``(x, stats)``: the solution pytree and a :class:`SolveStats`. ``x`` is differentiable
          (``jax.grad``/``jax.jvp``, through ``lax.custom_linear_solve``); ``stats`` is not.
        """
        matvec, b, narrow = _in_float32(matvec, b)
        b, init, ridge = self._prepare(matvec, b, init, ridge)
        # With ridge="auto" the operator stays undamped: the solve adds its own damping.
        mv = _cast_like(matvec, b) if self.adaptive else _damped(_cast_like(matvec, b), ridge)

        def solve(op, rhs):
            return self._run(op, rhs, init, ridge)

        def transpose_solve(op, rhs):  # the warm start belongs to the forward system only
            return self._run(op, rhs, None, ridge)

        try:
            x, stats = lax.custom_linear_solve(
                mv, b, solve, transpose_solve, symmetric=self._symmetric, has_aux=True
            )
        except Exception:
            if self._symmetric:
                raise
            x, stats = lax.custom_linear_solve(mv, b, solve, None, has_aux=True)
        return narrow(x), SolveStats(*(jnp.asarray(s) for s in stats))

    def _prepare(self, matvec, b, init, ridge):
        """Validate the call; return ``b`` and ``init`` as arrays and the ridge to use."""
        if not jax.tree.leaves(b):
            raise ValueError("b must be a pytree with at least one array leaf")
        for leaf in jax.tree.leaves(b):
            if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
                raise TypeError(
                    f"b must have floating leaves, got {T.describe(b)}; cast it with "
                    "jnp.asarray(b, jnp.float32)"
                )
        b = jax.tree.map(jnp.asarray, b)
        out = jax.eval_shape(matvec, b)
        T.check_same_structure(b, out, "matvec(b) must have the structure of b")
        if init is not None:
            T.check_same_structure(b, init, "init must have the structure of b")
            init = jax.tree.map(lambda i, r: jnp.asarray(i, r.dtype), init, b)
        if ridge is None:
            ridge = 0.0 if self.adaptive else self.ridge
        elif not _is_tracer(ridge):
            ridge = checks.number("ridge", ridge, low=0.0)
        return b, init, ridge

    def _run(self, matvec, b, init, ridge=0.0):
        """The solve itself on a validated system (not differentiable).

        ``matvec`` is already damped by ``ridge``, except with ``ridge="auto"``, where it is the
        undamped operator and ``ridge`` the damping to start from.
        """
        bnorm = T.tree_norm(b)
        if self.adaptive:
            x, iterations, rnorm, ridge = self._solve_auto(matvec, b, init, bnorm, ridge)
        else:
            x, iterations, rnorm = self._solve(matvec, b, init, bnorm)
        residual = jnp.where(bnorm > 0, rnorm / jnp.where(bnorm > 0, bnorm, 1), rnorm)
        # A non-finite b (or x) must never look like a finite answer.
        residual = jnp.where(jnp.isfinite(bnorm) & T.tree_all_finite(x), residual, jnp.nan)
        converged = jnp.isfinite(residual) & (residual <= self._tol)
        ridge = jnp.asarray(ridge, residual.dtype)
        stats = SolveStats(jnp.asarray(iterations, jnp.int32), residual, converged, ridge)
        return x, stats

    def _solve_with_stats(self, matvec, b, init=None, ridge=None):
        """Undifferentiated solve of ``(A + ridge I) x = b`` for callers that differentiate
        through their own ``lax.custom_linear_solve`` (the implicit rules)."""
        matvec, b, narrow = _in_float32(matvec, b)
        b, init, ridge = self._prepare(matvec, b, init, ridge)
        mv = _cast_like(matvec, b)
        x, stats = self._run(mv if self.adaptive else _damped(mv, ridge), b, init, ridge)
        return narrow(x), stats

    def _solve_auto(self, matvec, b, x0, bnorm, ridge):  # pragma: no cover - CG overrides
        raise NotImplementedError

    def _solve(self, matvec, b, x0, bnorm):  # pragma: no cover - abstract
        raise NotImplementedError


def _is_narrow(leaf: Any) -> bool:
    dtype = jnp.result_type(leaf)
    return jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize < 4


def _in_float32(matvec: Matvec, b: PyTree) -> tuple[Matvec, PyTree, Callable]:
    """Mixed precision: a system with bfloat16/float16 leaves in ``b`` is solved in float32.

    ``b``, the warm start, the iterates and the residuals are float32; ``matvec`` still gets
    vectors in the dtypes of ``b`` (its domain, e.g. a Hessian-vector product of a bfloat16
    model) and its outputs are cast up; ``x`` is returned in the dtypes of ``b``. Returns the
    wrapped ``matvec``, the widened ``b`` and the cast back (identities for other systems).
    """
    if not any(_is_narrow(leaf) for leaf in jax.tree.leaves(b)):
        return matvec, b, lambda x: x
    b = jax.tree.map(jnp.asarray, b)
    dtypes = jax.tree.map(jnp.result_type, b)
    back = lambda x: jax.tree.map(lambda a, d: jnp.asarray(a, d), x, dtypes)
    wide = jax.tree.map(lambda a: a.astype(jnp.promote_types(a.dtype, jnp.float32)), b)
    return lambda v: matvec(back(v)), wide, back


def _cast_like(matvec: Matvec, b: PyTree) -> Matvec:
    """``matvec`` with outputs cast to the dtypes of ``b`` (e.g. a float64 matrix, float32 b)."""
    return lambda v: jax.tree.map(lambda o, r: jnp.asarray(o, r.dtype), matvec(v), b)


def _damped(matvec: Matvec, ridge) -> Matvec:
    if not _is_tracer(ridge) and ridge == 0:
        return matvec
    return lambda v: T.tree_add_scaled(matvec(v), ridge, v)


def _initial_residual(matvec, b, x0, bnorm):
    """Start point and its residual; a warm start worse than zero (or non-finite) is dropped."""
    zeros = T.tree_zeros_like(b)
    if x0 is None:
        return zeros, b
    r0 = T.tree_sub(b, matvec(x0))
    r0_norm = T.tree_norm(r0)
    use = jnp.isfinite(r0_norm) & (r0_norm <= bnorm)
    return T.tree_select(use, x0, zeros), T.tree_select(use, r0, b)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _ShortRecurrence(LinearSolver):
    """Shared configuration of CG and BiCGSTAB: ``maxiter`` (default :func:`default_maxiter`)
    and ``tol``."""

    maxiter: int | None = None
    tol: float = 1e-5

    def __post_init__(self):
        super().__post_init__()
        _set(self, "maxiter", checks.optional_integer("maxiter", self.maxiter, 1))
        _set(self, "tol", checks.number("tol", self.tol, low=0.0))

    def _maxiter(self, b) -> int:
        return self.maxiter if self.maxiter is not None else default_maxiter(T.tree_size(b))


@dataclasses.dataclass(frozen=True, kw_only=True)
class CG(_ShortRecurrence):
    r"""Conjugate gradients for symmetric positive-definite ``A`` (Hestenes & Stiefel, 1952).

    .. math:: x_{k+1} = x_k + \alpha_k p_k,\quad \alpha_k = \frac{r_k^\top r_k}{p_k^\top A p_k}

    Stops when ``||r_k|| <= tol ||b||``, after ``maxiter`` iterations (one matvec each), or at a
    direction of non-positive curvature (``p^T A p <= 0``: ``A`` is not positive definite, as a
    neural network's Hessian often is not), reporting ``converged=False`` (truncated CG). It
    returns the last iterate, or, after non-positive curvature, the iterate of smallest residual.
    Add ``ridge`` damping to make indefinite systems solvable. A non-finite ``p^T A p`` (NaN in
    ``A v``) stops it with a NaN residual.

    **Automatic damping** (``ridge="auto"``, Levenberg-Marquardt style): the solve starts from
    a damping :math:`\lambda_0` (0, or the call-time ``ridge=``) and runs CG on
    :math:`(A + \lambda I) x = b`, watching the curvature it meets. When a direction has
    non-positive or small damped curvature,
    :math:`p^\top A p + \lambda\, p^\top p \le \epsilon\,\kappa_{\max}\, p^\top p` (the system
    is not positive definite, or so badly conditioned that this direction would dominate the
    solution), the damping grows to

    .. math:: \lambda \leftarrow \max\Big(\gamma\lambda,\;
       -\gamma\,\frac{p^\top A p}{p^\top p},\; \epsilon\,\kappa_{\max},\; \lambda_{\min}\Big)

    (``gamma = 2``; the Rayleigh quotient :math:`-p^\top A p / p^\top p` is a lower bound on
    the most negative eigenvalue's size; :math:`\kappa_{\max}` the largest
    :math:`|p^\top A p| / p^\top p` seen so far, ``eps = 1e-3``, so that the damped system keeps
    a condition number of about ``1 / eps`` on the directions CG explores;
    :math:`\lambda_{\min}` the dtype's smallest normal number) and CG restarts from zero. The iterations of every attempt
    count against ``maxiter``. On a positive-definite system no direction fails, the damping
    stays at :math:`\lambda_0` and with :math:`\lambda_0 = 0` the answer is the undamped
    one (for a condition number below about ``1 / eps``). ``stats.ridge`` is the damping of the system finally solved (``stats.residual`` is its
    residual); ``solvers.Implicit`` carries it to the next outer step and shrinks it there
    after a solve that needed no increase, so the damping tracks the curvature over training.
    The loop is one ``lax.while_loop``: jit-able, vmap-able (each batch member its own
    damping), no retracing as the damping changes. Derivatives of ``x`` solve their system
    with the same rule.

    Args:
      maxiter: maximum number of iterations; ``None`` means ``min(10 n, 1000)`` for ``n``
        unknowns (``n`` is exact only in exact arithmetic).
      tol: relative residual tolerance.
      ridge: Tikhonov damping; solves ``(A + ridge I) x = b``. ``"auto"``: the damping is
        chosen by the solve (above).

    Example:
      >>> import jax.numpy as jnp, solvers
      >>> x, stats = solvers.cg(tol=1e-6)(lambda v: jnp.array([2.0, 4.0]) * v, jnp.ones(2))
      >>> x.round(3), bool(stats.converged)
      (Array([0.5 , 0.25], dtype=float32), True)
      >>> A = jnp.array([-1.0, 4.0])                      # indefinite: plain CG cannot solve it
      >>> x, stats = solvers.cg(ridge="auto")(lambda v: A * v, jnp.ones(2))
      >>> bool(stats.converged), float(stats.ridge) > 1.0
      (True, True)
    """

    _symmetric: ClassVar[bool] = True
    _auto_ridge: ClassVar[bool] = True
    _GROW: ClassVar[float] = 2.0
    _FLOOR: ClassVar[float] = 1e-3

    def _solve_auto(self, matvec, b, x0, bnorm, ridge):
        maxiter = self._maxiter(b)
        dtype = T.result_dtype(b)
        lam0 = jnp.asarray(ridge, dtype)
        damped = lambda v, lam: T.tree_add_scaled(matvec(v), lam, v)
        x0, r0 = _initial_residual(lambda v: damped(v, lam0), b, x0, bnorm)
        zeros = T.tree_zeros_like(b)
        rs0 = T.tree_vdot(r0, r0)
        bb = T.tree_vdot(b, b)
        atol2 = (self.tol * bnorm) ** 2
        grow, floor = self._GROW, self._FLOOR
        tiny = jnp.finfo(dtype).tiny

        def cond(c):
            _, _, _, rs, k, _, _ = c
            return (k < maxiter) & (rs > atol2) & jnp.isfinite(rs)

        def body(c):
            x, r, p, rs, k, lam, kmax = c
            ap = matvec(p)
            pp = T.tree_vdot(p, p)
            pap = T.tree_vdot(p, ap)  # curvature of the undamped operator
            quotient = pap / jnp.where(pp > 0, pp, 1)
            kmax = jnp.maximum(kmax, jnp.where(jnp.isfinite(quotient), jnp.abs(quotient), 0))
            damped_pap = pap + lam * pp
            # Curvature below eps * kappa_max (non-positive, or a near-singular direction that
            # would blow the solution up) calls for more damping.
            curved = damped_pap > floor * kmax * pp
            # A CG step on the damped system ...
            alpha = jnp.where(curved, rs / jnp.where(curved, damped_pap, 1), 0)
            x_cg = T.tree_add_scaled(x, alpha, p)
            r_cg = T.tree_add_scaled(r, -alpha, T.tree_add_scaled(ap, lam, p))
            rs_cg = T.tree_vdot(r_cg, r_cg)
            p_cg = T.tree_add_scaled(r_cg, rs_cg / rs, p)
            # ... or, at non-positive damped curvature, more damping and a restart from zero.
            lam_up = jnp.maximum(
                jnp.maximum(grow * lam, -grow * quotient), jnp.maximum(floor * kmax, tiny)
            )
            x = T.tree_select(curved, x_cg, zeros)
            r = T.tree_select(curved, r_cg, b)
            p = T.tree_select(curved, p_cg, b)
            # NaN curvature (NaN in A p) must surface as a NaN residual.
            rs = jnp.where(curved, rs_cg, jnp.where(jnp.isnan(pap), pap, bb))
            lam = jnp.where(curved | jnp.isnan(pap), lam, lam_up)
            return x, r, p, rs, k + 1, lam, kmax

        init = (x0, r0, r0, rs0, jnp.asarray(0, jnp.int32), lam0, jnp.zeros((), dtype))
        x, _, _, rs, k, lam, _ = lax.while_loop(cond, body, init)
        return x, k, jnp.sqrt(rs), lam

    def _solve(self, matvec, b, x0, bnorm):
        maxiter = self._maxiter(b)
        x0, r0 = _initial_residual(matvec, b, x0, bnorm)
        rs0 = T.tree_vdot(r0, r0)
        atol2 = (self.tol * bnorm) ** 2

        def cond(carry):
            _, _, _, rs, k, curved, _, _ = carry
            return (k < maxiter) & (rs > atol2) & jnp.isfinite(rs) & curved

        def body(carry):
            x, r, p, rs, k, _, x_best, rs_best = carry
            ap = matvec(p)
            pap = T.tree_vdot(p, ap)
            # Non-positive curvature (an indefinite or singular operator): stop at the current
            # iterate instead of dividing by it (truncated CG, Steihaug 1983).
            curved = pap > 0
            alpha = jnp.where(curved, rs / jnp.where(curved, pap, 1), 0)
            x = T.tree_add_scaled(x, alpha, p)
            r = T.tree_add_scaled(r, -alpha, ap)
            # NaN curvature (NaN in A p) must surface as a NaN residual, not as a truncation.
            rs_new = jnp.where(curved, T.tree_vdot(r, r), jnp.where(jnp.isnan(pap), pap, rs))
            p = T.tree_add_scaled(r, rs_new / rs, p)
            # Track the iterate of smallest residual, the answer when curvature fails: on an
            # indefinite operator the residual of CG can grow past that of the start.
            better = rs_new <= rs_best
            x_best = T.tree_select(better, x, x_best)
            rs_best = jnp.where(better, rs_new, rs_best)
            return x, r, p, rs_new, k + 1, curved, x_best, rs_best

        init = (x0, r0, r0, rs0, jnp.asarray(0, jnp.int32), jnp.asarray(True), x0, rs0)
        x, _, _, rs, k, curved, x_best, rs_best = lax.while_loop(cond, body, init)
        # The standard CG answer is the last iterate (smallest error in the A-norm on a
        # positive-definite system, even while the residual is still large); only a run that met
        # non-positive curvature falls back to its smallest-residual iterate.
        x = T.tree_select(curved, x, x_best)
        rs = jnp.where(curved | jnp.isnan(rs), rs, rs_best)
        return x, k, jnp.sqrt(rs)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Neumann(LinearSolver):
    r"""Truncated Neumann series / Richardson iteration (Lorraine et al., 2020).

    .. math:: A^{-1} b \approx s \sum_{k=0}^{K-1} (I - s A)^k b,
       \qquad x_{k+1} = x_k + s\,(b - A x_k)

    Converges for symmetric positive-definite ``A`` when ``0 < s < 2 / lambda_max``. One matvec per
    step; the residual comes for free. Stops early when the relative residual reaches ``tol``.
    A divergent series (``s`` too large, ``A`` indefinite) shows as a growing residual (``> 1``,
    up to inf/NaN), never as a small one. ``steps`` is a deliberate truncation: the default 10
    steps rarely reach ``tol`` (``converged=False`` then reports an approximate solve).

    Cost of the default ``scale=None``: every call runs ``power_iters`` power iterations
    (matvecs) before its ``steps``; as SOBA's adjoint update (``steps=1``, one call per outer
    step) that is 20 Hessian-vector products where one was meant (10-16 s of a 30 s
    hyper-cleaning run). Estimate the scale once instead, :meth:`calibrated` (``safety /
    lambda_max`` at a representative point, e.g. the initial parameters), and refresh it rarely
    by calibrating again at a restart (a new solver object: a jitted step that holds it compiles
    once more). The Hessian's top eigenvalue of a training loss usually *grows* during training
    (progressive sharpening), so keep ``safety < 1`` (default 0.5) when estimating at the start.

    Args:
      steps: number of terms ``K`` of the series (matvecs).
      scale: step ``s``; ``None`` estimates ``1 / lambda_max`` by ``power_iters`` power iterations
        in every call (costing that many extra matvecs each time; see :meth:`calibrated`).
      tol: relative residual tolerance for early stopping and the converged flag.
      power_iters: power iterations for the default ``scale``.
      ridge: Tikhonov damping.

    Example:
      >>> import jax.numpy as jnp, solvers
      >>> x, _ = solvers.neumann(steps=50)(lambda v: jnp.array([1.0, 2.0]) * v, jnp.ones(2))
      >>> x.round(3)
      Array([1. , 0.5], dtype=float32)
    """

    steps: int = 10
    scale: float | None = None
    tol: float = 1e-5
    power_iters: int = 20
    _symmetric: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        _set(self, "steps", checks.integer("steps", self.steps, 1))
        _set(self, "power_iters", checks.integer("power_iters", self.power_iters, 1))
        _set(self, "tol", checks.number("tol", self.tol, low=0.0))
        _set(self, "scale", checks.optional_number("scale", self.scale, low=0.0, low_open=True))

    def calibrated(
        self, matvec: Matvec, like: PyTree, *, safety: float = 0.5, iters: int | None = None
    ) -> Neumann:
        r"""This solver with ``scale`` fixed once to ``safety / lambda_max`` of ``matvec``.

        .. math:: s = \frac{\text{safety}}{\lambda_{max}(A + \text{ridge}\, I)}

        with :math:`\lambda_{max}` from ``iters`` power iterations (default ``power_iters``).
        The series converges for :math:`0 < s < 2 / \lambda_{max}`; ``safety = 0.5`` leaves room
        for the curvature to grow fourfold after the estimate. Call it outside ``jit`` (the scale
        becomes a Python float in the solver's configuration).

        Args:
          matvec: ``v -> A v`` at a representative point (e.g. the inner Hessian at the initial
            parameters).
          like: a pytree shaped like the unknowns.
          safety: the fraction of ``1 / lambda_max`` to use, in ``(0, 2)``.
          iters: power iterations (default ``power_iters``).

        Returns:
          A :class:`Neumann` with the same settings and this ``scale``.

        Example:
          >>> import jax.numpy as jnp, solvers
          >>> A = jnp.array([1.0, 4.0])
          >>> solver = solvers.neumann(steps=1).calibrated(lambda v: A * v, jnp.zeros(2))
          >>> round(solver.scale, 4)
          0.125
        """
        safety = checks.number("safety", safety, low=0.0, high=2.0, low_open=True, high_open=True)
        iters = self.power_iters if iters is None else checks.integer("iters", iters, 1)
        like = jax.tree.map(jnp.asarray, like)
        mv = _damped(_cast_like(matvec, like), self.ridge)
        # The arrays matvec closes over become arguments, not constants that XLA would fold.
        converted, consts = jax.closure_convert(mv, like)
        estimate = jax.jit(
            lambda like, consts: _power_iteration(lambda v: converted(v, *consts), like, iters)
        )
        lam, rayleigh = (float(v) for v in estimate(like, consts))
        if not (np.isfinite(lam) and lam > 0 and rayleigh > 0):
            raise ValueError(
                f"Neumann.calibrated: the power iteration gave |lambda_max| = {lam} with "
                f"Rayleigh quotient {rayleigh}; the operator is not positive semi-definite or not "
                "finite at this point (add ridge= damping for an indefinite Hessian)"
            )
        return dataclasses.replace(self, scale=safety / lam)

    def _solve(self, matvec, b, x0, bnorm):
        scale = (
            estimate_inverse_max_eigenvalue(matvec, b, self.power_iters)
            if (self.scale is None)
            else jnp.asarray(self.scale, T.result_dtype(b))
        )
        x0, r0 = _initial_residual(matvec, b, x0, bnorm)
        atol = self.tol * bnorm

        def cond(carry):
            _, _, rnorm, k = carry
            return (k < self.steps) & (rnorm > atol) & jnp.isfinite(rnorm)

        def body(carry):
            x, r, _, k = carry
            x = T.tree_add_scaled(x, scale, r)
            r = T.tree_add_scaled(r, -scale, matvec(r))
            return x, r, T.tree_norm(r), k + 1

        init = (x0, r0, T.tree_norm(r0), jnp.asarray(0, jnp.int32))
        x, _, rnorm, k = lax.while_loop(cond, body, init)
        return x, k, rnorm


def estimate_inverse_max_eigenvalue(matvec: Matvec, like: PyTree, iters: int = 20) -> jax.Array:
    """``1 / lambda_max`` of a symmetric positive semi-definite operator by power iteration.

    Starts from a fixed pseudo-random vector shaped like ``like`` (deterministic, so results are
    reproducible and do not retrace).
    """
    lam, _ = _power_iteration(matvec, like, iters)
    return 1 / jnp.where(lam > 0, lam, 1)


def _power_iteration(matvec: Matvec, like: PyTree, iters: int) -> tuple[jax.Array, jax.Array]:
    """``(||A v||, v^T A v)`` after ``iters`` power iterations from a fixed random unit ``v``."""
    leaves, treedef = jax.tree.flatten(like)
    keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
    v = jax.tree.unflatten(
        treedef,
        [
            jax.random.normal(k, jnp.shape(a), jnp.result_type(a))
            for k, a in zip(keys, leaves, strict=True)
        ],
    )
    v = T.tree_scale(1 / T.tree_norm(v), v)

    def body(_, carry):
        v, _, _ = carry
        av = matvec(v)
        lam = T.tree_norm(av)
        return T.tree_scale(1 / jnp.where(lam > 0, lam, 1), av), lam, T.tree_vdot(v, av)

    one = jnp.ones((), T.result_dtype(like))
    _, lam, rayleigh = lax.fori_loop(0, iters, body, (v, one, one))
    return lam, rayleigh


@dataclasses.dataclass(frozen=True, kw_only=True)
class GMRES(LinearSolver):
    r"""Restarted GMRES for general (non-symmetric) ``A`` (Saad & Schultz, 1986).

    Minimizes ``||b - A x||`` over a Krylov subspace of dimension ``restart``, then restarts.
    Arnoldi with re-orthogonalized classical Gram-Schmidt; Givens rotations track the residual
    so the iteration stops as soon as it reaches ``tol``. Works on the flattened pytree.

    Args:
      maxiter: maximum total number of Arnoldi iterations (matvecs).
      tol: relative residual tolerance.
      restart: Krylov subspace dimension between restarts.
      ridge: Tikhonov damping.

    Example:
      >>> import jax.numpy as jnp, solvers
      >>> A = jnp.array([[2.0, 1.0], [0.0, 3.0]])
      >>> x, stats = solvers.gmres(tol=1e-6)(lambda v: A @ v, jnp.array([3.0, 3.0]))
      >>> x.round(3)
      Array([1., 1.], dtype=float32)
    """

    maxiter: int = 100
    tol: float = 1e-5
    restart: int = 20

    def __post_init__(self):
        super().__post_init__()
        _set(self, "maxiter", checks.integer("maxiter", self.maxiter, 1))
        _set(self, "restart", checks.integer("restart", self.restart, 1))
        _set(self, "tol", checks.number("tol", self.tol, low=0.0))

    def _solve(self, matvec, b, x0, bnorm):
        b_flat, unravel = ravel_pytree(b)
        dtype = b_flat.dtype
        n = b_flat.shape[0]
        m = min(self.restart, n)
        mv = lambda v: ravel_pytree(matvec(unravel(v)))[0].astype(dtype)
        x0, r0 = _initial_residual(matvec, b, x0, bnorm)
        x = ravel_pytree(x0)[0].astype(dtype)
        r = ravel_pytree(r0)[0].astype(dtype)
        atol = self.tol * bnorm
        eps = jnp.finfo(dtype).tiny

        def cycle(x, r, beta, k_total):
            # One restart cycle: Arnoldi + Givens until the residual estimate reaches atol.
            V = jnp.zeros((m + 1, n), dtype).at[0].set(r / jnp.where(beta > 0, beta, 1))
            R = jnp.zeros((m + 1, m), dtype)
            cs = jnp.zeros((m,), dtype)
            sn = jnp.zeros((m,), dtype)
            g = jnp.zeros((m + 1,), dtype).at[0].set(beta)

            def cond(c):
                _, _, _, _, g, j, _ = c
                return (
                    (j < m)
                    & (k_total + j < self.maxiter)
                    & (jnp.abs(g[j]) > atol)
                    & (jnp.isfinite(g[j]))
                )

            def body(c):
                V, R, cs, sn, g, j, _ = c
                w = mv(V[j])
                mask = (jnp.arange(m + 1) <= j).astype(dtype)
                h = (V @ w) * mask
                w = w - V.T @ h
                h2 = (V @ w) * mask
                w = w - V.T @ h2
                h = h + h2
                hn = jnp.linalg.norm(w)
                V = V.at[j + 1].set(w / jnp.where(hn > eps, hn, 1))
                h = h.at[j + 1].set(hn)

                def rot(i, h):
                    a, bb = h[i], h[i + 1]
                    apply = i < j
                    na = cs[i] * a + sn[i] * bb
                    nb = -sn[i] * a + cs[i] * bb
                    return (
                        h.at[i].set(jnp.where(apply, na, a)).at[i + 1].set(jnp.where(apply, nb, bb))
                    )

                h = lax.fori_loop(0, m, rot, h)
                a, bb = h[j], h[j + 1]
                den = jnp.sqrt(a * a + bb * bb)
                c_, s_ = (
                    jnp.where(den > 0, a / jnp.where(den > 0, den, 1), 1),
                    jnp.where(den > 0, bb / jnp.where(den > 0, den, 1), 0),
                )
                h = h.at[j].set(den).at[j + 1].set(0)
                cs, sn = cs.at[j].set(c_), sn.at[j].set(s_)
                gj = g[j]
                g = g.at[j].set(c_ * gj).at[j + 1].set(-s_ * gj)
                R = R.at[:, j].set(h)
                return V, R, cs, sn, g, j + 1, hn

            init = (V, R, cs, sn, g, jnp.asarray(0, jnp.int32), jnp.zeros((), dtype))
            V, R, cs, sn, g, j, _ = lax.while_loop(cond, body, init)
            # Solve the j x j upper-triangular system; unused columns get a unit diagonal.
            idx = jnp.arange(m)
            used = idx < j
            Rm = R[:m, :m] * used[None, :] * used[:, None]
            Rm = Rm + jnp.diag(jnp.where(used, 0, 1).astype(dtype))
            diag = jnp.diag(Rm)
            Rm = Rm + jnp.diag(jnp.where(diag == 0, 1, 0).astype(dtype))
            y = jax.scipy.linalg.solve_triangular(Rm, jnp.where(used, g[:m], 0), lower=False)
            x = x + V[:m].T @ y
            return x, j

        def outer_cond(c):
            _, _, beta, k = c
            return (k < self.maxiter) & (beta > atol) & jnp.isfinite(beta)

        def outer_body(c):
            x, r, beta, k = c
            x, j = cycle(x, r, beta, k)
            r = b_flat - mv(x)
            beta_new = jnp.linalg.norm(r)
            # A cycle that made no progress (j == 0) cannot make any: stop.
            k = jnp.where(j > 0, k + j, self.maxiter)
            return x, r, beta_new, k

        x, _, beta, k = lax.while_loop(
            outer_cond, outer_body, (x, r, jnp.linalg.norm(r), jnp.asarray(0, jnp.int32))
        )
        return unravel(x), jnp.minimum(k, self.maxiter), beta


@dataclasses.dataclass(frozen=True, kw_only=True)
class BiCGStab(_ShortRecurrence):
    r"""Stabilized bi-conjugate gradients for general ``A`` (van der Vorst, 1992).

    Two matvecs per iteration; short recurrences, so memory does not grow with iterations.
    Breakdown (``rhat^T A p = 0`` or ``rhat^T r = 0``, as on the KKT system of an
    equality-constrained QP, where ``r_0^T A r_0 = 0``) is handled by a minimal-residual step and
    a restart with a new (fixed pseudo-random) shadow residual, so a solvable system is still
    solved; an unsolvable one ends at ``maxiter`` with its true (non-increasing) residual and
    ``converged=False``. A NaN in ``A v`` stops it with a NaN residual.

    Args:
      maxiter: maximum number of iterations; ``None`` means ``min(10 n, 1000)`` for ``n``
        unknowns.
      tol: relative residual tolerance.
      ridge: Tikhonov damping.

    Example:
      >>> import jax.numpy as jnp, solvers
      >>> A = jnp.array([[2.0, 1.0], [0.0, 3.0]])
      >>> x, _ = solvers.bicgstab(tol=1e-6)(lambda v: A @ v, jnp.array([3.0, 3.0]))
      >>> x.round(3)
      Array([1., 1.], dtype=float32)
    """

    def _solve(self, matvec, b, x0, bnorm):
        maxiter = self._maxiter(b)
        x0, r0 = _initial_residual(matvec, b, x0, bnorm)
        dtype = T.result_dtype(b)
        one = jnp.ones((), dtype)
        atol = self.tol * bnorm
        # A breakdown is an inner product this small relative to the norms of its factors.
        small = 16 * jnp.finfo(dtype).eps
        leaves, treedef = jax.tree.flatten(b)

        def shadow(k):
            keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(0), k), len(leaves))
            return jax.tree.unflatten(
                treedef,
                [
                    jax.random.normal(key, jnp.shape(a), a.dtype)
                    for key, a in zip(keys, leaves, strict=True)
                ],
            )

        def safe_div(a, d):
            return jnp.where(d != 0, a / jnp.where(d != 0, d, 1), 0)

        def cond(c):
            *_, rnorm, k, _ = c
            return (k < maxiter) & (rnorm > atol) & jnp.isfinite(rnorm)

        def body(c):
            x, r, rhat, p, v, rho, alpha, omega, rnorm, k, restart = c
            # After a breakdown: a new shadow residual and a fresh search direction.
            rhat = T.tree_select(restart, shadow(k), rhat)
            p, v = T.tree_select(restart, (zeros, zeros), (p, v))
            rho, alpha, omega = (jnp.where(restart, one, a) for a in (rho, alpha, omega))
            rhat_norm = T.tree_norm(rhat)
            rho_new = T.tree_vdot(rhat, r)
            beta = safe_div(rho_new, rho) * safe_div(alpha, omega)
            p = T.tree_add_scaled(r, beta, T.tree_add_scaled(p, -omega, v))
            v = matvec(p)
            sigma = T.tree_vdot(rhat, v)
            ok = (jnp.abs(sigma) > small * rhat_norm * T.tree_norm(v)) & (
                jnp.abs(rho_new) > small * rhat_norm * rnorm
            )
            # On breakdown alpha = 0: the rest of the step is a minimal-residual step along r,
            # which never increases the residual.
            alpha = jnp.where(ok, safe_div(rho_new, sigma), 0)
            s = T.tree_add_scaled(r, -alpha, v)
            t = matvec(s)
            tt = T.tree_vdot(t, t)
            omega = jnp.where(tt > 0, safe_div(T.tree_vdot(t, s), tt), 0)
            finite = jnp.isfinite(sigma) & jnp.isfinite(tt)
            x_new = T.tree_add_scaled(T.tree_add_scaled(x, alpha, p), omega, s)
            r_new = T.tree_add_scaled(s, -omega, t)
            # A NaN in A v: keep the last finite iterate and report a NaN residual.
            x = T.tree_select(finite, x_new, x)
            r = T.tree_select(finite, r_new, r)
            rnorm = jnp.where(finite, T.tree_norm(r), jnp.nan)
            restart = ~ok | (omega == 0)
            return x, r, rhat, p, v, rho_new, alpha, omega, rnorm, k + 1, restart

        zeros = T.tree_zeros_like(b)
        init = (
            x0, r0, r0, zeros, zeros, one, one, one, T.tree_norm(r0),
            jnp.asarray(0, jnp.int32), jnp.asarray(False),
        )  # fmt: skip
        out = lax.while_loop(cond, body, init)
        return out[0], out[-2], out[-3]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Direct(LinearSolver):
    """Dense solve: materializes ``A`` with ``n`` matvecs and LU-factorizes it.

    For small problems and as a test oracle. ``iterations`` reports the ``n`` matvecs used.

    Args:
      ridge: Tikhonov damping.

    Example:
      >>> import jax.numpy as jnp, solvers
      >>> x, _ = solvers.direct()(lambda v: {"w": 2.0 * v["w"]}, {"w": jnp.ones(3)})
      >>> x["w"]
      Array([0.5, 0.5, 0.5], dtype=float32)
    """

    tol: float = 1e-5

    def __post_init__(self):
        super().__post_init__()
        _set(self, "tol", checks.number("tol", self.tol, low=0.0))

    def _solve(self, matvec, b, x0, bnorm):
        b_flat, unravel = ravel_pytree(b)
        mv = lambda v: ravel_pytree(matvec(unravel(v)))[0].astype(b_flat.dtype)
        A = jax.vmap(mv, out_axes=1)(jnp.eye(b_flat.shape[0], dtype=b_flat.dtype))
        x = jnp.linalg.solve(A, b_flat)
        rnorm = jnp.linalg.norm(b_flat - A @ x)
        return unravel(x), b_flat.shape[0], rnorm


@dataclasses.dataclass(frozen=True)
class Nystrom(LinearSolver):
    r"""Nystrom low-rank solve of the damped system (Hataya & Yamada, AISTATS 2023).

    Picks ``rank`` columns ``K`` of ``A`` (``rank`` matrix-vector products, batched with
    ``vmap``), approximates ``A ~ A_{:K} A_{KK}^+ A_{K:}`` and applies the Woodbury identity

    .. math:: (A_{:K} A_{KK}^{+} A_{K:} + \rho I)^{-1} b
       = Q\,(R D R^\top + \rho I)^{-1} Q^\top b + \frac{1}{\rho}(b - Q Q^\top b),

    with ``A_KK = U diag(s) U^T``, ``L = A_{:K} U |s|^{-1/2} = Q R`` (thin QR) and
    ``D = sign(s)`` over the eigenvalues above round-off (``|s| > rank * eps * max|s|``, zero
    otherwise), so a singular ``A_KK`` (a Hessian of rank below ``rank``) is handled by its
    pseudo-inverse. This is the paper's Woodbury identity
    ``b / rho - C^T (M + C C^T / rho)^{-1} C b / rho^2`` in a form that neither squares the
    condition number of ``L`` nor subtracts two ``1 / rho``-sized terms inside its range. Exact (to
    round-off) when ``rank`` equals the dimension or exceeds the rank of ``A``; otherwise an
    approximation of ``(A + rho I)^{-1}`` that cannot diverge (unlike a Neumann series) and whose
    products run in parallel (unlike CG's sequential ones).

    The solver answers the damped system ``(A + rho I) x = b`` (plus ``ridge``, if set): its
    derivatives and the reported residual (one more product) are those of that system.
    ``init`` is ignored: a warm start does not apply to a direct low-rank formula.

    Args:
      rank: number of columns ``k`` (Hessian-vector products), ``1 <= k <= n``.
      rho: damping ``rho > 0`` of the approximated system.
      key: PRNG key (or int seed) choosing the columns; ``None``: a fixed default choice.
      tol: relative residual tolerance of the converged flag.
      ridge: extra Tikhonov damping, as for the other solvers.

    Example:
      >>> import jax.numpy as jnp, solvers
      >>> A = jnp.diag(jnp.array([3.0, 2.0, 1.0]))
      >>> x, stats = solvers.nystrom(3, 1e-6)(lambda v: A @ v, jnp.ones(3))
      >>> x.round(3), int(stats.iterations)
      (Array([0.333, 0.5  , 1.   ], dtype=float32), 4)

    Reference: R. Hataya and M. Yamada, "Nystrom method for accurate and scalable implicit
    differentiation", AISTATS 2023.
    """

    rank: int
    rho: float
    key: Any = None
    tol: float = dataclasses.field(default=1e-5, kw_only=True)
    _symmetric: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        _set(self, "rank", checks.integer("rank", self.rank, 1))
        _set(self, "rho", checks.number("rho", self.rho, low=0.0, low_open=True))
        _set(self, "tol", checks.number("tol", self.tol, low=0.0))
        _set(self, "key", _key_data(self.key))

    def _prepare(self, matvec, b, init, ridge):
        b, _, ridge = super()._prepare(matvec, b, init, ridge)
        return b, None, ridge + self.rho  # the system solved is (A + ridge I + rho I) x = b

    def _solve(self, matvec, b, x0, bnorm):
        del x0
        b_flat, unravel = ravel_pytree(b)
        n, k, dtype = b_flat.shape[0], self.rank, b_flat.dtype
        if k > n:
            raise ValueError(f"nystrom rank={k} exceeds the {n} unknowns of b: use rank <= {n}")
        rho = jnp.asarray(self.rho, dtype)
        key = jax.random.wrap_key_data(jnp.asarray(self.key, jnp.uint32))
        cols = jax.random.permutation(key, n)[:k]
        mv = lambda v: ravel_pytree(matvec(unravel(v)))[0].astype(dtype)
        basis = jax.nn.one_hot(cols, n, dtype=dtype)  # (k, n)
        # Rows of C are the columns A e_i (A symmetric); matvec includes rho, take it back out.
        C = jax.vmap(mv)(basis) - rho * basis
        M = C[:, cols]
        s, U = jnp.linalg.eigh(0.5 * (M + M.T))
        keep = jnp.abs(s) > k * jnp.finfo(dtype).eps * jnp.max(jnp.abs(s))
        scale = jnp.where(keep, lax.rsqrt(jnp.where(keep, jnp.abs(s), 1.0)), 0.0)
        L = C.T @ (U * scale)  # (n, k): A ~ L diag(D) L^T; dropped directions are zero columns
        D = jnp.where(keep, jnp.sign(s), 0.0)
        # Woodbury through a thin QR of L (never L^T L): with L = Q R the approximation is
        # Q (R D R^T) Q^T, inverted exactly on span(Q) and as 1 / rho on its complement.
        Q, R = jnp.linalg.qr(L)
        qb = Q.T @ b_flat
        x = Q @ jnp.linalg.solve((R * D) @ R.T + rho * jnp.eye(k, dtype=dtype), qb)
        if k < n:  # for k = n the complement is empty; b - Q Q^T b would be round-off / rho
            x = x + (b_flat - Q @ qb) / rho
        x = unravel(x)
        rnorm = T.tree_norm(T.tree_sub(b, matvec(x)))
        return x, k + 1, rnorm


def _key_data(key: Any) -> tuple[int, ...]:
    """A hashable form of a PRNG key (typed or raw) or an int seed; ``None`` -> seed 0."""
    if key is None:
        key = 0
    if isinstance(key, int | np.integer) and not isinstance(key, bool):
        key = jax.random.key(int(key))
    try:
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.key_data(key)
        data = np.asarray(key, dtype=np.uint32).reshape(-1)
    except (AttributeError, TypeError, ValueError):
        raise TypeError(
            f"key must be a jax.random.key, a raw PRNGKey, an int seed or None, got {key!r}"
        ) from None
    return tuple(int(v) for v in data)


# Lower-case names are the public, documented spelling: ``solvers.cg(maxiter=30)``.
cg = CG
"""Conjugate gradients: ``solvers.cg(maxiter=30, ridge=1.0)``; the class :class:`CG`."""
neumann = Neumann
"""Truncated Neumann series: ``solvers.neumann(steps=1, scale=rho)``; the class :class:`Neumann`."""
gmres = GMRES
"""Restarted GMRES for non-symmetric systems: ``solvers.gmres()``; the class :class:`GMRES`."""
bicgstab = BiCGStab
"""BiCGStab for non-symmetric systems: ``solvers.bicgstab()``; the class :class:`BiCGStab`."""
direct = Direct
"""Dense LU solve (small problems, test oracle): ``solvers.direct()``; the class :class:`Direct`."""
nystrom = Nystrom
"""Nystrom low-rank solve: ``solvers.nystrom(rank=20, rho=0.1)``; the class :class:`Nystrom`."""
