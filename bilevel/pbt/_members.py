"""What a population is made of: the member protocol and its two implementations.

A :class:`Member` tells :class:`bilevel.pbt.PBT` how to start one training run, write the
PBT-managed hyperparameter values into its state, take one step and draw its batches. PBT vmaps
these over the population. ``BilevelOptimizer`` joins as it is (PBT writes its values into the
optimizer's ``fixed_hparams``); :func:`optax_member` makes a member of a plain Optax training step.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bilevel._bilevel import (
    BilevelOptimizer,
    HparamDict,
    TrainingLoop,
    _Carry,
    _loss,
    _masked_mean,
    _typed_key,
)
from solvers import checks

PyTree = Any

__all__ = ["Member", "OptaxMember", "OptaxMemberState", "as_member", "optax_member"]


class Member(abc.ABC):
    """One member of a PBT population: how to start, configure, step and feed one training run.

    Implement it to put another tuner under :class:`bilevel.pbt.PBT`. Every method acts on *one*
    member (PBT vmaps them), is pure and traceable, and ``step`` returns a dict of metrics that
    holds PBT's ``objective`` (``"outer_loss"`` by default; lower is better).
    """

    @abc.abstractmethod
    def check_space(self, space: dict[str, Any]) -> None:
        """Raise a clear error if this member cannot take the PBT space's hyperparameters."""

    @abc.abstractmethod
    def init(self, params: PyTree, values: dict[str, jax.Array], key: jax.Array) -> PyTree:
        """The state of one member starting from ``params`` with PBT values ``values``."""

    @abc.abstractmethod
    def with_hparams(self, state: PyTree, values: dict[str, jax.Array]) -> PyTree:
        """``state`` with the PBT-managed hyperparameters set to ``values``."""

    @abc.abstractmethod
    def step(self, state: PyTree, inner_batches: PyTree, outer_batch: PyTree):
        """One step: ``(state, metrics)``."""

    @abc.abstractmethod
    def sample_batches(
        self,
        state: PyTree,
        inner_data: PyTree,
        outer_data: PyTree,
        batch_size: int,
        outer_batch_size: int | None = None,
    ) -> tuple[PyTree, PyTree]:
        """The batches of the next :meth:`step` (a pure function of the state's key and step)."""


# ----------------------------------------------------------------------------- BilevelOptimizer


class BilevelMember(Member):
    """A :class:`bilevel.BilevelOptimizer` as a PBT member: PBT owns some of its fixed_hparams.

    The gradient tuner keeps tuning its ``space`` by hypergradient; PBT writes the values of its
    own space into ``state.fixed_hparams`` before every step. A hyperparameter belongs to exactly
    one of them.
    """

    def __init__(self, opt: BilevelOptimizer):
        self.opt = opt

    def check_space(self, space: dict[str, Any]) -> None:
        opt = self.opt
        tuned = set(opt.space) if isinstance(opt.space, dict) else set()
        both = sorted(set(space) & tuned)
        if both:
            raise ValueError(
                f"hyperparameter(s) {both} are in the PBT space and in the BilevelOptimizer's "
                "space (tuned by hypergradient): a hyperparameter belongs to exactly one of them. "
                "Remove them from one of the two spaces"
            )
        missing = sorted(set(space) - set(opt.fixed_hparams))
        if missing:
            raise ValueError(
                f"PBT manages hyperparameter(s) {missing}, but the BilevelOptimizer does not hold "
                f"them: add them to its fixed_hparams (it holds {sorted(opt.fixed_hparams)}), "
                "e.g. BilevelOptimizer(..., fixed_hparams={"
                + ", ".join(f"{k!r}: <initial value>" for k in missing)
                + "}); PBT writes each member's values there"
            )
        for name, spec in space.items():
            have = tuple(jnp.shape(opt.fixed_hparams[name]))
            if have != spec.shape:
                raise ValueError(
                    f"PBT space[{name!r}] has shape {spec.shape}, but the BilevelOptimizer's "
                    f"fixed_hparams[{name!r}] has shape {have}: give them the same shape"
                )

    def init(self, params, values, key):
        return self.with_hparams(self.opt.init(params, key=key), values)

    def with_hparams(self, state, values):
        fixed = dict(state.fixed_hparams)
        for name, v in values.items():
            fixed[name] = jnp.asarray(v, jnp.result_type(fixed[name]))
        return state._replace(fixed_hparams=fixed)

    def step(self, state, inner_batches, outer_batch):
        return self.opt.step(state, inner_batches, outer_batch)

    def sample_batches(self, state, inner_data, outer_data, batch_size, outer_batch_size=None):
        return self.opt.sample_batches(state, inner_data, outer_data, batch_size, outer_batch_size)


