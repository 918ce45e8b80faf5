r"""BO-REP: bilevel optimization under unbounded smoothness, as a method of the online tuner."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

import solvers
from solvers import checks
from solvers import tree as T
from solvers._methods import implicit_at

__all__ = ["BOREP", "BOREPMemory"]


class BOREPMemory(NamedTuple):
    """BO-REP's memory: the adjoint ``z`` and the number of outer steps taken (the schedule)."""

    adjoint: Any
    count: jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class BOREP(solvers.AbstractMethod):
    r"""BO-REP (Hao, Gong & Liu, ICLR 2024): periodic lower-level updates, an SGD adjoint.

    Outer step ``t`` of :class:`bilevel.BilevelOptimizer` with this method:

    .. math::
       w_t &= \begin{cases} \text{inner\_steps optimizer steps from } w_{t-1}
              & t \bmod I = 0 \\ w_{t-1} & \text{otherwise} \end{cases} \\
       z_{t+1} &= z_t - \nu\,(\nabla^2_{ww} L_B(w_t, h_t)\, z_t - \nabla_w L_V(w_t, h_t)) \\
       g_t &= \nabla_h L_V - \nabla^2_{hw} L_B\, z_{t+1}

    and the hyperparameters move by **normalized momentum**, the outer optimizer this method is
    meant for: ``outer_optimizer=bilevel.normalized_momentum(lr, beta=0.9)``
    (:math:`m \leftarrow \beta m + (1 - \beta) g`, :math:`u \leftarrow u - \eta\, m / \lVert m
    \rVert`). The fixed-length steps are what makes it converge when the smoothness of the
    outer objective grows with its gradient norm (``(L0, L1)``-smoothness), where a plain
    gradient step overshoots.

    The paper's "initialization refinement" (extra lower-level steps before tuning starts) is
    ``fit(..., warmup_steps=k)``. On the outer steps where the lower level is held, the inner
    batches are not used and ``metrics["inner_applied"]`` is 0. The adjoint step is a one-step
    Neumann solve warm-started from ``z_t`` (the SOBA update; a warm start worse than zero is
    dropped, as in every warm-started solve), so ``status`` reports ``LINEAR_SOLVE_FAILED`` by
    design. One-shot callers (``bilevel.hypergradient``) have no memory: they get one adjoint
    step from ``z = 0``; for an accurate one-shot hypergradient use ``solvers.Implicit``.

    Args:
      adjoint_lr: the adjoint step ``nu`` (paper: ``1e-2``); it must be below ``2 / L`` for the
        Hessian's largest eigenvalue ``L``.
      period: ``I``, the lower level runs every ``period`` outer steps (paper: 2-3).

    Example:
      >>> import jax, jax.numpy as jnp, optax, bilevel
      >>> inner = lambda w, h, b: 0.5 * jnp.sum((w - h["x"]) ** 2)
      >>> outer = lambda w, h, b: jnp.sum(jnp.exp(w) - w)      # minimum at w = 0
      >>> opt = bilevel.BilevelOptimizer(inner, outer, inner_optimizer=optax.sgd(0.5),
      ...     outer_optimizer=bilevel.normalized_momentum(0.05),
      ...     space={"x": bilevel.hparams.real(jnp.array([3.0]))},
      ...     method=bilevel.BOREP(adjoint_lr=0.5, period=2), inner_steps=5)
      >>> state = opt.init(jnp.zeros(1))
      >>> for _ in range(120):
      ...     state, metrics = opt.step(state, jnp.zeros((5, 1)), jnp.zeros(1))
      >>> bool(abs(opt.hparams(state)["x"][0]) < 0.5)      # from 3.0
      True

    Reference: J. Hao, X. Gong, M. Liu, "Bilevel optimization under unbounded smoothness: a new
    algorithm and convergence analysis", ICLR 2024.
    """

    adjoint_lr: float = 1e-2
    period: int = 2

    differentiates_steps = False

    def __post_init__(self):
        object.__setattr__(
            self, "adjoint_lr", checks.number("adjoint_lr", self.adjoint_lr, low=0.0, low_open=True)
        )
        object.__setattr__(self, "period", checks.integer("period", self.period, 1))

    @property
    def _solver(self) -> solvers.LinearSolver:
        return solvers.neumann(steps=1, scale=self.adjoint_lr, tol=0.0)

    def init(self, loop, carry, theta):
        del theta
        return BOREPMemory(T.tree_zeros_like(loop.params(carry)), jnp.zeros((), jnp.int32))

    def solve(self, loop, carry, theta):
        raise ValueError(
            "BOREP is an online method for bilevel.BilevelOptimizer; solvers.argmin needs a "
            "method that differentiates a finished inner run, e.g. solvers.Implicit(...)"
        )

    def hypergradient(self, loop, carry, theta, outer, memory=None):
        frozen = lax.stop_gradient(theta)
        if memory is None or memory == ():
            memory = self.init(loop, carry, theta)
        run = lambda c: loop.run(c, frozen, 0, loop.num_steps, differentiable=False)
        outs_shape = jax.eval_shape(run, carry)[1]

        def hold(c):
            return c, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), outs_shape)

        carry, outs = lax.cond(memory.count % self.period == 0, run, hold, carry)
        hg = implicit_at(loop, carry, outs, theta, outer, self._solver, memory.adjoint)
        return hg._replace(memory=BOREPMemory(hg.memory, memory.count + 1))
