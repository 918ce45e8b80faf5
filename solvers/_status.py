"""One diagnostics vocabulary and one guarded step.

- :class:`Status`: the outcome codes every diagnostic reports (``ArgminInfo.status``,
  ``bilevel.HypergradientInfo.status``, the tuners' ``metrics["status"]``).
- :func:`guard`: the single rule that decides whether a step is applied.
- :func:`error_if_failed`: the ``throw=True`` switch, an exception instead of a status.
"""

from __future__ import annotations

import enum
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from solvers import tree as T

PyTree = Any

__all__ = ["GuardResult", "Status", "error_if_failed", "guard", "status_message"]


class Status(enum.IntEnum):
    """Outcome codes, reported as int32 arrays (jit- and vmap-friendly).

    Attributes:
      SUCCESS: finished as asked (tolerance reached, or every value finite when no tolerance).
      MAX_STEPS: the optimizer's step budget ran out before its gradient norm reached ``tol``.
      NONFINITE: a NaN or inf appeared; the step was not applied (the last finite values are
        kept).
      LINEAR_SOLVE_FAILED: the implicit linear solve did not reach its tolerance (or broke down);
        its last iterate was used. Online methods whose solve is meant to be inexact (SOBA's one
        Neumann step, a CG capped at a few iterations) report it on every step: it is
        information, not a skip.
    """

    SUCCESS = 0
    MAX_STEPS = 1
    NONFINITE = 2
    LINEAR_SOLVE_FAILED = 3


_MESSAGES = {
    Status.SUCCESS: "success",
    Status.MAX_STEPS: "the step budget ran out before the gradient norm reached tol",
    Status.NONFINITE: "a non-finite value (NaN or inf) appeared",
    Status.LINEAR_SOLVE_FAILED: "the linear solve did not reach its tolerance",
}


def status_message(status: int) -> str:
    """A sentence describing a :class:`Status` code."""
    return _MESSAGES[Status(int(status))]


class GuardResult(NamedTuple):
    """What :func:`guard` returns.

    Attributes:
      value: ``new`` if the step was applied, else ``old``.
      applied: whether it was applied (bool array).
      skipped: the counter, incremented when the step was not applied (int32, saturating).
    """

    value: PyTree
    applied: jax.Array
    skipped: jax.Array


def guard(
    old: PyTree,
    new: PyTree,
    skipped: jax.Array,
    *,
    also: PyTree = (),
    finite: jax.Array | None = None,
) -> GuardResult:
    r"""Apply a step only if everything it produced is finite; otherwise keep ``old`` and count.

    .. math:: \text{value} = \begin{cases} \text{new} & \text{if every floating leaf of }
       (\text{new}, \text{also}) \text{ is finite} \\ \text{old} & \text{otherwise
       (and skipped} \mathrel{+}= 1) \end{cases}

    The one rule of the library: every step (inner, outer, STN, ``argmin``'s loop, the ``hd_*``
    transforms) goes through it, so a step is applied only when the loss, the gradient, the new
    parameters, the new optimizer state, the new hyperparameters (unconstrained and
    constrained) and, for implicit methods, the linear solve's solution and residual are finite.
    Integer leaves (counters) are never checked.

    Args:
      old: the state before the step (any pytree).
      new: the candidate state after it, same structure.
      skipped: the skip counter (int32 scalar).
      also: further values that must be finite for the step to apply (loss, gradient,
        constrained hyperparameters, solve residual ...); not returned.
      finite: a finiteness flag already computed for ``new`` (for example fused into the pass
        of an Optax transform), used instead of scanning ``new`` again.

    Returns:
      A :class:`GuardResult` ``(value, applied, skipped)``.

    Example:
      >>> import jax.numpy as jnp, solvers
      >>> r = solvers.guard(jnp.ones(2), jnp.array([2.0, jnp.inf]), jnp.int32(0))
      >>> r.value.tolist(), bool(r.applied), int(r.skipped)
      ([1.0, 1.0], False, 1)
    """
    ok = T.tree_all_finite(new) if finite is None else jnp.asarray(finite, bool)
    ok = ok & T.tree_all_finite(also)
    value = optax.tree.where(ok, new, old)
    skipped = jnp.asarray(skipped)
    count = jnp.where(ok, skipped, optax.safe_increment(skipped))
    return GuardResult(value, ok, count)


def error_if_failed(status: jax.Array, what: str, accept: tuple[Status, ...] = ()) -> None:
    """The ``throw=True`` switch: raise when ``status`` is not ``SUCCESS`` (nor in ``accept``).

    Works on concrete values and inside ``jit``/``vmap`` (through ``jax.debug.callback``; under
    ``jit`` the error surfaces as a ``jax.errors.JaxRuntimeError`` carrying the message).

    Args:
      status: a :class:`Status` array (any shape; a population raises if any member failed).
      what: the name of the computation, for the message.
      accept: further codes that do not raise.

    Raises:
      RuntimeError: naming ``what`` and the failure.
    """
    accepted = np.array([int(Status.SUCCESS), *(int(a) for a in accept)])

    def check(s):
        s = np.asarray(s).reshape(-1)
        bad = s[~np.isin(s, accepted)]
        if bad.size:
            raise RuntimeError(
                f"{what} failed: {status_message(int(bad[0]))} (status "
                f"{Status(int(bad[0])).name}); pass throw=False to get the status instead"
            )

    if T.is_concrete(status):
        check(status)
    else:
        jax.debug.callback(check, status)