# ----------------------------------------------------------------------------- plain Optax


class OptaxMemberState(NamedTuple):
    """State of an :class:`OptaxMember` (one member; PBT stacks them along a leading axis).

    Attributes:
      params: model parameters.
      opt_state: the Optax optimizer's state.
      hparams: the PBT-managed hyperparameter values the loss and the optimizer see.
      step: steps taken (int32).
      inner_skipped: optimizer steps not applied because something was not finite (int32).
      key: PRNG key for the training loop (data order), see :meth:`OptaxMember.sample_batches`.
    """

    params: PyTree
    opt_state: PyTree
    hparams: dict
    step: jax.Array
    inner_skipped: jax.Array
    key: jax.Array


class OptaxMember(Member):
    r"""A plain Optax training step as a PBT member (no gradient tuning): build it with
    :func:`optax_member`.

    One :meth:`step` runs ``inner_steps`` guarded steps of ``optimizer(h)`` on
    ``loss(params, h, batch)`` (a step applies only if its loss, gradient, parameters and
    optimizer state are finite), then evaluates ``outer_loss(params, h, outer_batch)``:

    .. math:: w_{t+1} = w_t + \mathrm{opt}(h).\mathrm{update}(\nabla_w L_{B_t}(w_t, h)),
       \qquad \text{outer\_loss} = L_V(w_{t+n}, h)
    """

    def __init__(self, loss, optimizer, outer_loss, inner_steps):
        self._inner = _loss(loss, "loss", False)
        self._outer = _loss(outer_loss, "outer_loss", False)
        self.optimizer = optimizer
        self.inner_steps = inner_steps

    def _build(self, values):
        if isinstance(self.optimizer, optax.GradientTransformation):
            return optax.with_extra_args_support(self.optimizer)
        return optax.with_extra_args_support(self.optimizer(HparamDict(values)))

    def check_space(self, space: dict[str, Any]) -> None:
        """The optimizer factory must build a transformation from the space's initial values."""
        if isinstance(self.optimizer, optax.GradientTransformation):
            return
        values = {k: jnp.asarray(spec.value) for k, spec in space.items()}
        try:
            opt = self.optimizer(HparamDict(values))
        except Exception as e:  # the factory's own error, with the context it lacks
            raise TypeError(
                f"optimizer(h) failed on the space's initial values: {type(e).__name__}: {e}. "
                "optimizer must be an optax.GradientTransformation or a function "
                "h -> optax.GradientTransformation of the PBT hyperparameter dict"
            ) from e
        if not isinstance(opt, optax.GradientTransformation):
            raise TypeError(
                f"optimizer(h) must return an optax.GradientTransformation, got {opt!r}"
            )

    def _loop(self, values, inner_batches):
        constrain = lambda h: HparamDict(h)
        n = self.inner_steps
        if inner_batches is None:
            return TrainingLoop(self._inner, self.optimizer, constrain, n)
        if jnp.shape(jax.tree.leaves(inner_batches)[0])[0] == 1 and n != 1:
            shared = jax.tree.map(lambda a: a[0], inner_batches)
            return TrainingLoop(self._inner, self.optimizer, constrain, n, shared=shared)
        return TrainingLoop(self._inner, self.optimizer, constrain, n, xs=inner_batches)

    def init(self, params, values, key):
        """One member's state: ``params``, the optimizer's state at ``values``, ``key``."""
        params = jax.tree.map(jnp.asarray, params)
        for leaf in jax.tree.leaves(params):
            if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
                raise TypeError("params must have floating leaves")
        values = dict(values)
        zero = jnp.asarray(0, jnp.int32)
        opt_state = self._build(values).init(params)
        return OptaxMemberState(params, opt_state, values, zero, zero, _typed_key(key))

    def with_hparams(self, state, values):
        """``state`` with its hyperparameter values replaced (dtypes kept)."""
        new = {k: jnp.asarray(values[k], jnp.result_type(state.hparams[k])) for k in state.hparams}
        return state._replace(hparams=new)

    def step(self, state, inner_batches, outer_batch):
        """``inner_steps`` guarded optimizer steps, then the outer loss.

        Args:
          state: an :class:`OptaxMemberState`.
          inner_batches: leaves with a leading axis ``inner_steps`` (or 1: one batch reused).
          outer_batch: the validation batch.

        Returns:
          ``(state, metrics)`` with ``inner_loss`` (mean over applied steps),
          ``inner_applied``, ``outer_loss`` and ``inner_skipped``.
        """
        leaves = jax.tree.leaves(inner_batches)
        if not leaves or any(
            jnp.ndim(a) == 0 or jnp.shape(a)[0] not in (self.inner_steps, 1) for a in leaves
        ):
            raise ValueError(
                f"every leaf of inner_batches needs a leading axis of length inner_steps="
                f"{self.inner_steps} (or 1: one batch reused by every step); got shapes "
                f"{jax.tree.map(jnp.shape, inner_batches)}"
            )
        loop = self._loop(state.hparams, inner_batches)
        carry = _Carry(state.params, state.opt_state, state.inner_skipped)
        carry, (values, applied) = loop.run(
            carry, state.hparams, 0, self.inner_steps, differentiable=False
        )
        h = HparamDict(state.hparams)
        outer, _ = self._outer(carry.params, h, outer_batch)
        state = state._replace(
            params=carry.params,
            opt_state=carry.inner_state,
            inner_skipped=carry.inner_skipped,
            step=state.step + 1,
        )
        return state, {
            "inner_loss": _masked_mean(values, applied),
            "inner_applied": jnp.sum(applied).astype(jnp.int32),
            "outer_loss": outer,
            "inner_skipped": state.inner_skipped,
        }

    def sample_batches(self, state, inner_data, outer_data, batch_size, outer_batch_size=None):
        """Batches drawn with :func:`bilevel.minibatches` from ``(state.key, state.step)``."""
        from bilevel._utils import step_batches

        return step_batches(
            state.key,
            state.step,
            inner_data,
            outer_data,
            batch_size,
            self.inner_steps,
            outer_batch_size,
        )


