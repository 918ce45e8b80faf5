r"""Hypergradient methods: how a derivative through an inner optimization is computed.

Every method is a small immutable strategy object implementing one protocol
(:class:`AbstractMethod`, in the spirit of Optimistix's ``AbstractAdjoint.apply``); the callers
(:func:`solvers.argmin`, ``bilevel.hypergradient``, ``bilevel.BilevelOptimizer``) describe their
inner optimization as an :class:`InnerLoop` and never branch on the method's type.

An :class:`InnerLoop` is ``num_steps`` steps :math:`c_{t+1} = \Phi(c_t, \theta, x_t)` of a
carry :math:`c` (parameters, optimizer state, counters) with per-step inputs :math:`x_t`
(minibatches) and differentiable arguments :math:`\theta` (hyperparameters). A method provides

- :meth:`AbstractMethod.solve`: run the loop so that the final carry is differentiable w.r.t.
  :math:`\theta` the way the method says (used by ``argmin``);
- :meth:`AbstractMethod.hypergradient`: run the loop and return
  :math:`d\,L_V(w_T(\theta), \theta)/d\theta` with the method's memory (warm-start adjoint,
  forward tangents) and diagnostics (used by the one-shot and online tuners);
- :meth:`AbstractMethod.init`: that memory's initial value.

The windowing "run ``n - K`` steps without derivatives, differentiate the last ``K``, optionally
rematerialized" is written once (:func:`windowed_solve`); :class:`Unrolled` is its ``K = n`` case
and :class:`Truncated` its ``K`` case.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jex_core
from jax.flatten_util import ravel_pytree
from jax.interpreters import ad, batching, mlir

from solvers import checks
from solvers import tree as T
from solvers._curvature import GaussNewton
from solvers._implicit import implicit_solution
from solvers._linear import CG, LinearSolver
from solvers._status import Status

PyTree = Any

__all__ = [
    "AbstractMethod",
    "DampedAdjoint",
    "Forward",
    "Hypergradient",
    "Implicit",
    "InnerLoop",
    "Truncated",
    "Unrolled",
    "windowed_solve",
]


# ----------------------------------------------------------------------------- the inner loop


class InnerLoop(abc.ABC):
    r"""An inner optimization of ``num_steps`` steps, differentiable w.r.t. ``theta``.

    Subclasses implement :meth:`step`, :meth:`params`, :meth:`replace_params` and (for implicit
    methods) :meth:`optimality`; they set ``num_steps`` and the per-step inputs: ``xs`` (a pytree
    whose leaves have a leading axis of ``num_steps``) or ``shared`` (one input used by every
    step, e.g. the full training set; ``None`` when steps take no input).

    .. math:: c_{t+1} = \Phi(c_t, \theta, x_t), \quad t = 0, \dots, n - 1
    """

    num_steps: int
    xs: PyTree | None = None
    shared: PyTree | None = None

    @abc.abstractmethod
    def step(self, carry: PyTree, theta: PyTree, x: PyTree) -> tuple[PyTree, PyTree]:
        """One (guarded) step: ``(carry, theta, x) -> (carry, out)``; ``out`` is stacked."""

    @abc.abstractmethod
    def params(self, carry: PyTree) -> PyTree:
        """The parameters ``w`` inside ``carry``."""

    @abc.abstractmethod
    def replace_params(self, carry: PyTree, params: PyTree) -> PyTree:
        """``carry`` with its parameters replaced."""

    def optimality(self, params: PyTree, theta: PyTree) -> PyTree:
        """``F(w, theta)``, zero at the inner solution (the inner gradient); implicit methods."""
        raise NotImplementedError(f"{type(self).__name__} defines no optimality condition")

    def curvature_args(self, theta: PyTree) -> tuple:
        """The arguments after ``params`` of the inner loss's pieces at the implicit system
        (``(h, batch)`` for a ``bilevel`` training loop), for ``Implicit(curvature=...)``."""
        del theta
        raise NotImplementedError(
            f"{type(self).__name__} does not expose the arguments of its inner loss, so "
            "Implicit(curvature=solvers.GaussNewton(...)) cannot evaluate the model there: use "
            "bilevel.BilevelOptimizer / bilevel.hypergradient, or Implicit() (the Hessian)"
        )

    def restart(self, carry: PyTree, theta: PyTree, start: int) -> PyTree:
        """Re-attach ``theta`` to a carry computed without derivatives, before step ``start``."""
        del theta, start
        return carry

    def run(
        self,
        carry: PyTree,
        theta: PyTree,
        start: int,
        stop: int,
        *,
        differentiable: bool = True,
        checkpoint_every: int | None = None,
    ) -> tuple[PyTree, PyTree]:
        """Steps ``start .. stop - 1``; ``(carry, outs)`` with ``outs`` stacked along axis 0.

        ``differentiable=False`` promises that nothing will be differentiated (a loop may then
        use a ``while_loop`` with early stopping).
        """
        del differentiable
        return self.scan(lambda c, x: self.step(c, theta, x), carry, start, stop, checkpoint_every)

    def scan(
        self,
        body: Callable,
        init: PyTree,
        start: int,
        stop: int,
        checkpoint_every: int | None = None,
    ) -> tuple[PyTree, PyTree]:
        """``lax.scan(body, init, x_start .. x_{stop-1})``, rematerialized in segments.

        With ``checkpoint_every = k`` the steps run in ``jax.checkpoint`` segments of ``k``:
        reverse mode stores ``O(n/k + k)`` carries instead of ``O(n)``.
        """
        n = stop - start
        if n <= 0:
            return init, self.empty_outs(body, init)
        if self.xs is None:
            xs = None
            scan_body = lambda c, _: body(c, self.shared)
        else:
            xs = jax.tree.map(lambda a: a[start:stop], self.xs)
            scan_body = body
        k = checkpoint_every
        if k is None or k >= n:
            return lax.scan(scan_body, init, xs, length=n)
        n_seg, rest = divmod(n, k)

        @jax.checkpoint
        def segment(c, seg_xs):
            return lax.scan(scan_body, c, seg_xs, length=k)

        seg = (
            None
            if xs is None
            else jax.tree.map(lambda a: a[: n_seg * k].reshape(n_seg, k, *a.shape[1:]), xs)
        )
        c, outs = lax.scan(segment, init, seg, length=n_seg)
        outs = jax.tree.map(lambda a: a.reshape(n_seg * k, *a.shape[2:]), outs)
        if rest:
            tail = None if xs is None else jax.tree.map(lambda a: a[n_seg * k :], xs)
            c, more = lax.scan(scan_body, c, tail, length=rest)
            outs = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), outs, more)
        return c, outs

    def empty_outs(self, body: Callable, init: PyTree) -> PyTree:
        """The stacked outputs of zero steps (default: traced from one call of ``body``)."""
        x = self._input(0) if self.num_steps else self.shared
        out = jax.eval_shape(lambda c: body(c, x)[1], init)
        return jax.tree.map(lambda s: jnp.zeros((0, *s.shape), s.dtype), out)

    def _input(self, i: int) -> PyTree:
        if self.xs is None:
            return self.shared
        return jax.tree.map(lambda a: a[i], self.xs)

    def last_input(self) -> PyTree:
        """The input of the last step (the batch that defines the implicit system online)."""
        return self._input(max(self.num_steps - 1, 0))

    def contains_while(self, carry: PyTree, theta: PyTree) -> bool:
        """Whether a step contains a ``lax.while_loop`` (not reverse-differentiable)."""
        if self.num_steps < 1:
            return False
        jaxpr = jax.make_jaxpr(lambda c, t: self.step(c, t, self._input(0)))(carry, theta)
        return _has_while(jaxpr.jaxpr)


def _concat(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(lambda x, y: jnp.concatenate([x, y]), a, b)


# ----------------------------------------------------------------------------- reverse-mode guard

_REVERSE_MESSAGE = (
    "Reverse-mode differentiation (jax.grad / jax.vjp) through solvers.{method} is not possible "
    "here: the inner optimizer step contains a lax.while_loop (for example the line search of "
    "optax.lbfgs). Use solvers.Implicit(...) for reverse mode, forward mode (jax.jvp / "
    "jax.jacfwd, or bilevel.Forward online) with this method, or an inner optimizer without a "
    "while_loop."
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


# ----------------------------------------------------------------------------- the protocol


class Hypergradient(NamedTuple):
    """What :meth:`AbstractMethod.hypergradient` returns.

    Attributes:
      carry: the inner loop's final carry (parameters, optimizer state, counters).
      outs: the steps' stacked outputs.
      value: the outer loss at the final parameters.
      aux: the outer loss's auxiliary output (``None`` without).
      grad: the hypergradient, shaped like ``theta``.
      memory: the method's memory for the next call (``()`` when it has none).
      linear_iterations: iterations of the linear solve (0 without a solve), int32.
      linear_residual: its relative residual (0 without a solve).
      status: a :class:`Status` code: ``SUCCESS``, ``LINEAR_SOLVE_FAILED`` or ``NONFINITE``.
      checks: further values that must be finite for the step to be applied (the outer
        gradient, the adjoint and its residual), for :func:`solvers.guard`.
    """

    carry: PyTree
    outs: PyTree
    value: jax.Array
    aux: PyTree
    grad: PyTree
    memory: PyTree
    linear_iterations: jax.Array
    linear_residual: jax.Array
    status: jax.Array
    checks: PyTree


def _finish(
    carry, outs, value, aux, grad, memory, iterations=None, residual=None, status=None, checks=()
):
    dtype = T.result_dtype(grad)
    iterations = jnp.asarray(0 if iterations is None else iterations, jnp.int32)
    residual = jnp.zeros((), dtype) if residual is None else jnp.asarray(residual, dtype)
    status = jnp.asarray(Status.SUCCESS if status is None else status, jnp.int32)
    finite = T.tree_all_finite((grad, value, checks))
    status = jnp.where(finite, status, Status.NONFINITE).astype(jnp.int32)
    return Hypergradient(
        carry, outs, value, aux, grad, memory, iterations, residual, status, checks
    )


class AbstractMethod(abc.ABC):
    """The protocol every hypergradient method implements (a new method is one subclass).

    Attributes:
      differentiates_steps: the method differentiates through the optimizer's steps (so those
        steps must be differentiable: no ``while_loop`` in reverse mode, ``eps_root > 0`` for
        Adam).
    """

    differentiates_steps: ClassVar[bool] = True

    def validate(self, num_steps: int) -> None:  # noqa: B027 - optional hook
        """Raise ``ValueError`` if the method cannot run on a loop of ``num_steps`` steps."""

    def init(self, loop: InnerLoop, carry: PyTree, theta: PyTree) -> PyTree:
        """The method's memory before the first step (``()``: none)."""
        del loop, carry, theta
        return ()

    @abc.abstractmethod
    def solve(self, loop: InnerLoop, carry: PyTree, theta: PyTree) -> tuple[PyTree, PyTree]:
        """Run ``loop`` from ``carry``; the final carry carries this method's derivative."""

    def hypergradient(
        self,
        loop: InnerLoop,
        carry: PyTree,
        theta: PyTree,
        outer: Callable,
        memory: PyTree = None,
    ) -> Hypergradient:
        r"""Run ``loop`` and differentiate ``outer(params, theta) -> (value, aux)`` at its end.

        The default is reverse mode through :meth:`solve`:
        :math:`g = \nabla_\theta\, L_V(w_T(\theta), \theta)`.
        """
        del memory

        def f(th):
            c, outs = self.solve(loop, carry, th)
            value, aux = outer(loop.params(c), th)
            return value, (c, outs, aux)

        (value, (c, outs, aux)), g = jax.value_and_grad(f, has_aux=True)(theta)
        return _finish(lax.stop_gradient(c), outs, value, aux, g, ())


