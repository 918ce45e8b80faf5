r"""MAID: the Method of Adaptive Inexact Descent for deterministic bilevel problems.

Salehi, Mukherjee, Roberts, Schonlieb and Ehrhardt, "An adaptively inexact first-order method for
bilevel optimization with application to hyperparameter learning", SIAM Journal on Mathematics of
Data Science, 2025 (arXiv:2308.10098).

Notation (as in :mod:`bilevel._bilevel`): ``w`` the parameters, ``u`` the unconstrained
hyperparameters, ``h = c(u)`` their values; ``g(w, u) = inner_loss(w, c(u), inner_data)``,
``f(w, u) = outer_loss(w, c(u), outer_data)``; ``A = \nabla^2_{ww} g`` and
``B = \nabla^2_{wu} g`` (so that ``B^T q = \nabla_u \langle \nabla_w g, q \rangle``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import solvers
from bilevel import hparams as hp
from bilevel._bilevel import _loss, _typed_key, _values
from solvers import checks
from solvers import tree as T

__all__ = ["MAID", "MAIDEstimates", "MAIDState"]

PyTree = Any

_INT_MAX = np.iinfo(np.int32).max


class MAIDEstimates(NamedTuple):
    r"""MAID's running estimates of the constants of its error bound (part of the state).

    Lipschitz constants are running maxima of one warm-started power iteration per evaluation
    (each ``v_*`` is the power iteration's vector); ``mu`` is a running minimum.

    Attributes:
      mu: strong convexity of ``g`` in ``w``: the smallest Rayleigh quotient
        ``p^T A p / p^T p`` met by the conjugate-gradient solves so far (an *upper* estimate of
        the smallest Hessian eigenvalue; ``finfo.max`` before the first). Unused when ``MAID``
        was given ``mu``.
      outer_grad: ``L_{fw}``, Lipschitz constant of ``\nabla_w f`` in ``w``
        (``||\nabla^2_{ww} f||``).
      outer_hparam_grad: ``L_{fu}``, of ``\nabla_u f`` in ``w`` (``||\nabla^2_{uw} f||``; zero
        when the outer loss does not depend on the hyperparameters directly).
      mixed: ``L_B``, of ``B`` in ``w`` (third derivatives of ``g``).
      hessian: ``L_A``, of ``A`` in ``w`` (third derivatives of ``g``; zero for a quadratic
        inner loss).
      mixed_norm: ``||B||`` at the current parameters (not a running maximum).
      v_outer_grad, v_outer_hparam_grad, v_mixed, v_hessian: parameter-shaped vectors of the
        power iterations of the four Lipschitz constants.
      v_mixed_norm: hyperparameter-shaped vector of the power iteration of ``||B||``.
    """

    mu: jax.Array
    outer_grad: jax.Array
    outer_hparam_grad: jax.Array
    mixed: jax.Array
    hessian: jax.Array
    mixed_norm: jax.Array
    v_outer_grad: PyTree
    v_outer_hparam_grad: PyTree
    v_mixed: PyTree
    v_hessian: PyTree
    v_mixed_norm: PyTree


class MAIDState(NamedTuple):
    """State of :class:`MAID` (a pytree: jit, vmap and checkpoint it).

    Attributes:
      params: the lower-level solution ``w`` at ``hparams`` (to the accuracy of the last solve).
      hparams: unconstrained hyperparameters ``u``.
      adjoint: the last adjoint ``q`` (warm start of the next conjugate-gradient solve).
      eps: accuracy of the lower-level solves, ``||\\nabla_w g(w, u)|| <= eps``.
      delta: accuracy of the adjoint solves, ``||A q - \\nabla_w f|| <= delta``.
      step_size: the first step the next line search tries.
      estimates: :class:`MAIDEstimates`, the constants of the error bound.
      step: outer steps taken (int32).
      skipped: steps not applied because something was not finite (int32).
      cumulative_cost: lower-level iterations plus conjugate-gradient iterations so far (int32,
        saturating): the cost the paper plots.
      key: a PRNG key for the caller's own use (MAID is deterministic and never consumes it).
    """

    params: PyTree
    hparams: PyTree
    adjoint: PyTree
    eps: jax.Array
    delta: jax.Array
    step_size: jax.Array
    estimates: MAIDEstimates
    step: jax.Array
    skipped: jax.Array
    cumulative_cost: jax.Array
    key: jax.Array


class _Lower(NamedTuple):
    params: PyTree
    opt_state: PyTree
    value: jax.Array
    grad: PyTree
    grad_norm: jax.Array
    iterations: jax.Array
    ok: jax.Array


class _Eval(NamedTuple):
    """Everything known at the current hyperparameters after one accuracy level."""

    params: PyTree
    adjoint: PyTree
    hypergrad: PyTree
    inner_value: jax.Array
    value: jax.Array
    outer_grad_norm: jax.Array
    inner_residual: jax.Array  # ||grad_w g(w)||
    linear_residual: jax.Array  # ||A q - grad_w f|| (absolute)
    linear_tolerance: jax.Array  # the delta it was solved to
    bound: jax.Array
    mu: jax.Array
    inner_status: jax.Array
    inner_iterations: jax.Array
    linear_iterations: jax.Array
    estimates: MAIDEstimates


_GRADIENT, _TRIAL, _DONE = 0, 1, 2


class _Machine(NamedTuple):
    """The carry of one step: a state machine over gradient evaluations and line-search trials."""

    phase: jax.Array  # _GRADIENT: evaluate at u; _TRIAL: try u - alpha p; _DONE
    ev: _Eval
    eps: jax.Array
    delta: jax.Array
    loop: jax.Array  # backtracking loop (0 .. loops - 1)
    trial: jax.Array  # trial within the loop
    start: jax.Array  # first step of the loop
    alpha: jax.Array  # last step tried
    best_change: (
        jax.Array
    )  # smallest estimated change f(w+, u+) - f(w, u) among inconclusive trials
    best_alpha: jax.Array  # its step
    inconclusive: jax.Array  # the loop met a trial neither certified nor ruled out
    accepted: jax.Array
    hparams: PyTree  # the accepted u - alpha p
    params: PyTree  # the lower-level solution there
    inner_iterations: jax.Array
    linear_iterations: jax.Array
    backtracks: jax.Array


def _add(count: jax.Array, n: jax.Array) -> jax.Array:
    """Saturating int32 addition of a non-negative ``n``."""
    n = jnp.asarray(n, jnp.int32)
    return jnp.where(count > _INT_MAX - n, _INT_MAX, count + n).astype(jnp.int32)


def _unit(x: PyTree) -> PyTree:
    n = T.tree_norm(x)
    return T.tree_scale(jnp.where(n > 0, 1 / jnp.where(n > 0, n, 1), 0), x)


def _power(fn: Callable, v: PyTree, symmetric: bool = False) -> tuple[jax.Array, PyTree]:
    """One power iteration for the norm of a linear ``fn = M``: ``(||M v||, next v)``.

    ``v`` is a unit vector; ``||M v|| <= ||M||`` and tends to it over warm-started calls. The
    next vector is ``M v`` (``symmetric``: ``M = M^T``) or ``M^T M v``, normalized.
    """
    y = fn(v)
    if symmetric:
        z = y
    else:
        (z,) = jax.linear_transpose(fn, v)(y)
    zn = T.tree_norm(z)
    keep = (zn > 0) & jnp.isfinite(zn)
    v_new = T.tree_select(keep, T.tree_scale(1 / jnp.where(keep, zn, 1), z), v)
    return T.tree_norm(y), v_new


def _random_unit(like: PyTree, seed: int) -> PyTree:
    leaves, treedef = jax.tree.flatten(like)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    out = [
        jax.random.normal(k, jnp.shape(a), jnp.result_type(a))
        for k, a in zip(keys, leaves, strict=True)
    ]
    return _unit(jax.tree.unflatten(treedef, out))


def _cg(matvec, b, x0, tol, maxiter):
    """Conjugate gradients to an *absolute* (traced) tolerance ``||A x - b|| <= tol``.

    ``solvers.cg`` takes a static relative tolerance; MAID's ``delta`` is absolute and adapted
    inside ``jit``. Warm start ``x0`` (dropped when worse than zero), stop at non-positive
    curvature. Also returns the smallest Rayleigh quotient ``p^T A p / p^T p`` met (the
    strong-convexity estimate).
    """
    dtype = T.result_dtype(b)
    big = jnp.asarray(jnp.finfo(dtype).max, dtype)
    bnorm = T.tree_norm(b)
    r_warm = T.tree_sub(b, matvec(x0))
    use = jnp.isfinite(T.tree_norm(r_warm)) & (T.tree_norm(r_warm) <= bnorm)
    x = T.tree_select(use, x0, T.tree_zeros_like(b))
    r = T.tree_select(use, r_warm, b)
    rs = T.tree_vdot(r, r)
    tol2 = jnp.asarray(tol, dtype) ** 2

    def cond(c):
        _, _, _, rs, k, curved, _ = c
        return (k < maxiter) & (rs > tol2) & jnp.isfinite(rs) & curved

    def body(c):
        x, r, p, rs, k, _, ray = c
        ap = matvec(p)
        pap = T.tree_vdot(p, ap)
        pp = T.tree_vdot(p, p)
        curved = pap > 0
        ray = jnp.minimum(ray, jnp.where(pp > 0, pap / jnp.where(pp > 0, pp, 1), big))
        alpha = jnp.where(curved, rs / jnp.where(curved, pap, 1), 0)
        x = T.tree_add_scaled(x, alpha, p)
        r = T.tree_add_scaled(r, -alpha, ap)
        rs_new = jnp.where(curved, T.tree_vdot(r, r), jnp.where(jnp.isnan(pap), pap, rs))
        p = T.tree_add_scaled(r, rs_new / jnp.where(rs > 0, rs, 1), p)
        return x, r, p, rs_new, k + 1, curved, ray

    init = (x, r, r, rs, jnp.asarray(0, jnp.int32), jnp.asarray(True), big)
    x, _, _, rs, k, _, ray = lax.while_loop(cond, body, init)
    return x, jnp.sqrt(rs), k, ray


class MAID:
    r"""Adaptively inexact hypergradient descent with an inexact backtracking line search.

    A deterministic (full-batch) tuner for problems whose inner loss ``g(w, u)`` is strongly
    convex in ``w`` (ridge and logistic regression, variational image models). Each
    :meth:`step` at hyperparameters ``u``:

    1. **Inexact hypergradient.** Solve the lower level to accuracy ``eps`` (``inner_optimizer``
       from the previous solution until :math:`\|\nabla_w g(\tilde w, u)\| \le \epsilon`), the
       adjoint system :math:`A q = \nabla_w f(\tilde w)` by conjugate gradients to
       :math:`\|A q - \nabla_w f\| \le \delta` (from the previous ``q``), and form

       .. math:: p = \nabla_u f(\tilde w, u) - B(\tilde w)^\top q .

    2. **A-posteriori error bound.** With :math:`\bar\epsilon = \|\nabla_w g(\tilde w)\| / \mu
       \ge \|\tilde w - w^*\|` (strong convexity) and :math:`r = \|A q - \nabla_w f\|`,

       .. math:: \|p - \nabla F(u)\| \le \omega = L_{fu}\bar\epsilon + \frac{\|B\|}{\mu} r
          + L_B \bar\epsilon \Big(\|q\| + \frac{r}{\mu}\Big)
          + \big(\|B\| + L_B\bar\epsilon\big) \frac{\bar\epsilon}{\mu}
          \Big(L_{fw} + \frac{L_A}{\mu}\big(\|\nabla_w f\| + L_{fw}\bar\epsilon\big)\Big)

       (the paper's bound written at :math:`\tilde w`, all terms kept; it splits
       :math:`p - \nabla F` into the adjoint residual, the change of :math:`B` and of
       :math:`A^{-1}\nabla_w f` between :math:`\tilde w` and :math:`w^*`, and the direct
       term). While :math:`\omega > (1 - \eta)\|p\|`, shrink ``eps`` and ``delta`` by ``tau``
       (down to ``min_accuracy``) and solve again (warm-started). Then
       :math:`\nabla F^\top p \ge \eta \|p\|^2`: ``p`` is a descent direction.
    3. **Inexact backtracking.** Try :math:`u^+ = u - \alpha p` for
       :math:`\alpha = \beta\rho^i`, solving the lower level at :math:`u^+` to ``eps`` from
       :math:`\tilde w`. With the margins :math:`m = \|\nabla_w f(\tilde w)\|\bar\epsilon +
       \tfrac{L_{fw}}{2}\bar\epsilon^2 \ge |F(u) - f(\tilde w, u)|` (and :math:`m^+` at
       :math:`u^+`) and the change :math:`\Delta = f(\tilde w^+, u^+) - f(\tilde w, u)`, a trial
       is *certified* (accepted) when the upper bound of :math:`F(u^+)` minus the lower bound of
       :math:`F(u)` shows sufficient decrease,

       .. math:: \Delta + m^+ + m \le -\eta^2 \alpha \|p\|^2 ,

       *ruled out* when even :math:`\Delta - m^+ - m` exceeds :math:`-\eta^2\alpha\|p\|^2`
       (the step is too long, or the trial not finite: backtrack), and *uncertain* otherwise
       (the accuracy is too low to decide: ``eps`` and ``delta`` shrink by ``tau`` and steps
       1-3 repeat from the same step). At most ``loops`` loops of at most ``backtracks`` trials
       (one more per loop). On success ``eps`` and ``delta`` grow by ``nu`` and the next first
       step is :math:`\tfrac{10}{9}\alpha`; after a failed step (``u`` kept) it is the best
       uncertain trial, or the step below the last one when every trial was ruled out.

       The sufficient-decrease constant is :math:`\eta^2 < \eta`, as in the reference
       implementation: with :math:`\nabla F^\top p \ge \eta\|p\|^2` a constant :math:`\eta`
       could fail for every step. Two departures from the reference implementation, which
       always finishes a loop's trials and restarts every loop from :math:`\beta`: an uncertain
       trial ends its loop at once (smaller steps only shrink the decrease against the same
       margins), and a ruled-out loop continues below its last trial (so a first step far too
       long cannot stall the method). Where the accuracies cannot shrink (``adaptive=False``,
       or both at ``min_accuracy``), uncertain trials keep backtracking until one does worse
       than an earlier one, and a failed loop ends the step (another would repeat it).

    **Constants of the bound** (:class:`MAIDEstimates`, carried in the state):
    ``mu`` is the strong convexity of ``g`` in ``w``: pass it (a number, or a function of the
    hyperparameter values, e.g. ``lambda h: 2 * h["wd"]`` for an ``h ||w||^2`` penalty) when
    it is known; by default it is the smallest Rayleigh quotient met by the conjugate
    gradient iterations so far, which over-estimates the smallest eigenvalue (optimistic; a
    lower level that is not strongly convex, met as non-positive curvature, makes ``mu <= 0``,
    the bound infinite and no step certifiable: MAID needs a strongly convex lower level). The
    Lipschitz constants :math:`L_{fw}, L_{fu}, L_B, L_A` (of :math:`\nabla_w f`,
    :math:`\nabla_u f`, :math:`B`, :math:`A` in ``w``) are running maxima of one warm-started
    power iteration on the corresponding second or third derivative at each evaluated point
    (the reference implementation also keeps running maxima of such probes), and ``||B||`` is
    one warm-started power iteration at the current point. Power iterations approach the norms
    from below, so the bound is an estimate, not a certificate, until they have converged.

    ``eps`` is a tolerance on the lower-level gradient norm (as in HOAG) where the paper bounds
    the distance :math:`\|\tilde w - w^*\| \le \epsilon` through the stopping rule
    :math:`\|\nabla_w g\| \le \mu\epsilon`; the two agree through :math:`\bar\epsilon`,
    which uses the residual actually reached (often below ``eps`` after a warm start).

    With ``adaptive=False`` the accuracies stay at ``eps`` and ``delta`` (the fixed-accuracy
    method, e.g. ``eps = delta = 1e-6`` as in HOAG-style methods) and only the line search
    adapts the step. :meth:`step` is jitted (``lax.while_loop`` throughout; compose it with an
    outer ``jit`` or ``vmap``). Non-finite values never reach the state: a step whose
    hypergradient, outer loss, lower-level solve or new state is not finite is not applied
    (:func:`solvers.guard`) and ``skipped`` counts it.

    Args:
      inner_loss: ``inner_loss(params, h, batch) -> scalar``, strongly convex in ``params``.
      outer_loss: ``outer_loss(params, h, batch) -> scalar``.
      space: hyperparameter space (pytree of :mod:`bilevel.hparams` specs).
      inner_optimizer: Optax transformation solving the lower level (restarted at every solve;
        receives ``value``, ``grad`` and ``value_fn``, so ``optax.lbfgs()`` works); default
        ``optax.lbfgs()``.
      mu: strong-convexity constant of the inner loss in ``params``: a positive number, a
        function ``mu(h)`` of the hyperparameter values, or ``None`` (estimated, above).
      eps: initial lower-level accuracy (gradient norm), ``> 0``.
      delta: initial adjoint accuracy (absolute residual), ``> 0``.
      step_size: first step of the first line search, ``> 0``.
      eta: ``0 < eta < 1``: the bound must stay below ``(1 - eta) ||p||``; sufficient decrease
        ``eta^2``.
      rho: ``0 < rho < 1``: backtracking factor.
      tau: ``0 < tau < 1``: accuracy decrease factor.
      nu: ``nu >= 1``: accuracy increase factor after a successful step.
      loops: most backtracking loops per step (``>= 1``).
      backtracks: trial steps in the first loop (one more in each further loop), ``>= 1``.
      adaptive: adapt ``eps`` and ``delta`` (``False``: fixed accuracies).
      min_accuracy: floor of ``eps`` and ``delta``; ``None``: ``finfo(dtype).eps ** 0.75`` of the
        parameters' dtype (``1.8e-12`` in float64, ``6.4e-6`` in float32).
      inner_maxiter: most iterations of one lower-level solve (``>= 1``).
      linear_maxiter: most iterations of one conjugate-gradient solve; ``None``:
        ``min(10 n, 1000)`` for ``n`` parameters.
      throw: raise (inside ``jit`` too) when a step is not ``SUCCESS`` instead of reporting it.

    Example:
      >>> import jax, jax.numpy as jnp, bilevel
      >>> X = jax.random.normal(jax.random.key(0), (40, 3)); y = X @ jnp.array([1.0, -1.0, 0.5])
      >>> inner = lambda w, h, b: jnp.mean((b[0] @ w - b[1]) ** 2) + h["wd"] * w @ w
      >>> outer = lambda w, h, b: jnp.mean((b[0] @ w - b[1]) ** 2)
      >>> maid = bilevel.MAID(inner, outer, space={"wd": bilevel.hparams.log(1.0)},
      ...                     mu=lambda h: 2 * h["wd"])
      >>> state = maid.init(jnp.zeros(3))
      >>> state, history = maid.fit(state, (X[:30], y[:30]), (X[30:], y[30:]), steps=5,
      ...                           progress=False)
      >>> bool(history["hparams/wd"][-1] < 1.0), history["cumulative_cost"].shape
      (True, (5,))

    Reference: M. S. Salehi, S. Mukherjee, L. Roberts, C.-B. Schonlieb, M. J. Ehrhardt, "An
    adaptively inexact first-order method for bilevel optimization with application to
    hyperparameter learning", SIAM J. Math. Data Sci., 2025 (arXiv:2308.10098); fixed-accuracy
    baseline: F. Pedregosa, "Hyperparameter optimization with approximate gradient", ICML 2016.
    """

    def __init__(
        self,
        inner_loss: Callable,
        outer_loss: Callable,
        *,
        space: PyTree,
        inner_optimizer: optax.GradientTransformation | None = None,
        mu: float | Callable | None = None,
        eps: float = 0.1,
        delta: float = 0.1,
        step_size: float = 0.1,
        eta: float = 1e-4,
        rho: float = 0.9,
        tau: float = 0.5,
        nu: float = 1.05,
        loops: int = 3,
        backtracks: int = 10,
        adaptive: bool = True,
        min_accuracy: float | None = None,
        inner_maxiter: int = 1000,
        linear_maxiter: int | None = None,
        throw: bool = False,
    ):
        for name, fn in (("inner_loss", inner_loss), ("outer_loss", outer_loss)):
            if not callable(fn):
                raise TypeError(f"{name} must be a callable loss(params, h, batch), got {fn!r}")
        if inner_optimizer is None:
            inner_optimizer = optax.lbfgs()
        if not isinstance(inner_optimizer, optax.GradientTransformation):
            raise TypeError(
                f"inner_optimizer must be an optax.GradientTransformation, got {inner_optimizer!r}"
            )
        if mu is not None and not callable(mu):
            mu = checks.number("mu", mu, low=0.0, low_open=True)
        self._u0 = hp.init(space)  # validates the space
        self.space = space
        self.mu = mu
        self.eps = checks.number("eps", eps, low=0.0, low_open=True)
        self.delta = checks.number("delta", delta, low=0.0, low_open=True)
        self.step_size = checks.number("step_size", step_size, low=0.0, low_open=True)
        self.eta = checks.number("eta", eta, low=0.0, high=1.0, low_open=True, high_open=True)
        self.rho = checks.number("rho", rho, low=0.0, high=1.0, low_open=True, high_open=True)
        self.tau = checks.number("tau", tau, low=0.0, high=1.0, low_open=True, high_open=True)
        self.nu = checks.number("nu", nu, low=1.0)
        self.loops = checks.integer("loops", loops)
        self.backtracks = checks.integer("backtracks", backtracks)
        if not isinstance(adaptive, bool | np.bool_):
            raise TypeError(f"adaptive must be a bool, got {adaptive!r}")
        if not isinstance(throw, bool | np.bool_):
            raise TypeError(f"throw must be a bool, got {throw!r}")
        self.adaptive = bool(adaptive)
        self.throw = bool(throw)
        self.min_accuracy = checks.optional_number(
            "min_accuracy", min_accuracy, low=0.0, low_open=True
        )
        self.inner_maxiter = checks.integer("inner_maxiter", inner_maxiter)
        self.linear_maxiter = checks.optional_integer("linear_maxiter", linear_maxiter)
        self.inner_optimizer = optax.with_extra_args_support(inner_optimizer)
        self._inner = _loss(inner_loss, "inner_loss", False)
        self._outer = _loss(outer_loss, "outer_loss", False)
        self._step = jax.jit(self._step_impl)

    def __repr__(self) -> str:
        return (
            f"MAID(eps={self.eps:g}, delta={self.delta:g}, step_size={self.step_size:g}, "
            f"adaptive={self.adaptive})"
        )

    # ------------------------------------------------------------------ public API

    def init(
        self, params: PyTree, hparams: PyTree | None = None, key: jax.Array | None = None
    ) -> MAIDState:
        """The initial state.

        Args:
          params: initial parameters (the first lower-level solve starts here).
          hparams: optional **unconstrained** hyperparameters (default: the space's initial
            values); one per member under ``jax.vmap``. Build them from values with
            ``bilevel.hparams.unconstrain``.
          key: PRNG key stored in the state for the caller (default ``jax.random.key(0)``).

        Returns:
          A :class:`MAIDState`.
        """
        params = jax.tree.map(jnp.asarray, params)
        if not jax.tree.leaves(params):
            raise ValueError("params must contain at least one array")
        for leaf in jax.tree.leaves(params):
            if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
                raise TypeError(f"params must have floating leaves, got {T.describe(params)}")
        if hparams is None:
            u = self._u0
        else:
            hp.constrain(self.space, hparams)  # structure and shape check, names the entry
            u = jax.tree.map(lambda a, ref: jnp.asarray(a, ref.dtype), hparams, self._u0)
            if T.is_concrete(u) and not all(
                np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(u)
            ):
                raise ValueError("hparams contains non-finite values")
        dt = T.result_dtype(params)
        zero = jnp.zeros((), dt)
        estimates = MAIDEstimates(
            mu=jnp.asarray(jnp.finfo(dt).max, dt),
            outer_grad=zero,
            outer_hparam_grad=zero,
            mixed=zero,
            hessian=zero,
            mixed_norm=zero,
            v_outer_grad=_random_unit(params, 1),
            v_outer_hparam_grad=_random_unit(params, 2),
            v_mixed=_random_unit(params, 3),
            v_hessian=_random_unit(params, 4),
            v_mixed_norm=_random_unit(u, 5),
        )
        count = jnp.asarray(0, jnp.int32)
        return MAIDState(
            params=params,
            hparams=u,
            adjoint=T.tree_zeros_like(params),
            eps=jnp.asarray(self.eps, dt),
            delta=jnp.asarray(self.delta, dt),
            step_size=jnp.asarray(self.step_size, dt),
            estimates=estimates,
            step=count,
            skipped=count,
            cumulative_cost=count,
            key=_typed_key(key),
        )

    def hparams(self, state: MAIDState) -> PyTree:
        """Constrained hyperparameter values of ``state``."""
        return hp.constrain(self.space, state.hparams)

    def params(self, state: MAIDState) -> PyTree:
        """Lower-level solution (model parameters) of ``state``."""
        return state.params

    def step(
        self, state: MAIDState, inner_data: PyTree, outer_data: PyTree
    ) -> tuple[MAIDState, dict[str, Any]]:
        """One MAID step on the full data (jitted).

        Args:
          state: current state (from :meth:`init`).
          inner_data: the training set, passed whole as ``batch`` to ``inner_loss``.
          outer_data: the validation set, passed whole to ``outer_loss``.

        Returns:
          ``(state, metrics)``; metrics (the vocabulary shared by every tuner, plus MAID's own):

          - ``inner_loss``, ``outer_loss`` at the current hyperparameters (before the update),
            ``hypergrad`` (the inexact ``p``, w.r.t. ``u``), ``hypergrad_norm``, ``hparams``
            (constrained, after the update);
          - ``status``: :class:`solvers.Status` of the step: ``NONFINITE`` (not applied),
            ``MAX_STEPS`` (the lower-level solve ran out of ``inner_maxiter`` before ``eps``),
            ``LINEAR_SOLVE_FAILED`` (CG did not reach ``delta``) or ``SUCCESS``;
          - ``linear_iterations`` (CG iterations this step), ``linear_residual`` (relative
            residual of the last adjoint solve), ``skipped`` (cumulative);
          - ``eps``, ``delta`` (accuracies for the next step), ``step_size`` (the accepted step,
            0 when every trial was rejected), ``accepted``, ``backtracks`` (rejected trials),
            ``inner_iterations`` (lower-level iterations this step), ``cumulative_cost``
            (lower-level plus CG iterations so far), ``error_bound`` (the bound ``omega`` on
            ``||p - grad F||``).
        """
        if not isinstance(state, MAIDState):
            raise TypeError(f"state must be a MAIDState from MAID.init, got {type(state).__name__}")
        for name, data in (("inner_data", inner_data), ("outer_data", outer_data)):
            if data is None:
                raise ValueError(f"{name} is None: pass the full data set for the loss")
        return self._step(state, inner_data, outer_data)

    def sample_batches(
        self,
        state: MAIDState,
        inner_data: PyTree,
        outer_data: PyTree,
        batch_size: int | None = None,
        outer_batch_size: int | None = None,
    ) -> tuple[PyTree, PyTree]:
        """The data of the next :meth:`step`: all of it (MAID is a full-batch method).

        Present so that :func:`bilevel.fit` drives MAID like any tuner; the sizes are ignored.
        """
        del state, batch_size, outer_batch_size
        return inner_data, outer_data

    def fit(
        self,
        state: MAIDState,
        inner_data: PyTree,
        outer_data: PyTree,
        *,
        steps: int,
        **kwargs: Any,
    ) -> tuple[MAIDState, dict[str, np.ndarray]]:
        """Run ``steps`` MAID steps on the full data with :func:`bilevel.fit`.

        Jitted chunks of steps, one progress bar, a metrics history, callbacks and periodic
        checkpoints with resume. Keyword arguments: ``chunk``, ``callbacks``,
        ``checkpoint_dir``, ``checkpoint_every``, ``resume``, ``progress``, ``desc``,
        ``log_dir``, ``tensorboard`` (see :func:`bilevel.fit`).

        Returns:
          ``(state, history)``; ``history`` maps ``"step"`` and every metric of :meth:`step`
          (``"hparams/<name>"``, ``"cumulative_cost"``, ``"eps"``, ...) to NumPy arrays with one
          row per step.
        """
        from bilevel._fit import fit

        for bad in ("batch_size", "outer_batch_size", "warmup_steps"):
            if bad in kwargs:
                raise TypeError(f"MAID.fit takes no {bad}: MAID is a full-batch method")
        return fit(self, state, inner_data, outer_data, steps=steps, batch_size=1, **kwargs)

    # ------------------------------------------------------------------ internals

    def _floor(self, dt) -> float:
        if self.min_accuracy is not None:
            return self.min_accuracy
        return float(np.finfo(dt).eps) ** 0.75

    def _mu(self, estimate, u, dt):
        if self.mu is None:
            return estimate
        if callable(self.mu):
            return jnp.asarray(self.mu(_values(self.space, u)), dt)
        return jnp.asarray(self.mu, dt)

    def _step_impl(self, state, inner_data, outer_data):
        u0 = state.hparams
        dt = T.result_dtype(state.params)
        floor = self._floor(dt)
        n = T.tree_size(state.params)
        cg_maxiter = self.linear_maxiter or min(10 * n, 1000)
        opt = self.inner_optimizer
        Status = solvers.Status

        def g(w, u):
            return self._inner(w, _values(self.space, u), inner_data)[0]

        def f(w, u):
            return self._outer(w, _values(self.space, u), outer_data)[0]

        def gw(w, u):
            return jax.grad(g)(w, u)

        def lower(w0, u, eps):
            """Lower-level solve from ``w0`` until ``||grad_w g|| <= eps`` (guarded steps)."""
            fun = lambda w: g(w, u)
            vg = jax.value_and_grad(fun)
            value, grad = vg(w0)
            gn = T.tree_norm(grad)
            ok = jnp.isfinite(value) & jnp.isfinite(gn)
            c0 = _Lower(w0, opt.init(w0), value, grad, gn, jnp.asarray(0, jnp.int32), ok)

            def cond(c):
                return c.ok & (c.grad_norm > eps) & (c.iterations < self.inner_maxiter)

            def body(c):
                updates, opt_state = opt.update(
                    c.grad, c.opt_state, c.params, value=c.value, grad=c.grad, value_fn=fun
                )
                w = optax.apply_updates(c.params, updates)
                value, grad = vg(w)
                r = solvers.guard(
                    (c.params, c.opt_state, c.value, c.grad),
                    (w, opt_state, value, grad),
                    jnp.asarray(0, jnp.int32),
                )
                w, opt_state, value, grad = r.value
                return _Lower(
                    w, opt_state, value, grad, T.tree_norm(grad), c.iterations + 1, r.applied
                )

            c = lax.while_loop(cond, body, c0)
            status = jnp.where(
                ~c.ok,
                Status.NONFINITE,
                jnp.where(c.grad_norm <= eps, Status.SUCCESS, Status.MAX_STEPS),
            ).astype(jnp.int32)
            return c, status

        def estimate(w, q, est):
            """One warm power iteration per constant of the bound (Lipschitz: running maxima)."""
            qhat = _unit(q)
            fw_of = lambda w: jax.grad(f, argnums=0)(w, u0)
            fu_of = lambda w: jax.grad(f, argnums=1)(w, u0)
            btq_of = lambda w: jax.vjp(lambda u: gw(w, u), u0)[1](qhat)[0]
            aq_of = lambda w: jax.jvp(lambda w: gw(w, u0), (w,), (qhat,))[1]

            def along(fn):  # d -> (d/dt) fn(w + t d): the derivative whose norm is sought
                return lambda d: jax.jvp(fn, (w,), (d,))[1]

            l_fw, v_fw = _power(along(fw_of), est.v_outer_grad, symmetric=True)
            l_fu, v_fu = _power(along(fu_of), est.v_outer_hparam_grad)
            l_b, v_b = _power(along(btq_of), est.v_mixed)
            l_a, v_a = _power(along(aq_of), est.v_hessian, symmetric=True)
            mixed = lambda v: jax.jvp(lambda u: gw(w, u), (u0,), (v,))[1]
            n_b, v_nb = _power(mixed, est.v_mixed_norm)
            fin = lambda x: jnp.where(jnp.isfinite(x), x, 0).astype(dt)
            return est._replace(
                outer_grad=jnp.maximum(est.outer_grad, fin(l_fw)),
                outer_hparam_grad=jnp.maximum(est.outer_hparam_grad, fin(l_fu)),
                mixed=jnp.maximum(est.mixed, fin(l_b)),
                hessian=jnp.maximum(est.hessian, fin(l_a)),
                mixed_norm=fin(n_b),
                v_outer_grad=v_fw,
                v_outer_hparam_grad=v_fu,
                v_mixed=v_b,
                v_hessian=v_a,
                v_mixed_norm=v_nb,
            )

        def error_bound(mu, r_w, r_q, q_norm, fw_norm, est):
            mu_ok = mu > 0
            mu = jnp.where(mu_ok, mu, 1)
            eb = r_w / mu  # >= ||w - w*||
            nb, lb, la = est.mixed_norm, est.mixed, est.hessian
            lfw, lfu = est.outer_grad, est.outer_hparam_grad
            omega = (
                lfu * eb
                + nb * r_q / mu
                + lb * eb * (q_norm + r_q / mu)
                + (nb + lb * eb) * (eb / mu) * (lfw + la * (fw_norm + lfw * eb) / mu)
            )
            return jnp.where(mu_ok, omega, jnp.inf).astype(dt)

        def assess(lo, inner_status, value, fw, fu, q0, est, delta):
            """At ``u0``: the adjoint, the hypergradient, the constants and the bound."""
            w = lo.params
            hvp = lambda v: jax.jvp(lambda w: gw(w, u0), (w,), (v,))[1]
            q, r_q, cg_iters, ray = _cg(hvp, fw, q0, delta, cg_maxiter)
            est = est._replace(mu=jnp.minimum(est.mu, ray.astype(dt)))
            p = T.tree_sub(fu, jax.vjp(lambda u: gw(w, u), u0)[1](q)[0])
            est = estimate(w, q, est)
            mu = self._mu(est.mu, u0, dt)
            fw_norm = T.tree_norm(fw).astype(dt)
            r_w = lo.grad_norm.astype(dt)
            r_q = r_q.astype(dt)
            return _Eval(
                params=w,
                adjoint=q,
                hypergrad=p,
                inner_value=jnp.asarray(lo.value, dt),
                value=jnp.asarray(value, dt),
                outer_grad_norm=fw_norm,
                inner_residual=r_w,
                linear_residual=r_q,
                linear_tolerance=jnp.asarray(delta, dt),
                bound=error_bound(mu, r_w, r_q, T.tree_norm(q), fw_norm, est),
                mu=mu,
                inner_status=inner_status,
                inner_iterations=lo.iterations,
                linear_iterations=cg_iters,
                estimates=est,
            )

        def finite_eval(ev):
            return T.tree_all_finite((ev.hypergrad, ev.value, ev.params, ev.adjoint)) & (
                ev.inner_status != Status.NONFINITE
            )

        def shrunk(x):
            return jnp.maximum(self.tau * x, floor).astype(dt)

        def on_gradient(c, lo, st, u, alpha, value, fw, fu):
            del u, alpha
            ev = assess(lo, st, value, fw, fu, c.ev.adjoint, c.ev.estimates, c.delta)
            ok = finite_eval(ev)
            shrink = (
                self.adaptive
                & (ev.bound > (1 - self.eta) * T.tree_norm(ev.hypergrad))
                & ((c.eps > floor) | (c.delta > floor))
                & ok
            )
            phase = jnp.where(~ok, _DONE, jnp.where(shrink, _GRADIENT, _TRIAL))
            return c._replace(
                phase=phase.astype(jnp.int32),
                ev=ev,
                eps=jnp.where(shrink, shrunk(c.eps), c.eps),
                delta=jnp.where(shrink, shrunk(c.delta), c.delta),
                trial=jnp.zeros_like(c.trial),
                inconclusive=jnp.zeros_like(c.inconclusive),
                linear_iterations=c.linear_iterations + ev.linear_iterations,
            )

        def on_trial(c, lo, st, u, alpha, value, fw, fu):
            del fu
            ev = c.ev
            lfw = ev.estimates.outer_grad
            eb0 = ev.inner_residual / jnp.where(ev.mu > 0, ev.mu, 1)
            margin0 = ev.outer_grad_norm * eb0 + 0.5 * lfw * eb0**2  # |F(u0) - f(w0, u0)|
            mu = self._mu(ev.estimates.mu, u, dt)
            eb = lo.grad_norm / jnp.where(mu > 0, mu, 1)
            margin = T.tree_norm(fw) * eb + 0.5 * lfw * eb**2  # |F(u) - f(w, u)|
            need = -(self.eta**2) * alpha * T.tree_vdot(ev.hypergrad, ev.hypergrad)
            change = value - ev.value
            finite = (
                jnp.isfinite(margin)
                & jnp.isfinite(change)
                & (mu > 0)
                & (st != Status.NONFINITE)
                & T.tree_all_finite((u, lo.params, hp.constrain(self.space, u)))
            )
            accepted = (change + margin + margin0 <= need) & finite  # certified decrease
            # Neither certified nor ruled out (change - margins <= need): the accuracy, not the
            # step, is what fails; a smaller step only shrinks the decrease against the margins.
            unsure = ~accepted & finite & (change - margin - margin0 <= need)
            # Neither certified nor ruled out: the accuracy, not the step, fails. While the
            # accuracies can shrink, end the loop there (shrink them, retry this step).
            can_refine = self.adaptive & ((c.eps > floor) | (c.delta > floor))
            refine = unsure & can_refine
            # Otherwise keep backtracking (past the peak of the decrease, smaller steps help)
            # until an uncertain trial does worse than an earlier one.
            peaked = unsure & c.inconclusive & (change > c.best_change)
            better = unsure & ~peaked
            best_change = jnp.where(better, change, c.best_change).astype(dt)
            best_alpha = jnp.where(better, alpha, c.best_alpha).astype(dt)
            inconclusive = c.inconclusive | unsure
            last = refine | peaked | (c.trial + 1 >= self.backtracks + c.loop)
            new_loop = ~accepted & last & (c.loop + 1 < self.loops) & can_refine
            done = accepted | (last & ~new_loop)
            shrink = ~accepted & last & can_refine  # a failed loop (the last one too) refines
            phase = jnp.where(done, _DONE, jnp.where(new_loop, _GRADIENT, _TRIAL))
            # Next first step: the best uncertain one, else below the last (all ruled out).
            start = jnp.where(inconclusive, best_alpha, alpha * self.rho)
            return c._replace(
                phase=phase.astype(jnp.int32),
                eps=jnp.where(shrink, shrunk(c.eps), c.eps),
                delta=jnp.where(shrink, shrunk(c.delta), c.delta),
                loop=jnp.where(new_loop, c.loop + 1, c.loop),
                trial=jnp.where(last, 0, c.trial + 1),
                start=jnp.where(last & ~accepted, start, c.start).astype(dt),
                alpha=alpha,
                best_change=best_change,
                best_alpha=best_alpha,
                inconclusive=inconclusive,
                accepted=accepted,
                hparams=T.tree_select(accepted, u, c.hparams),
                params=T.tree_select(accepted, lo.params, c.params),
                backtracks=c.backtracks + (~accepted).astype(jnp.int32),
            )

        def body(c):
            at_u0 = c.phase == _GRADIENT
            rho = jnp.asarray(self.rho, dt)
            alpha = (c.start * rho ** c.trial.astype(dt)).astype(dt)
            u = T.tree_select(at_u0, u0, T.tree_add_scaled(u0, -alpha, c.ev.hypergrad))
            lo, st = lower(c.ev.params, u, c.eps)
            value, (fw, fu) = jax.value_and_grad(f, argnums=(0, 1))(lo.params, u)
            c = c._replace(inner_iterations=c.inner_iterations + lo.iterations)
            return lax.cond(at_u0, on_gradient, on_trial, c, lo, st, u, alpha, value, fw, fu)

        def first_evaluation():  # shapes only (jax.eval_shape)
            lo, st = lower(state.params, u0, state.eps)
            value, (fw, fu) = jax.value_and_grad(f, argnums=(0, 1))(lo.params, u0)
            return assess(lo, st, value, fw, fu, state.adjoint, state.estimates, state.delta)

        blank = jax.tree.map(
            lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(first_evaluation)
        )
        blank = blank._replace(
            params=state.params, adjoint=state.adjoint, estimates=state.estimates
        )
        zero = jnp.asarray(0, jnp.int32)
        no = jnp.asarray(False)
        c = lax.while_loop(
            lambda c: c.phase != _DONE,
            body,
            _Machine(
                phase=jnp.asarray(_GRADIENT, jnp.int32),
                ev=blank,
                eps=state.eps,
                delta=state.delta,
                loop=zero,
                trial=zero,
                start=state.step_size,
                alpha=state.step_size,
                best_change=jnp.zeros((), dt),
                best_alpha=state.step_size,
                inconclusive=no,
                accepted=no,
                hparams=u0,
                params=state.params,
                inner_iterations=zero,
                linear_iterations=zero,
                backtracks=zero,
            ),
        )
        ev, accepted = c.ev, c.accepted

        grow = accepted & self.adaptive
        eps = jnp.where(grow, self.nu * c.eps, c.eps).astype(dt)
        delta = jnp.where(grow, self.nu * c.delta, c.delta).astype(dt)
        # Success: grow the step by 10/9. Failure: the next first step is the best uncertain
        # trial of the last loop, or below its last trial when every trial was ruled out.
        step_size = jnp.where(accepted, c.alpha * (10 / 9), c.start).astype(dt)
        new_u = T.tree_select(accepted, c.hparams, u0)
        new_w = T.tree_select(accepted, c.params, ev.params)
        old = (
            state.params,
            state.hparams,
            state.adjoint,
            state.eps,
            state.delta,
            state.step_size,
            state.estimates,
        )
        new = (new_w, new_u, ev.adjoint, eps, delta, step_size, ev.estimates)
        also = (ev.hypergrad, ev.value, hp.constrain(self.space, new_u))
        finite = T.tree_all_finite((new, also)) & finite_eval(ev)
        r = solvers.guard(old, new, state.skipped, finite=finite)
        params, u, adjoint, eps, delta, step_size, estimates = r.value
        status = jnp.where(
            ~r.applied,
            Status.NONFINITE,
            jnp.where(
                ev.inner_status == Status.MAX_STEPS,
                Status.MAX_STEPS,
                jnp.where(
                    ev.linear_residual > ev.linear_tolerance,
                    Status.LINEAR_SOLVE_FAILED,
                    Status.SUCCESS,
                ),
            ),
        ).astype(jnp.int32)
        if self.throw:
            solvers.error_if_failed(status, "MAID.step")
        cost = _add(_add(state.cumulative_cost, c.inner_iterations), c.linear_iterations)
        new_state = MAIDState(
            params=params,
            hparams=u,
            adjoint=adjoint,
            eps=eps,
            delta=delta,
            step_size=step_size,
            estimates=estimates,
            step=optax.safe_increment(state.step),
            skipped=r.skipped,
            cumulative_cost=cost,
            key=state.key,
        )
        fw_norm = ev.outer_grad_norm
        applied = accepted & r.applied
        metrics = {
            "inner_loss": ev.inner_value,
            "outer_loss": ev.value,
            "hypergrad": ev.hypergrad,
            "hypergrad_norm": optax.tree.norm(ev.hypergrad),
            "hparams": self.hparams(new_state),
            "status": status,
            "linear_iterations": c.linear_iterations,
            "linear_residual": jnp.where(
                fw_norm > 0, ev.linear_residual / jnp.where(fw_norm > 0, fw_norm, 1), 0
            ),
            "skipped": new_state.skipped,
            "eps": eps,
            "delta": delta,
            "step_size": jnp.where(applied, c.alpha, 0).astype(dt),
            "accepted": applied,
            "backtracks": c.backtracks,
            "inner_iterations": c.inner_iterations,
            "cumulative_cost": cost,
            "error_bound": ev.bound,
        }
        return new_state, metrics