def optax_member(
    loss: Callable,
    optimizer: optax.GradientTransformation | Callable,
    *,
    outer_loss: Callable | None = None,
    inner_steps: int = 1,
) -> OptaxMember:
    """A plain Optax training step as a PBT member, its optimizer built from PBT's values.

    PBT then tunes every hyperparameter itself, with no gradient tuner: ``optimizer(h)`` is
    rebuilt from the member's current values at every step (Optax transformations are pure
    functions of their settings, so a learning rate from ``h`` costs nothing; its state structure
    must not depend on ``h``).

    Args:
      loss: ``loss(params, h, batch) -> scalar``, ``h`` the dict of PBT values.
      optimizer: ``h -> optax.GradientTransformation`` (e.g. ``lambda h: optax.adam(h["lr"])``)
        or a fixed transformation.
      outer_loss: ``outer_loss(params, h, batch) -> scalar`` evaluated on the outer (validation)
        batch after the steps: the ``"outer_loss"`` PBT ranks by (default ``loss``).
      inner_steps: optimizer steps per PBT step (``>= 1``).

    Returns:
      An :class:`OptaxMember`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from bilevel import hparams, pbt
      >>> loss = lambda w, h, b: jnp.sum((w - b) ** 2)
      >>> member = pbt.optax_member(loss, lambda h: optax.sgd(h["lr"]), inner_steps=2)
      >>> tuner = pbt.PBT(member, {"lr": hparams.log(0.1, 1e-3, 1.0)}, interval=2)
      >>> state = tuner.init(jax.random.key(0), 4, jnp.zeros(3))
      >>> state.members.params.shape
      (4, 3)
    """
    for name, fn in (("loss", loss), ("outer_loss", outer_loss)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be a callable {name}(params, h, batch), got {fn!r}")
    if not (isinstance(optimizer, optax.GradientTransformation) or callable(optimizer)):
        raise TypeError(
            "optimizer must be an optax.GradientTransformation or a function "
            f"h -> optax.GradientTransformation, got {optimizer!r}"
        )
    inner_steps = checks.integer("inner_steps", inner_steps)
    return OptaxMember(loss, optimizer, loss if outer_loss is None else outer_loss, inner_steps)


def as_member(member: Any) -> Member:
    """The :class:`Member` driving ``member`` (a BilevelOptimizer, or a Member as it is)."""
    if isinstance(member, Member):
        return member
    if isinstance(member, BilevelOptimizer):
        return BilevelMember(member)
    from bilevel.stn import Trainer

    name = type(member).__name__
    if isinstance(member, Trainer):
        raise TypeError(
            "bilevel.stn.Trainer cannot be a PBT member yet: it holds no fixed hyperparameters "
            "for PBT to write. Use a bilevel.BilevelOptimizer (with fixed_hparams) or "
            "bilevel.pbt.optax_member, or implement bilevel.pbt.Member"
        )
    raise TypeError(
        f"member must be a bilevel.BilevelOptimizer, a bilevel.pbt.optax_member(...) or a "
        f"bilevel.pbt.Member, got {name}"
    )


def _finite(tree: PyTree) -> jax.Array:
    """Whether every inexact leaf of ``tree`` is finite (a bool scalar)."""
    flags = [
        jnp.all(jnp.isfinite(a))
        for a in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.result_type(a), jnp.inexact)
    ]
    return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)