def windowed_solve(
    loop: InnerLoop,
    carry: PyTree,
    theta: PyTree,
    window: int,
    checkpoint_every: int | None,
    name: str,
    *,
    differentiate_start: bool = False,
) -> tuple[PyTree, PyTree]:
    """Run ``n - window`` steps without derivatives, then differentiate the last ``window``.

    The carry at the window's start is held constant, except with ``differentiate_start`` when
    the window is the whole loop (``window = n``): then the derivatives that ``carry`` itself
    carries (w.r.t. ``argmin``'s ``init_params``, as MAML needs) flow through every step. The
    steps of the window run in ``jax.checkpoint`` segments of ``checkpoint_every`` (when set).
    Reverse mode through a step containing a ``while_loop`` raises a clear ``ValueError``.
    """
    n = loop.num_steps
    frozen = lax.stop_gradient(theta)
    whole = differentiate_start and window == n
    # The head runs without derivatives (possibly a while_loop, which reverse mode cannot
    # transpose): it never sees a differentiable carry.
    head, head_outs = loop.run(
        lax.stop_gradient(carry), frozen, 0, n - window, differentiable=False
    )
    c = loop.restart(carry if whole else head, theta, n - window)
    c, tail_outs = loop.run(c, theta, n - window, n, checkpoint_every=checkpoint_every)
    if loop.contains_while(carry, frozen):
        c = _forbid_reverse(c, _REVERSE_MESSAGE.format(method=name))
    return c, _concat(head_outs, tail_outs)


# ----------------------------------------------------------------------------- the methods


@dataclasses.dataclass(frozen=True, kw_only=True)
class Implicit(AbstractMethod):
    r"""Differentiate the inner solution by the implicit function theorem.

    .. math:: H v = \nabla_w L_V, \quad H = \partial_w F(w, \theta), \qquad
       g = \nabla_\theta L_V - (\partial_\theta F)^\top v

    with ``F`` the inner gradient (online: on the last inner batch). The inner steps are never
    differentiated (memory independent of their number); forward and reverse mode.

    The matrix of the system is the inner Hessian :math:`H` by default, or with ``curvature``
    the generalized Gauss-Newton matrix :math:`G = J^\top H_\ell J + \nabla^2 r`
    (:class:`solvers.GaussNewton`), positive semidefinite by construction; the right-hand side
    and the mixed term are unchanged. With ``linear_solver=solvers.cg(ridge="auto")`` the solve
    damps itself (Levenberg-Marquardt, see :class:`solvers.CG`) and the method carries the
    damping :math:`\lambda` across outer steps in its memory (a :class:`DampedAdjoint`): the next
    solve starts from :math:`\lambda` if this one had to raise it, from :math:`\lambda / 2`
    otherwise, so the damping shrinks towards 0 while the curvature stays positive.

    Args:
      linear_solver: solver for the Hessian system (default ``solvers.cg()``).
      warm_start: online tuners start each solve from the previous adjoint ``v`` (their method
        memory). A one-shot call (``argmin``, ``bilevel.hypergradient``) has no previous solve,
        so there it has no effect.
      curvature: ``None`` (the Hessian) or a :class:`solvers.GaussNewton` built from the model
        and the output loss of the inner loss.

    Example:
      >>> import jax.numpy as jnp, optax, solvers
      >>> f = lambda w, lam: jnp.sum((w - 1.0) ** 2) + lam * jnp.sum(w ** 2)
      >>> m = solvers.Implicit(linear_solver=solvers.cg(tol=1e-8))
      >>> w = solvers.argmin(f, jnp.zeros(2), 1.0, optimizer=optax.sgd(0.2), steps=100, adjoint=m)
      >>> w.round(3).tolist()
      [0.5, 0.5]

    References: Bengio, 2000; Pedregosa, ICML 2016; Lorraine et al., AISTATS 2020; Blondel et al.,
    NeurIPS 2022.
    """

    linear_solver: LinearSolver = dataclasses.field(default_factory=CG)
    warm_start: bool = True
    curvature: GaussNewton | None = None

    differentiates_steps: ClassVar[bool] = False

    def __post_init__(self):
        if not isinstance(self.linear_solver, LinearSolver):
            raise TypeError(
                "linear_solver must be a solvers linear solver such as solvers.cg(), got "
                f"{self.linear_solver!r}"
            )
        if not isinstance(self.warm_start, bool):
            raise TypeError(f"warm_start must be a bool, got {self.warm_start!r}")
        if self.curvature is not None and not isinstance(self.curvature, GaussNewton):
            raise TypeError(
                "curvature must be None (the Hessian) or solvers.GaussNewton(model_fn, "
                f"output_loss, regularizer), got {self.curvature!r}"
            )

    def init(self, loop, carry, theta):
        del theta
        params = loop.params(carry)
        adjoint = T.tree_zeros_like(params) if self.warm_start else ()
        if self.linear_solver.adaptive:
            return DampedAdjoint(adjoint, jnp.zeros((), T.result_dtype(params)))
        return adjoint

    def solve(self, loop, carry, theta):
        carry, outs = loop.run(
            carry, lax.stop_gradient(theta), 0, loop.num_steps, differentiable=False
        )
        carry = lax.stop_gradient(carry)
        optimality = loop.optimality
        if self.curvature is not None:
            optimality = _with_curvature(loop, self.curvature, loop.params(carry))
        params = implicit_solution(
            optimality, loop.params(carry), (theta,), self.linear_solver, symmetric=True
        )
        return loop.replace_params(carry, params), outs

    def hypergradient(self, loop, carry, theta, outer, memory=None):
        frozen = lax.stop_gradient(theta)
        carry, outs = loop.run(carry, frozen, 0, loop.num_steps, differentiable=False)
        ridge = None
        if self.linear_solver.adaptive:
            if not _has_memory(memory):
                memory = self.init(loop, carry, theta)
            memory, ridge = memory
        init = memory if (self.warm_start and _has_memory(memory)) else None
        hg = implicit_at(
            loop, carry, outs, theta, outer, self.linear_solver, init,
            curvature=self.curvature, ridge=ridge,
        )  # fmt: skip
        if self.warm_start:
            return hg
        if ridge is not None:
            return hg._replace(memory=DampedAdjoint((), hg.memory.ridge))
        return hg._replace(memory=())


class DampedAdjoint(NamedTuple):
    """Memory of :class:`Implicit` with ``solvers.cg(ridge="auto")``.

    Attributes:
      adjoint: the previous adjoint ``v`` (warm start; ``()`` without ``warm_start``).
      ridge: the damping the next solve starts from.
    """

    adjoint: PyTree
    ridge: jax.Array


def _with_curvature(loop: InnerLoop, curvature: GaussNewton, root: PyTree) -> Callable:
    r"""An optimality function with the derivatives ``G`` (in ``w``) and ``d_theta F`` at ``root``.

    .. math:: \tilde F(w, \theta) = F(w^*, \theta) + G(w^*, \theta)\,(w - w^*)

    At :math:`w = w^*` its value is ``F``'s, its Jacobian in ``w`` is ``G`` and in ``theta`` it
    is ``F``'s (the second term is linear in :math:`w - w^* = 0`).
    """
    root = lax.stop_gradient(root)

    def optimality(params, theta):
        frozen = lax.stop_gradient(theta)
        mv = curvature.matvec(root, *loop.curvature_args(frozen))
        return jax.tree.map(jnp.add, loop.optimality(root, theta), mv(T.tree_sub(params, root)))

    return optimality


def implicit_at(
    loop: InnerLoop,
    carry: PyTree,
    outs: PyTree,
    theta: PyTree,
    outer: Callable,
    linear_solver: LinearSolver,
    init: PyTree | None,
    *,
    curvature: GaussNewton | None = None,
    ridge: jax.Array | None = None,
) -> Hypergradient:
    r"""The implicit hypergradient at the parameters of ``carry`` (the loop already ran).

    .. math:: A v = \nabla_w L_V \ (\text{from } v_0 = \text{init}), \qquad
       g = \nabla_\theta L_V - (\partial_\theta F)^\top v

    with :math:`A = \partial_w F` (the Hessian), or the Gauss-Newton matrix of ``curvature``.
    Returns a :class:`Hypergradient` whose ``memory`` is the adjoint ``v`` (with ``ridge``, the
    starting damping of an automatically damped solve: a :class:`DampedAdjoint` carrying the next
    one); the status says whether the solve reached its tolerance. Shared by :class:`Implicit`
    and the methods built on it (e.g. ``bilevel.BOREP``).
    """
    params = loop.params(carry)
    (value, aux), (g_w, g_theta) = jax.value_and_grad(outer, argnums=(0, 1), has_aux=True)(
        params, theta
    )
    T.check_same_structure(params, g_w, "the outer gradient must be shaped like params")
    if curvature is None:
        _, vjp_params = jax.vjp(lambda p: loop.optimality(p, theta), params)
        matvec = lambda u: vjp_params(u)[0]
    else:
        matvec = curvature.matvec(params, *loop.curvature_args(lax.stop_gradient(theta)))
    v, stats = linear_solver(matvec, g_w, init=init, ridge=ridge)
    _, vjp_theta = jax.vjp(lambda th: loop.optimality(params, th), theta)
    (mixed,) = vjp_theta(T.tree_neg(v))
    g = jax.tree.map(jnp.add, g_theta, mixed)
    status = jnp.where(stats.converged, Status.SUCCESS, Status.LINEAR_SOLVE_FAILED)
    memory = v
    if ridge is not None:
        # Levenberg-Marquardt: keep a damping the solve had to raise, halve one it did not.
        start = jnp.asarray(ridge, stats.ridge.dtype)
        memory = DampedAdjoint(v, jnp.where(stats.ridge > start, stats.ridge, 0.5 * start))
    return _finish(
        carry,
        outs,
        value,
        aux,
        g,
        memory,
        stats.iterations,
        stats.residual,
        status,
        checks=(g_w, v, stats.residual),
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Unrolled(AbstractMethod):
    r"""Differentiate through every inner step (reverse or forward mode).

    .. math:: g = \nabla_\theta L_V(w_n(\theta), \theta), \quad
       w_{t+1} = \Phi(w_t, \theta, x_t)

    The starting point is differentiated too: ``argmin``'s result carries derivatives w.r.t.
    ``init_params`` (MAML: the meta-parameters are the initialization of the inner run).

    Args:
      checkpoint_every: rematerialize segments of this many steps (``jax.checkpoint``) in reverse
        mode: memory ``O(n / k + k)`` instead of ``O(n)`` for about one extra forward pass.
        ``~sqrt(n)`` is the classic choice (Griewank, 1992). ``None``: store every step. Honoured
        by ``argmin``, ``bilevel.hypergradient`` and ``BilevelOptimizer`` alike.

    References: Maclaurin et al., ICML 2015; Franceschi et al., ICML 2017.
    """

    checkpoint_every: int | None = None

    def __post_init__(self):
        object.__setattr__(
            self,
            "checkpoint_every",
            checks.optional_integer("checkpoint_every", self.checkpoint_every),
        )

    def validate(self, num_steps):
        if num_steps < 1:
            raise ValueError(
                "Unrolled differentiates through inner steps but the loop has none: give it "
                "inner steps (e.g. inner_optimizer= and stacked inner batches)"
            )

    def solve(self, loop, carry, theta):
        return windowed_solve(
            loop,
            carry,
            theta,
            loop.num_steps,
            self.checkpoint_every,
            "Unrolled",
            differentiate_start=True,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Truncated(AbstractMethod):
    r"""Differentiate through the last ``steps`` inner steps only (Shaban et al., AISTATS 2019).

    The earlier steps run without derivatives (with early stopping at ``tol`` in ``argmin``); the
    last ``K`` always run and are differentiated, with the carry at the window's start held
    constant. Biased towards short horizons (Wu et al., ICLR 2018).

    Args:
      steps: number ``K >= 1`` of differentiated steps (at most the loop's steps).
      checkpoint_every: rematerialize the window in segments of this many steps (as
        :class:`Unrolled`).
    """

    steps: int
    checkpoint_every: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "steps", checks.integer("Truncated.steps", self.steps))
        object.__setattr__(
            self,
            "checkpoint_every",
            checks.optional_integer("checkpoint_every", self.checkpoint_every),
        )

    def validate(self, num_steps):
        if self.steps > num_steps:
            raise ValueError(
                f"Truncated(steps={self.steps}) differentiates the last {self.steps} inner steps "
                f"but there are only {num_steps}: lower steps= or run more inner steps"
            )

    def solve(self, loop, carry, theta):
        return windowed_solve(loop, carry, theta, self.steps, self.checkpoint_every, "Truncated")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Forward(AbstractMethod):
    r"""Forward-mode hypergradient (RTHO; MARTHE when ``decay < 1``).

    Carries the tangent :math:`Z_t = d c_t / d\theta` of the loop's carry (parameters and
    optimizer state) through every step, by ``jax.linearize`` of the step:

    .. math:: Z_{t+1} = \partial_c\Phi\, (\mu Z_t) + \partial_\theta \Phi, \qquad
       g = Z_w^\top \nabla_w L_V(w, \theta) + \nabla_\theta L_V(w, \theta)

    with :math:`\mu` = ``decay``. Online tuners keep :math:`Z` across outer steps (the method
    memory: the whole training history, decayed); a one-shot call starts from :math:`Z = 0`.
    Costs one Jacobian-vector product per hyperparameter per step: meant for a few
    hyperparameters.

    Args:
      decay: tangent decay ``mu`` in ``(0, 1]``; 1 is RTHO (Franceschi et al., ICML 2017), ``< 1``
        is MARTHE (Donini et al., ICLR 2020). ``argmin``'s output has a derivative only for
        ``decay = 1`` (a decayed tangent is not the derivative of a function of ``theta``).

    Example:
      >>> import jax.numpy as jnp, solvers
      >>> solvers.Forward(decay=0.9).decay
      0.9
    """

    decay: float = 1.0

    def __post_init__(self):
        object.__setattr__(
            self,
            "decay",
            checks.number("Forward.decay", self.decay, low=0.0, high=1.0, low_open=True),
        )

    def validate(self, num_steps):
        if num_steps < 1:
            raise ValueError(
                "Forward differentiates through inner steps but the loop has none: give it "
                "inner steps (e.g. inner_optimizer= and stacked inner batches)"
            )

    def init(self, loop, carry, theta):
        del loop
        m = ravel_pytree(theta)[0].size
        return [jnp.zeros((m, *jnp.shape(a)), jnp.result_type(a)) for a in _float_leaves(carry)]

    def solve(self, loop, carry, theta):
        if self.decay != 1.0:
            raise ValueError(
                f"Forward(decay={self.decay}) has no derivative of the inner solution to attach "
                "(a decayed tangent is not the derivative of a function of theta): use "
                "Forward(decay=1.0) in argmin, or decay < 1 in an online tuner"
            )
        c, outs = loop.run(loop.restart(carry, theta, 0), theta, 0, loop.num_steps)
        if loop.contains_while(carry, lax.stop_gradient(theta)):
            c = _forbid_reverse(c, _REVERSE_MESSAGE.format(method="Forward"))
        return c, outs

    def hypergradient(self, loop, carry, theta, outer, memory=None):
        theta_flat, unravel = ravel_pytree(theta)
        eye = jnp.eye(theta_flat.size, dtype=theta_flat.dtype)
        z = memory if _has_memory(memory) else self.init(loop, carry, theta)
        decay = self.decay
        carry = loop.restart(carry, theta, 0)

        def body(state, x):
            c, z = state
            leaves, treedef = jax.tree.flatten(c)
            mask = [_is_float(a) for a in leaves]

            def phi(c_float, tf):
                it = iter(c_float)
                full = jax.tree.unflatten(
                    treedef, [next(it) if f else a for a, f in zip(leaves, mask, strict=True)]
                )
                c2, out = loop.step(full, unravel(tf), x)
                return _float_leaves(c2), (c2, out)

            _, lin, (c2, out) = jax.linearize(phi, _float_leaves(c), theta_flat, has_aux=True)
            z2 = jax.vmap(lin)([decay * a for a in z], eye)
            return (c2, z2), out

        (carry, z), outs = loop.scan(body, (carry, z), 0, loop.num_steps)
        params = loop.params(carry)
        (value, aux), (g_w, g_theta) = jax.value_and_grad(outer, argnums=(0, 1), has_aux=True)(
            params, theta
        )
        z_params = loop.params(_with_float_leaves(carry, z))
        g_flat = jax.vmap(lambda zw: T.tree_vdot(zw, g_w))(z_params) + ravel_pytree(g_theta)[0]
        g = unravel(g_flat.astype(theta_flat.dtype))
        return _finish(carry, outs, value, aux, g, z, checks=(g_w,))


def _has_memory(memory) -> bool:
    """Memory from a previous call (``None`` and ``()`` mean none)."""
    return memory is not None and not (isinstance(memory, tuple) and memory == ())


def _is_float(a) -> bool:
    return jnp.issubdtype(jnp.result_type(a), jnp.inexact)


def _float_leaves(tree) -> list:
    return [a for a in jax.tree.leaves(tree) if _is_float(a)]


def _with_float_leaves(tree, new_leaves):
    """``tree`` with its floating leaves replaced (in order) by ``new_leaves``."""
    leaves, treedef = jax.tree.flatten(tree)
    it = iter(new_leaves)
    return jax.tree.unflatten(treedef, [next(it) if _is_float(a) else a for a in leaves])
