r"""The online bilevel optimizer: inner training steps alternating with hypergradient steps.

Notation: ``w`` the parameters, ``u`` the unconstrained hyperparameters, ``h = c(u)`` their
constrained values (:mod:`bilevel.hparams`), ``L_B(w, h)`` the inner (training) loss on batch ``B``
and ``L_V(w, h)`` the outer (validation) loss on the outer batch. Every hypergradient is taken with
respect to ``u``.

How the hypergradient is computed belongs to the method object (:class:`solvers.AbstractMethod`):
this module describes the inner training as a :class:`solvers.InnerLoop` and calls the method; it
never branches on the method's type.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import solvers
from bilevel import hparams as hp
from bilevel._outer import group_adam
from solvers import checks
from solvers import tree as T

PyTree = Any

#: Forward-mode online hypergradients (RTHO / MARTHE): the same object as ``solvers.Forward``.
Forward = solvers.Forward

Method = solvers.AbstractMethod


class BilevelState(NamedTuple):
    """State of :class:`BilevelOptimizer` (a pytree: jit, vmap and checkpoint it).

    Attributes:
      params: model parameters ``w``.
      inner_state: inner optimizer state.
      hparams: unconstrained hyperparameters ``u``.
      outer_state: outer optimizer state.
      method_state: the method's memory (:meth:`solvers.AbstractMethod.init`): the previous
        adjoint ``v`` (Implicit with warm starts), the tangents (Forward), or ``()``.
      step: outer steps taken (int32).
      skipped: outer steps not applied because something was not finite (int32).
      inner_skipped: inner steps not applied likewise (int32).
      key: a PRNG key for the training loop's own use (data order, dropout); see
        :meth:`BilevelOptimizer.sample_batches`. Not consumed by :meth:`BilevelOptimizer.step`.
      fixed_hparams: the values of the hyperparameters this tuner does not tune (the
        ``fixed_hparams`` given to :class:`BilevelOptimizer`; ``{}`` when none). The losses and
        an inner optimizer built from hyperparameters see them; nothing differentiates them.
        Change them between steps with ``state._replace(fixed_hparams=...)`` (a schedule, or
        ``bilevel.pbt`` writing each member's values).
      model_state: the model's non-parameter state (BatchNorm running averages, dropout RNG
        counters: every ``nnx.Variable`` that is not a parameter) of a tuner built with
        ``has_state=True``, ``()`` otherwise. The inner steps update it; nothing differentiates
        it; it is checkpointed with the rest of the state.
    """

    params: PyTree
    inner_state: PyTree
    hparams: PyTree
    outer_state: PyTree
    method_state: PyTree
    step: jax.Array
    skipped: jax.Array
    inner_skipped: jax.Array
    key: jax.Array
    fixed_hparams: PyTree = {}  # noqa: RUF012 - never mutated; NamedTuple defaults are shared
    model_state: PyTree = ()


# ----------------------------------------------------------------------------- losses


class HparamDict(dict):
    """The dict of constrained hyperparameter values a loss receives.

    A plain ``dict`` (and a pytree) whose missing keys raise a ``KeyError`` naming the space's
    keys, so that a typo in a hyperparameter name is told apart from the user's own errors.
    """

    def __missing__(self, key):
        raise KeyError(
            f"the loss asked for hyperparameter {key!r}, which the space lacks; the space has "
            f"{sorted(map(str, self.keys()))}"
        )


jax.tree_util.register_pytree_with_keys(
    HparamDict,
    lambda d: (tuple((jax.tree_util.DictKey(k), d[k]) for k in sorted(d)), tuple(sorted(d))),
    lambda keys, values: HparamDict(zip(keys, values, strict=True)),
)


def _values(space: PyTree, u: PyTree) -> PyTree:
    h = hp.constrain(space, u)
    return HparamDict(h) if type(h) is dict else h


def _describe_output(out) -> str:
    if isinstance(out, tuple | list):
        return (
            f"a {type(out).__name__} of {len(out)} ({', '.join(_describe_output(o) for o in out)})"
        )
    if hasattr(out, "shape") and hasattr(out, "dtype"):
        return f"an array of shape {tuple(out.shape)} and dtype {out.dtype}"
    if isinstance(out, float | int):
        return f"a Python {type(out).__name__}"
    try:
        return f"a {type(out).__name__} {T.describe(out)}"
    except (TypeError, ValueError):
        return f"a {type(out).__name__} {out!r}"


def _split_value(out, name: str, has_aux: bool, has_state: bool = False):
    """``(value, aux)`` from a loss's value part, with clear errors for convention mix-ups."""
    state_hint = (
        ""
        if has_state
        else "; a loss of a stateful model returning (loss, new_model_state) needs has_state=True"
    )
    if has_aux:
        if not (isinstance(out, tuple | list) and len(out) == 2):
            raise TypeError(
                f"{name} returned {_describe_output(out)}, but has_aux=True expects a pair "
                "(scalar loss, aux); pass has_aux=False for a loss that returns a scalar"
            )
        value, aux = out
    else:
        if isinstance(out, tuple | list):
            raise TypeError(
                f"{name} returned {_describe_output(out)}, but has_aux=False expects a real "
                f"scalar; pass has_aux=True if it returns (loss, aux){state_hint}"
            )
        value, aux = out, None
    _check_scalar(value, name)
    return value, aux


def _loss(fn: Callable, name: str, has_aux: bool) -> Callable:
    """``(params, h, batch) -> (value, aux)`` with clear errors for convention mix-ups."""

    def call(p, h, b):
        return _split_value(fn(p, h, b), name, has_aux)

    return call


def _stateful_loss(fn: Callable, name: str, has_aux: bool) -> Callable:
    """``(params, h, batch, model_state) -> ((value, aux), new_model_state)``, checked."""
    shape = "((scalar loss, aux), new_model_state)" if has_aux else "(scalar loss, new_model_state)"

    def call(p, h, b, s):
        out = fn(p, h, b, s)
        if not (isinstance(out, tuple | list) and len(out) == 2):
            raise TypeError(
                f"{name} returned {_describe_output(out)}, but has_state=True expects {shape}: "
                "return the model state the call produced next to the loss (or pass "
                "has_state=False for a loss(params, h, batch) without model state)"
            )
        first, new_state = out
        value, aux = _split_value(first, name, has_aux, has_state=True)
        try:
            T.check_same_structure(s, new_state, f"{name}'s new_model_state")
        except ValueError as e:
            raise TypeError(
                f"{e}. has_state=True expects {name} to return {shape} with new_model_state "
                "shaped like the model_state it was given (e.g. the second output of the "
                "apply function of bilevel.nnx_apply_fn(model, with_state=True))"
            ) from None
        return (value, aux), new_state

    return call


def _check_scalar(value, name):
    if (not hasattr(value, "dtype") and not isinstance(value, float | int)) or jnp.shape(
        value
    ) != ():
        raise TypeError(f"{name} must return a real scalar, got {_describe_output(value)}")
    if not jnp.issubdtype(jnp.result_type(value), jnp.floating):
        raise TypeError(f"{name} must return a real scalar, got dtype {jnp.result_type(value)}")


# ----------------------------------------------------------------------------- the inner loop


class _Carry(NamedTuple):
    params: PyTree
    inner_state: PyTree
    inner_skipped: jax.Array
    model_state: PyTree = ()


def _if_applied(applied: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    """The model state's half of the guard: ``new`` if the step was applied, else ``old``.

    A select (as :func:`solvers.guard` uses) on accelerators. On CPU a conditional: a select fused
    into the running-average update changes which multiply-adds XLA:CPU contracts, and the state
    would differ in the last bit from an unguarded training loop's; behind a conditional the
    update compiles as it does there, so a guarded step is bit-for-bit a plain one.
    """
    if not jax.tree.leaves(new):
        return new

    def cond(a, n, o):
        return jax.lax.cond(a, lambda: n, lambda: o)

    def select(a, n, o):
        return optax.tree.where(a, n, o)

    return jax.lax.platform_dependent(applied, new, old, cpu=cond, default=select)


class TrainingLoop(solvers.InnerLoop):
    r"""Guarded inner optimizer steps on ``inner_loss(w, c(u), B_t)`` as a :class:`solvers.InnerLoop`.

    The carry is ``(params, inner_state, inner_skipped, model_state)`` and ``theta`` the
    unconstrained hyperparameters ``u`` (``constrain`` maps them to the values the loss sees; the
    identity for the one-shot :func:`hypergradient`). Each step is applied through
    :func:`solvers.guard`: only when the loss, the gradient, the new parameters, the new optimizer
    state and the new model state are finite. The implicit system is the inner gradient on the
    last batch. ``optimizer`` is an Optax transformation or a function ``h -> transformation``
    (an optimizer built from the hyperparameters, rebuilt at every step from the current ``h``).
    ``hyper_grads``, if given, is a function ``(params, h, model_state) -> tree`` whose value (not
    differentiated) each step passes to the optimizer's ``update`` as ``hyper_grads=`` (the
    validation-driven mode of ``hd_*``).

    ``inner`` is ``(w, h, batch) -> (value, aux)``, or with ``has_state`` ``(w, h, batch, s) ->
    ((value, aux), new_s)`` for a model with non-parameter state ``s`` (BatchNorm statistics,
    RNG counters): each step passes ``stop_gradient(s)`` and carries ``stop_gradient(new_s)``,
    so no derivative flows through the state. The methods read the parameters of the final carry
    (:meth:`params`) before they evaluate the outer loss and the implicit system; the model
    state of that carry is the one those functions see (:meth:`model_state`).
    """

    def __init__(
        self,
        inner,
        optimizer,
        constrain,
        num_steps,
        *,
        xs=None,
        shared=None,
        has_state=False,
        hyper_grads=None,
    ):
        self.inner, self.opt, self.constrain = inner, optimizer, constrain
        self.num_steps, self.xs, self.shared = num_steps, xs, shared
        self.has_state = bool(has_state)
        self.hyper_grads = hyper_grads
        self._state = None

    def optimizer(self, h) -> optax.GradientTransformationExtraArgs:
        """The inner optimizer at hyperparameters ``h``."""
        opt = self.opt if isinstance(self.opt, optax.GradientTransformation) else self.opt(h)
        return optax.with_extra_args_support(opt)

    def objective(self, h, batch, model_state) -> Callable:
        """``w -> (value, (aux, new_model_state))``: the inner loss at a frozen model state."""
        if not self.has_state:

            def plain(p):
                value, aux = self.inner(p, h, batch)
                return value, (aux, model_state)

            return plain
        frozen = jax.lax.stop_gradient(model_state)

        def f(p):
            (value, aux), new_state = self.inner(p, h, batch, frozen)
            return value, (aux, jax.lax.stop_gradient(new_state))

        return f

    def step(self, carry, u, batch):
        h = self.constrain(u)
        loss = self.objective(h, batch, carry.model_state)
        (value, (_, new_model_state)), grad = jax.value_and_grad(loss, has_aux=True)(carry.params)
        value_fn = lambda p: loss(p)[0]
        extra = {}
        if self.hyper_grads is not None:
            hg = self.hyper_grads(carry.params, h, jax.lax.stop_gradient(carry.model_state))
            extra["hyper_grads"] = jax.lax.stop_gradient(hg)
        updates, new_state = self.optimizer(h).update(
            grad, carry.inner_state, carry.params, value=value, grad=grad, value_fn=value_fn,
            **extra,
        )  # fmt: skip
        new_params = optax.apply_updates(carry.params, updates)
        r = solvers.guard(
            (carry.params, carry.inner_state),
            (new_params, new_state),
            carry.inner_skipped,
            also=(value, grad, new_model_state),
        )
        model_state = _if_applied(r.applied, new_model_state, carry.model_state)
        return _Carry(*r.value, r.skipped, model_state), (value, r.applied)

    def empty_outs(self, body, init):
        del body, init
        return jnp.zeros((0,), jnp.float32), jnp.zeros((0,), bool)

    def params(self, carry):
        """The parameters of ``carry``; remembers its model state for :meth:`model_state`."""
        self._state = carry.model_state
        return carry.params

    def model_state(self):
        """The model state of the carry whose parameters :meth:`params` returned last."""
        if not self.has_state:
            return ()
        if self._state is None:
            raise RuntimeError(
                "TrainingLoop.model_state() was called before the method read the final "
                "carry's parameters"
            )
        return self._state

    def replace_params(self, carry, params):
        return carry._replace(params=params)

    def optimality(self, params, u):
        loss = self.objective(self.constrain(u), self.last_input(), self.model_state())
        return jax.grad(lambda p: loss(p)[0])(params)

    def curvature_args(self, u):
        """``(h, batch)`` (``(h, batch, model_state)`` with state) of the implicit system."""
        args = (self.constrain(u), self.last_input())
        if self.has_state:
            args = (*args, jax.lax.stop_gradient(self.model_state()))
        return args


def _merge(h: PyTree, fixed: PyTree) -> PyTree:
    """The tuned values ``h`` and the fixed ones in one dict (``fixed`` never differentiated)."""
    if not fixed:
        return h
    return HparamDict({**h, **jax.lax.stop_gradient(dict(fixed))})


class _Reads(HparamDict):
    """An :class:`HparamDict` that records which keys were read."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read: set = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)


def _check_fixed(space: PyTree, fixed: Any) -> dict:
    if fixed is None:
        return {}
    if not isinstance(fixed, dict):
        raise TypeError(
            f"fixed_hparams must be a dict of hyperparameter values, got {type(fixed).__name__}"
        )
    if fixed and not isinstance(space, dict):
        raise TypeError(
            "fixed_hparams needs a dict space (the losses receive one dict holding the tuned "
            f"and the fixed values); the space is a {type(space).__name__}"
        )
    both = sorted(set(fixed) & set(space))
    if both:
        raise ValueError(
            f"hyperparameter(s) {both} are both in space (tuned by hypergradient) and in "
            "fixed_hparams (held fixed / set by another tuner such as bilevel.pbt): a "
            "hyperparameter belongs to exactly one of them"
        )
    out = {}
    for k, v in fixed.items():
        kind = np.asarray(v).dtype.kind if T.is_concrete(v) else jnp.result_type(v).kind
        if kind not in "biuf":
            raise TypeError(f"fixed_hparams[{k!r}] must be a real number or array, got {v!r}")
        out[k] = jnp.asarray(v)
    return out


def _check_inner_factory(factory, space, u0, fixed, method) -> None:
    """An optimizer built from tuned hyperparameters needs a method that differentiates steps."""
    h = _Reads(_merge(_values(space, u0), fixed)) if isinstance(space, dict) else None
    try:
        opt = factory(h if h is not None else _values(space, u0))
    except Exception as e:  # the factory's own error, with the context it lacks
        raise TypeError(
            f"inner_optimizer(h) failed on the initial hyperparameters: {type(e).__name__}: {e}. "
            "inner_optimizer must be an optax.GradientTransformation or a function "
            "h -> optax.GradientTransformation of the (constrained) hyperparameter dict"
        ) from e
    if not isinstance(opt, optax.GradientTransformation):
        raise TypeError(
            f"inner_optimizer(h) must return an optax.GradientTransformation, got {opt!r}"
        )
    if method.differentiates_steps:
        return
    tuned = sorted(map(str, set(h.read) & set(space))) if h is not None else ["(the space)"]
    if tuned:
        raise ValueError(
            f"inner_optimizer is built from tuned hyperparameter(s) {tuned}, but {method!r} does "
            "not differentiate through the inner steps (it sees only the losses), so their "
            "hypergradient would be zero. Use solvers.Truncated(steps=K), solvers.Unrolled() or "
            "bilevel.Forward(), or move them to fixed_hparams (set by a schedule or bilevel.pbt)"
        )


def _check_hd_state(inner_state) -> None:
    """``inner_hyper_grads=True`` needs an ``hd_*`` inner optimizer (its state says so)."""
    from bilevel._hd import HypergradientLRState

    is_hd = lambda x: isinstance(x, HypergradientLRState)
    if not any(map(is_hd, jax.tree.leaves(inner_state, is_leaf=is_hd))):
        raise ValueError(
            "inner_hyper_grads=True passes the validation gradient to the inner optimizer as "
            "hyper_grads=, which only a hypergradient learning rate uses: make the inner "
            "optimizer bilevel.hd_adam(...), bilevel.hd_sgd(...) or bilevel.hypergradient_lr(...)"
            " (any other optimizer ignores it), or pass inner_hyper_grads=False"
        )


def _masked_mean(values, applied):
    n = jnp.sum(applied)
    total = jnp.sum(jnp.where(applied, values, 0.0))
    return jnp.where(n > 0, total / jnp.maximum(n, 1), jnp.nan)


def _check_method(method: Any, num_steps: int | None = None) -> None:
    if not isinstance(method, solvers.AbstractMethod):
        raise TypeError(
            "method must be a hypergradient method such as solvers.Implicit(...), "
            "solvers.Unrolled(), solvers.Truncated(steps=K) or bilevel.Forward(...), got "
            f"{method!r}"
        )
    if num_steps is not None:
        method.validate(num_steps)


def _check_outer_optimizer(outer_optimizer, u):
    """Outer optimizers get ``value`` and ``grad``; a line search (``value_fn``) cannot be given."""
    tx = optax.with_extra_args_support(outer_optimizer)
    try:
        jax.eval_shape(lambda: tx.update(u, tx.init(u), u, value=jnp.zeros(()), grad=u))
    except TypeError as e:
        if "value_fn" in str(e):
            raise TypeError(
                "outer_optimizer needs value_fn (a line search such as optax.lbfgs). The outer "
                "objective as a function of the hyperparameters is only known through the inner "
                "training, so a line search cannot evaluate it online: use a first-order "
                "optimizer (optax.adam, optax.sgd) for the hyperparameters"
            ) from None
        raise


class BilevelOptimizer:
    r"""Tune hyperparameters online: ``inner_steps`` training steps, then one hypergradient step.

    Each :meth:`step` runs ``inner_steps`` steps of ``inner_optimizer`` on
    ``inner_loss(params, h, batch)`` (one batch of ``inner_batches`` each), then one step of
    ``outer_optimizer`` on the unconstrained hyperparameters ``u`` along the hypergradient of
    ``outer_loss(params, h, outer_batch)``, computed by ``method`` (any
    :class:`solvers.AbstractMethod`):

    - ``solvers.Implicit(linear_solver, warm_start=True)`` - implicit function theorem at the
      current iterate ``w``; the Hessian and mixed derivatives come from the **last inner batch**
      ``B``:

      .. math:: H v = \nabla_w L_V, \quad H = \nabla^2_{ww} L_B(w, c(u)),\qquad
         g = \nabla_u L_V - (\nabla^2_{uw} L_B)^\top v

      The solve starts from the previous step's ``v`` when ``warm_start``. With
      ``solvers.neumann(steps=1, scale=rho)`` this is the SOBA-style stochastic bilevel method
      (Dagreou et al., NeurIPS 2022): ``v`` moves by one step
      :math:`v \leftarrow v - \rho (H v - \nabla_w L_V)` per outer step.
    - ``solvers.Truncated(steps=K, checkpoint_every=None)`` - reverse mode through the last ``K``
      inner steps of the cycle, with the parameters and optimizer state at the start of that
      window held constant (Shaban et al., AISTATS 2019). Biased towards short horizons (Wu et
      al., ICLR 2018): its fixed point is where the ``K``-step hypergradient vanishes.
    - ``solvers.Unrolled(checkpoint_every=None)`` - the same with ``K = inner_steps``.
    - ``bilevel.Forward(decay)`` - forward mode through every inner step since the start
      (RTHO / MARTHE); see :class:`solvers.Forward`.

    Differentiating *through* inner steps (Truncated, Unrolled, Forward) differentiates the inner
    optimizer too: ``optax.adam`` with its default ``eps_root=0`` has an infinite derivative
    where a gradient entry is exactly zero (``sqrt`` at 0), which makes the hypergradient NaN and
    every outer step skipped (``metrics["skipped"]`` counts them). Use
    ``optax.adam(lr, eps_root=1e-8)`` there.

    Every step, inner and outer, goes through :func:`solvers.guard`: an inner step applies only
    if its loss, gradient, new parameters and new optimizer state are finite; the outer step only
    if the outer loss, its gradients, the hypergradient, the new hyperparameters (unconstrained
    and constrained), the new outer optimizer state and the method's memory (the adjoint and its
    residual) are finite. Otherwise nothing changes and ``skipped`` / ``inner_skipped`` count it.

    Randomness (dropout, augmentation) reaches the losses inside the batch (the library-wide loss
    convention is ``loss(params, h, batch)``): put a key in each batch, e.g. with
    :meth:`sample_batches`. :meth:`step` is jitted (compose it freely with an outer ``jax.jit``
    or ``jax.vmap``: a jitted function inside another is inlined).

    **Stateful models** (``has_state=True``): a model with non-parameter state ``s`` (BatchNorm
    running averages, dropout RNG counters: ``bilevel.nnx_apply_fn(model, with_state=True)``)
    has losses ``loss(params, h, batch, s) -> (value, new_s)`` (``((value, aux), new_s)`` with
    ``has_aux``). ``s`` starts as ``init(params, model_state=s0)`` and lives in
    ``state.model_state``; each applied inner step replaces it by the ``new_s`` its loss returned
    (a skipped step leaves it unchanged). The outer loss is evaluated with the state after the
    inner steps, and the ``new_s`` it returns is discarded: evaluate the model in eval mode there
    (running averages, no dropout) or in train mode, as the validation metric should be. The
    state is never differentiated: every hypergradient treats it as a constant,

    .. math:: g = \frac{d}{du} L_V\big(w_T(u), s, c(u)\big)\Big|_{s = s_T}

    (an eval-mode outer loss depends on ``u`` through ``s_T`` too; that path is dropped, as the
    running averages are a by-product of training rather than a function being optimized).

    Args:
      inner_loss: ``inner_loss(params, h, batch) -> scalar`` (``(scalar, aux)`` if ``has_aux``),
        ``h`` the constrained hyperparameters (a dict when the space is a dict).
      outer_loss: ``outer_loss(params, h, batch) -> scalar`` (or ``(scalar, aux)``).
      inner_optimizer: Optax transformation for the parameters, or a function
        ``h -> transformation`` building it from the hyperparameters, e.g.
        ``lambda h: optax.adam(h["lr"])`` (rebuilt at every inner step; optimizer state
        structures must not depend on ``h``). Methods that differentiate through the inner steps
        (Truncated, Unrolled, Forward) differentiate the tuned ones it reads; under Implicit
        (which sees only the losses) it may read only ``fixed_hparams`` (a clear error
        otherwise).
      outer_optimizer: Optax transformation for the unconstrained hyperparameters (first order:
        a line search has no outer objective to evaluate). Default
        :func:`bilevel.group_adam` ``()``: Adam with one second moment per hyperparameter
        leaf, so that per-layer hyperparameters move by the sizes of their hypergradients, not
        in lockstep (``python -m experiments.hpo_benchmark`` compares it with ``optax.adam``).
      space: hyperparameter space (pytree of :mod:`bilevel.hparams` specs).
      method: a :class:`solvers.AbstractMethod` (above).
      inner_steps: inner steps per outer step (``>= 1``).
      has_aux: the losses return ``(value, aux)``; the last aux values are in the metrics.
      throw: raise (inside ``jit`` too) when an outer step ends ``NONFINITE`` or with a failed
        linear solve, instead of reporting it in ``metrics["status"]``.
      fixed_hparams: values of hyperparameters the losses (and ``inner_optimizer``) see but this
        tuner does not tune, e.g. ``{"lr": 1e-3, "dropout": 0.1}``; the space must be a dict and
        share no key with them. They live in ``state.fixed_hparams`` (so a population holds one
        value per member and a schedule or ``bilevel.pbt`` may rewrite them between steps).
      has_state: the model has non-parameter state: both losses take it as a fourth argument
        and return ``(value, new_model_state)`` (above); :meth:`init` needs ``model_state=``.
      inner_hyper_grads: drive the learning rate of an ``hd_*`` inner optimizer
        (:func:`bilevel.hd_adam`, :func:`bilevel.hd_sgd`, :func:`bilevel.hypergradient_lr`) by
        the outer loss: every inner step passes
        ``hyper_grads = grad_w outer_loss(w_t, h, outer_batch)`` (not differentiated) to its
        ``update``, so the rate grows while the training steps also lower the validation loss
        and shrinks once they stop doing so (a learned annealing). Costs one outer gradient per
        inner step (choose the outer batch size accordingly); :meth:`warmup` steps, which have
        no outer batch, use the training gradient. Any other inner optimizer is an error (it
        would ignore ``hyper_grads``).

    Example:
      >>> import jax, jax.numpy as jnp, optax, solvers, bilevel
      >>> X, y = jax.random.normal(jax.random.PRNGKey(0), (64, 5)), jnp.ones(64)
      >>> inner = lambda w, h, b: jnp.mean((b[0] @ w - b[1]) ** 2) + h["wd"] * jnp.sum(w ** 2)
      >>> outer = lambda w, h, b: jnp.mean((b[0] @ w - b[1]) ** 2)
      >>> opt = bilevel.BilevelOptimizer(
      ...     inner, outer, inner_optimizer=optax.sgd(0.1), outer_optimizer=optax.adam(0.05),
      ...     space={"wd": bilevel.hparams.log(0.1)}, method=solvers.Implicit(), inner_steps=5)
      >>> state = opt.init(jnp.zeros(5))
      >>> batches = (jnp.stack([X[:32]] * 5), jnp.stack([y[:32]] * 5))
      >>> state, metrics = opt.step(state, batches, (X[32:], y[32:]))
      >>> solvers.Status(int(metrics["status"])).name, opt.hparams(state)["wd"].shape
      ('SUCCESS', ())

    References: Pedregosa, ICML 2016; Lorraine et al., AISTATS 2020 (implicit); Shaban et al.,
    AISTATS 2019 (truncated); Franceschi et al., ICML 2017 and Donini et al., ICLR 2020 (forward);
    Dagreou et al., NeurIPS 2022 (SOBA).
    """

    def __init__(
        self,
        inner_loss: Callable,
        outer_loss: Callable,
        *,
        inner_optimizer: optax.GradientTransformation,
        outer_optimizer: optax.GradientTransformation | None = None,
        space: PyTree,
        method: Method,
        inner_steps: int,
        has_aux: bool = False,
        throw: bool = False,
        fixed_hparams: dict[str, Any] | None = None,
        has_state: bool = False,
        inner_hyper_grads: bool = False,
    ):
        if not isinstance(has_state, bool | np.bool_):
            raise TypeError(f"has_state must be True or False, got {has_state!r}")
        self.has_state = bool(has_state)
        signature = "loss(params, h, batch, model_state)" if has_state else "loss(params, h, batch)"
        for name, fn in (("inner_loss", inner_loss), ("outer_loss", outer_loss)):
            if not callable(fn):
                raise TypeError(f"{name} must be a callable {signature}, got {fn!r}")
        if outer_optimizer is None:
            outer_optimizer = group_adam()
        if not isinstance(inner_hyper_grads, bool | np.bool_):
            raise TypeError(f"inner_hyper_grads must be a bool, got {inner_hyper_grads!r}")
        self.inner_hyper_grads = bool(inner_hyper_grads)
        if not isinstance(outer_optimizer, optax.GradientTransformation):
            raise TypeError(
                f"outer_optimizer must be an optax.GradientTransformation, got {outer_optimizer!r}"
            )
        if not (
            isinstance(inner_optimizer, optax.GradientTransformation) or callable(inner_optimizer)
        ):
            raise TypeError(
                "inner_optimizer must be an optax.GradientTransformation or a function "
                f"h -> optax.GradientTransformation, got {inner_optimizer!r}"
            )
        self.inner_steps = checks.integer("inner_steps", inner_steps)
        _check_method(method, self.inner_steps)
        self._u0 = hp.init(space)  # validates the space
        _check_outer_optimizer(outer_optimizer, self._u0)
        self.fixed_hparams = _check_fixed(space, fixed_hparams)
        if not isinstance(inner_optimizer, optax.GradientTransformation):
            _check_inner_factory(inner_optimizer, space, self._u0, self.fixed_hparams, method)
            self.inner_optimizer = inner_optimizer
        else:
            self.inner_optimizer = optax.with_extra_args_support(inner_optimizer)
        self.space = space
        self.method = method
        self.has_aux = bool(has_aux)
        self.throw = bool(throw)
        self.outer_optimizer = optax.with_extra_args_support(outer_optimizer)
        wrap = _stateful_loss if self.has_state else _loss
        self._inner = wrap(inner_loss, "inner_loss", self.has_aux)
        self._outer = wrap(outer_loss, "outer_loss", self.has_aux)
        self._step = jax.jit(self._step_impl)
        self._warmup = jax.jit(self._warmup_impl, static_argnums=2)

    # ------------------------------------------------------------------ public API

    def init(
        self,
        params: PyTree,
        hparams: PyTree | None = None,
        key: jax.Array | None = None,
        *,
        model_state: PyTree | None = None,
        fixed_hparams: dict | None = None,
    ) -> BilevelState:
        """The initial state.

        Args:
          params: initial parameters.
          hparams: optional **unconstrained** hyperparameters (default: the space's initial
            values). Pass one per population member under ``jax.vmap``; build them from values
            with ``bilevel.hparams.unconstrain``.
          key: PRNG key stored in the state for the training loop (default
            ``jax.random.key(0)``; a legacy ``uint32`` key is accepted and wrapped).
          model_state: the model's non-parameter state (required with ``has_state=True``, e.g.
            the third output of ``bilevel.nnx_apply_fn(model, with_state=True)``; refused
            otherwise).
          fixed_hparams: optional values of some of the constructor's ``fixed_hparams`` for
            this state (the inner optimizer's state is built from them, e.g. the initial rate of
            ``inner_optimizer=lambda h: bilevel.hd_adam(h["lr"])``); the others keep the
            constructor's values. Under ``jax.vmap``, one value per population member.

        Returns:
          A :class:`BilevelState`.
        """
        params = jax.tree.map(jnp.asarray, params)
        for leaf in jax.tree.leaves(params):
            if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
                raise TypeError(f"params must have floating leaves, got {T.describe(params)}")
        if hparams is None:
            u = self._u0
        else:
            hp.constrain(self.space, hparams)  # structure and shape check, names the entry
            u = jax.tree.map(lambda a, ref: jnp.asarray(a, ref.dtype), hparams, self._u0)
            # NumPy, not jnp: inside an outer jit even concrete values would be staged out.
            if T.is_concrete(u) and not all(
                np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(u)
            ):
                raise ValueError("hparams contains non-finite values")
        key = _typed_key(key)
        model_state = _check_model_state(model_state, self.has_state, "init")
        fixed = self._fixed_for_init(fixed_hparams)
        loop = self._loop(None, fixed)
        inner_state = loop.optimizer(loop.constrain(u)).init(params)
        if self.inner_hyper_grads:
            _check_hd_state(inner_state)
        carry = _Carry(params, inner_state, jnp.asarray(0, jnp.int32), model_state)
        method_state = self.method.init(loop, carry, u)
        zero = jnp.asarray(0, jnp.int32)
        return BilevelState(
            params,
            inner_state,
            u,
            self.outer_optimizer.init(u),
            method_state,
            zero,
            zero,
            zero,
            key,
            fixed,
            model_state,
        )

    def _fixed_for_init(self, values: dict | None) -> dict:
        """The constructor's ``fixed_hparams`` with ``values`` in place of some of them."""
        if values is None:
            return dict(self.fixed_hparams)
        if not isinstance(values, dict):
            raise TypeError(f"fixed_hparams must be a dict, got {type(values).__name__}")
        unknown = sorted(map(str, set(values) - set(self.fixed_hparams)))
        if unknown:
            raise ValueError(
                f"fixed_hparams {unknown} are not among the constructor's fixed_hparams "
                f"{sorted(self.fixed_hparams)}: declare them there (their structure and dtype)"
            )
        out = dict(self.fixed_hparams)
        for k, v in values.items():
            ref = self.fixed_hparams[k]
            v = jnp.asarray(v, ref.dtype)
            if v.shape != ref.shape:
                raise ValueError(
                    f"fixed_hparams[{k!r}] must have the shape {ref.shape} of the constructor's "
                    f"value, got {v.shape}"
                )
            if T.is_concrete(v) and not np.isfinite(np.asarray(v)).all():
                raise ValueError(f"fixed_hparams[{k!r}] must be finite, got {v}")
            out[k] = v
        return out

    def hparams(self, state: BilevelState) -> PyTree:
        """Constrained hyperparameter values of ``state`` (with its ``fixed_hparams``, if any)."""
        h = hp.constrain(self.space, state.hparams)
        return {**h, **state.fixed_hparams} if state.fixed_hparams else h

    def params(self, state: BilevelState) -> PyTree:
        """Model parameters of ``state``."""
        return state.params

    def update_model(self, model: nnx.Module, state: BilevelState) -> nnx.Module:
        """Write the trained parameters (and model state) of ``state`` into ``model`` in place.

        The one call back from the tuner to the user's Flax NNX model, for parameters that came
        from ``bilevel.nnx_apply_fn(model)`` (an ``nnx.State``): ``nnx.update(model,
        state.params)``; with ``has_state=True`` the model state too (BatchNorm running
        averages, RNG counters): ``nnx.update(model, state.params, state.model_state)``.

        Args:
          model: the ``nnx.Module`` whose parameters were given to :meth:`init`.
          state: a state of this tuner.

        Returns:
          ``model``, updated in place.

        Example:
          >>> import jax, jax.numpy as jnp, optax, solvers, bilevel
          >>> from flax import nnx
          >>> model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
          >>> apply_fn, params = bilevel.nnx_apply_fn(model)
          >>> X = jax.random.normal(jax.random.key(0), (40, 3)); y = X @ jnp.ones((3, 1))
          >>> loss = lambda p, h, b: jnp.mean((apply_fn(p, b[0]) - b[1]) ** 2)
          >>> opt = bilevel.BilevelOptimizer(loss, loss, inner_optimizer=optax.sgd(0.1),
          ...     outer_optimizer=optax.sgd(0.1), space={"wd": bilevel.hparams.log(0.1)},
          ...     method=solvers.Truncated(steps=1), inner_steps=2)
          >>> state, _ = opt.step(opt.init(params), (X[None], y[None]), (X, y))
          >>> model = opt.update_model(model, state)
          >>> bool(jnp.allclose(model(X), apply_fn(state.params, X)))
          True
        """
        if not isinstance(model, nnx.Module):
            raise TypeError(f"model must be a flax.nnx.Module, got {type(model).__name__}")
        if not isinstance(state.params, nnx.State):
            raise TypeError(
                f"update_model needs parameters from bilevel.nnx_apply_fn(model) (an nnx.State); "
                f"this state holds a {type(state.params).__name__}: put them back yourself"
            )
        if self.has_state:
            if not isinstance(state.model_state, nnx.State):
                raise TypeError(
                    "update_model needs a model state from bilevel.nnx_apply_fn(model, "
                    f"with_state=True) (an nnx.State); this state holds a "
                    f"{type(state.model_state).__name__}: put it back yourself"
                )
            nnx.update(model, state.params, state.model_state)
        else:
            nnx.update(model, state.params)
        return model

    def step(
        self, state: BilevelState, inner_batches: PyTree, outer_batch: PyTree
    ) -> tuple[BilevelState, dict[str, Any]]:
        """One outer step: ``inner_steps`` inner steps, then one hypergradient step (jitted).

        Args:
          state: current state.
          inner_batches: pytree whose leaves have a leading axis of length ``inner_steps`` (one
            batch per inner step), or of length 1: one batch (e.g. the full training set) reused
            by every inner step without copying it.
          outer_batch: one validation batch.

        Returns:
          ``(state, metrics)``; metrics (the vocabulary shared by every tuner):

          - ``inner_loss``: mean loss over the inner steps that were applied;
            ``inner_applied`` how many were;
          - ``outer_loss``, ``hypergrad`` (w.r.t. ``u``), ``hypergrad_norm``, ``hparams``
            (constrained, after the update);
          - ``status``: a :class:`solvers.Status` code of this outer step: ``SUCCESS``,
            ``LINEAR_SOLVE_FAILED`` (applied, but the solve missed its tolerance) or
            ``NONFINITE`` (not applied);
          - ``linear_iterations``, ``linear_residual``: the implicit solve (0 for methods
            without one);
          - ``skipped``, ``inner_skipped``: cumulative counts of steps not applied;
          - ``inner_aux`` / ``outer_aux`` with ``has_aux``.
        """
        self._check_batches(inner_batches)
        if outer_batch is None:
            raise ValueError("outer_batch is None: pass the validation batch for outer_loss")
        return self._step(state, inner_batches, outer_batch)

    def warmup(
        self, state: BilevelState, inner_batches: PyTree, steps: int | None = None
    ) -> tuple[BilevelState, dict]:
        """Inner steps only, no hypergradient step (jitted): training before tuning starts.

        ``fit(..., warmup_steps=k)`` calls it ``k`` times before the first outer step (BO-REP's
        "initialization refinement"; a network far from its solution gives poor implicit
        hypergradients). The hyperparameters, the outer optimizer state and the method's memory
        are unchanged; ``state.step`` advances so the batches keep changing. ``fit(...,
        train_steps=N)`` runs the remainder of a budget that ``inner_steps`` does not divide as
        one ``warmup(..., steps=r)``.

        Args:
          state: current state.
          inner_batches: as for :meth:`step`, with a leading axis of length ``steps`` (or 1).
          steps: inner steps to run (default ``inner_steps``).

        Returns:
          ``(state, metrics)`` with ``inner_loss``, ``inner_applied``, ``skipped`` and
          ``inner_skipped``.
        """
        steps = self.inner_steps if steps is None else checks.integer("steps", steps)
        self._check_batches(inner_batches, steps)
        return self._warmup(state, inner_batches, steps)

    def _warmup_impl(self, state, inner_batches, steps):
        loop = self._loop(inner_batches, state.fixed_hparams, num_steps=steps)
        carry, (values, applied) = loop.run(
            _carry(state), state.hparams, 0, loop.num_steps, differentiable=False
        )
        state = state._replace(
            params=carry.params,
            inner_state=carry.inner_state,
            inner_skipped=carry.inner_skipped,
            model_state=carry.model_state,
            step=state.step + 1,
        )
        return state, {
            "inner_loss": _masked_mean(values, applied),
            "inner_applied": jnp.sum(applied).astype(jnp.int32),
            "skipped": state.skipped,
            "inner_skipped": state.inner_skipped,
        }

    def sample_batches(
        self,
        state: BilevelState,
        inner_data: PyTree,
        outer_data: PyTree,
        batch_size: int,
        outer_batch_size: int | None = None,
    ) -> tuple[PyTree, PyTree]:
        """The batches of the next :meth:`step`, a pure function of ``(state.key, state.step)``.

        Drawn with :func:`bilevel.minibatches`, so a resumed run replays the same data order.

        Args:
          state: current state.
          inner_data, outer_data: full datasets (pytrees of arrays with a leading example axis).
          batch_size: rows per inner batch.
          outer_batch_size: rows of the outer batch (default: all of ``outer_data``).

        Returns:
          ``(inner_batches, outer_batch)`` shaped for :meth:`step`.
        """
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

    def fit(
        self, state: BilevelState, inner_data: PyTree, outer_data: PyTree, **kwargs: Any
    ) -> tuple[BilevelState, dict[str, np.ndarray]]:
        """:func:`bilevel.fit` on this tuner: ``fit(self, state, inner_data, outer_data, **kw)``.

        Runs ``steps`` outer steps in jitted chunks on batches from :meth:`sample_batches`, with
        one progress bar, a metrics history, callbacks and periodic checkpoints with resume.
        Keyword arguments: ``steps`` (or ``train_steps``: a budget of training steps that
        ``inner_steps`` need not divide), ``batch_size``, ``outer_batch_size``, ``warmup_steps``
        (:meth:`warmup` steps first), ``chunk``,
        ``callbacks`` (e.g. :class:`bilevel.EarlyStopping` on a held-out split),
        ``checkpoint_dir``, ``checkpoint_every``, ``resume``, ``progress``,
        ``desc``, ``log_dir`` (per-step ``metrics.jsonl``), ``tensorboard``.

        Returns:
          ``(state, history)``; ``history`` maps ``"step"``, ``"inner_loss"``, ``"outer_loss"``,
          ``"hparams/<name>"``, ``"hypergrad/<name>"``, ``"status"``, ... to NumPy arrays with one
          row per outer step: the hyperparameter columns are the schedule.

        Example:
          >>> import jax, jax.numpy as jnp, optax, solvers, bilevel
          >>> X = jax.random.normal(jax.random.key(0), (80, 3)); y = X @ jnp.ones(3)
          >>> loss = lambda w, h, b: jnp.mean((b[0] @ w - b[1]) ** 2) + h["wd"] * w @ w
          >>> opt = bilevel.BilevelOptimizer(loss, loss, inner_optimizer=optax.sgd(0.1),
          ...     outer_optimizer=optax.adam(0.05), space={"wd": bilevel.hparams.log(0.1)},
          ...     method=solvers.Implicit(), inner_steps=5)
          >>> state, history = opt.fit(opt.init(jnp.zeros(3)), (X[:60], y[:60]), (X[60:], y[60:]),
          ...                          steps=20, batch_size=16, progress=False)
          >>> history["hparams/wd"].shape, bool(history["hparams/wd"][-1] < 0.1)
          ((20,), True)
        """
        from bilevel._fit import fit

        return fit(self, state, inner_data, outer_data, **kwargs)

    # ------------------------------------------------------------------ internals

    def _loop(self, inner_batches, fixed, outer_batch=None, num_steps=None) -> TrainingLoop:
        constrain = lambda u: _merge(_values(self.space, u), fixed)
        n = self.inner_steps if num_steps is None else num_steps
        kw = {"has_state": self.has_state}
        if self.inner_hyper_grads and outer_batch is not None:

            def hyper_grads(p, h, model_state):
                if self.has_state:
                    f = lambda q: self._outer(q, h, outer_batch, model_state)[0][0]
                else:
                    f = lambda q: self._outer(q, h, outer_batch)[0]
                return jax.grad(f)(p)

            kw["hyper_grads"] = hyper_grads
        args = (self._inner, self.inner_optimizer, constrain, n)
        if inner_batches is None:
            return TrainingLoop(*args, **kw)
        if jnp.shape(jax.tree.leaves(inner_batches)[0])[0] == 1 and n != 1:
            # One batch reused by every step, without copies.
            shared = jax.tree.map(lambda a: a[0], inner_batches)
            return TrainingLoop(*args, shared=shared, **kw)
        return TrainingLoop(*args, xs=inner_batches, **kw)

    def _outer_at(self, loop, outer_batch):
        """``(w, u) -> (value, aux)``: the outer loss at the model state the method reached."""
        if not self.has_state:
            return lambda p, u: self._outer(p, loop.constrain(u), outer_batch)

        def outer(p, u):
            state = jax.lax.stop_gradient(loop.model_state())
            return self._outer(p, loop.constrain(u), outer_batch, state)[0]

        return outer

    def _check_batches(self, inner_batches, num_steps=None):
        n = self.inner_steps if num_steps is None else num_steps
        leaves = jax.tree.leaves(inner_batches)
        if not leaves:
            raise ValueError("inner_batches is empty")
        for leaf in leaves:
            if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] not in (n, 1):
                what = f"inner_steps={n}" if n == self.inner_steps else f"steps={n}"
                raise ValueError(
                    f"every leaf of inner_batches needs a leading axis of length {what} (or 1: "
                    "one batch reused by every inner step); got shapes "
                    f"{jax.tree.map(jnp.shape, inner_batches)}"
                )
        if len({jnp.shape(leaf)[0] for leaf in leaves}) > 1:
            raise ValueError(
                "the leaves of inner_batches disagree on their leading axis: "
                f"{jax.tree.map(jnp.shape, inner_batches)}"
            )

    def _step_impl(self, state, inner_batches, outer_batch):
        loop = self._loop(inner_batches, state.fixed_hparams, outer_batch)
        carry = _carry(state)
        expected = jax.eval_shape(lambda: self.method.init(loop, carry, state.hparams))
        try:
            T.check_same_structure(expected, state.method_state, "state.method_state")
        except ValueError:
            raise ValueError(
                f"state.method_state does not fit {self.method!r}: the state was made by a "
                "BilevelOptimizer with another method (or other settings). Build the state "
                "with this optimizer's init(...)"
            ) from None

        outer = self._outer_at(loop, outer_batch)
        hg = self.method.hypergradient(loop, carry, state.hparams, outer, state.method_state)
        carry = hg.carry
        values, applied = hg.outs

        # The outer step, through the one guard.
        updates, outer_state = self.outer_optimizer.update(
            hg.grad, state.outer_state, state.hparams, value=hg.value, grad=hg.grad
        )
        u = optax.apply_updates(state.hparams, updates)
        r = solvers.guard(
            (state.hparams, state.outer_state, state.method_state),
            (u, outer_state, hg.memory),
            state.skipped,
            also=(hg.value, hg.grad, hg.checks, hp.constrain(self.space, u)),
        )
        u, outer_state, memory = r.value
        status = jnp.where(r.applied, hg.status, solvers.Status.NONFINITE).astype(jnp.int32)
        if self.throw:
            solvers.error_if_failed(status, "BilevelOptimizer.step")
        state = BilevelState(
            params=carry.params,
            inner_state=carry.inner_state,
            hparams=u,
            outer_state=outer_state,
            method_state=memory,
            step=state.step + 1,
            skipped=r.skipped,
            inner_skipped=carry.inner_skipped,
            key=state.key,
            fixed_hparams=state.fixed_hparams,
            model_state=carry.model_state,
        )
        metrics = {
            "inner_loss": _masked_mean(values, applied),
            "inner_applied": jnp.sum(applied).astype(jnp.int32),
            "outer_loss": hg.value,
            "hypergrad": hg.grad,
            "hypergrad_norm": optax.tree.norm(hg.grad),
            "hparams": self.hparams(state),
            "status": status,
            "linear_iterations": hg.linear_iterations,
            "linear_residual": hg.linear_residual,
            "skipped": state.skipped,
            "inner_skipped": state.inner_skipped,
        }
        if self.has_aux:
            h = loop.constrain(state.hparams)
            loss = loop.objective(h, loop.last_input(), carry.model_state)
            metrics["inner_aux"] = loss(carry.params)[1][0]
            metrics["outer_aux"] = hg.aux
        return state, metrics


def _carry(state: BilevelState) -> _Carry:
    return _Carry(state.params, state.inner_state, state.inner_skipped, state.model_state)


def _check_model_state(model_state, has_state: bool, where: str) -> PyTree:
    """The model state as arrays, or ``()`` for a stateless tuner; clear errors otherwise."""
    if not has_state:
        if model_state is not None and jax.tree.leaves(model_state):
            raise ValueError(
                f"{where}: model_state= was given but the losses were declared stateless: pass "
                "has_state=True to BilevelOptimizer, with losses loss(params, h, batch, "
                "model_state) -> (value, new_model_state)"
            )
        return ()
    if model_state is None:
        raise ValueError(
            f"{where}: has_state=True needs the model's non-parameter state: pass "
            "model_state=..., e.g. the third output of bilevel.nnx_apply_fn(model, "
            "with_state=True)"
        )
    for leaf in jax.tree.leaves(model_state):
        if not isinstance(leaf, jax.Array | np.ndarray | np.generic | float | int | bool):
            raise TypeError(
                f"{where}: model_state must be a pytree of arrays, got a leaf of type "
                f"{type(leaf).__name__} in {T.describe(model_state)}"
            )
    return jax.tree.map(jnp.asarray, model_state)


def _typed_key(key):
    """A typed PRNG key: ``jax.random.key(0)`` for ``None``; a legacy uint32 key is wrapped."""
    if key is None:
        return jax.random.key(0)
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    if key.dtype == jnp.uint32 and key.ndim >= 1 and key.shape[-1] == 2:
        return jax.random.wrap_key_data(key)  # a legacy jax.random.PRNGKey
    raise TypeError(
        f"key must be a PRNG key (jax.random.key(seed)), got dtype {key.dtype} shape {key.shape}"
    )


# ----------------------------------------------------------------------------- one-shot


class HypergradientInfo(NamedTuple):
    """Backward diagnostics of :func:`hypergradient`.

    Attributes:
      linear_iterations: iterations of the linear solve (0 for methods without one).
      linear_residual: its relative residual (0 for methods without one).
      status: a :class:`solvers.Status` code: ``SUCCESS``, ``LINEAR_SOLVE_FAILED`` (the linear
        solve did not reach its tolerance) or ``NONFINITE`` (the hypergradient, the outer
        gradient or the adjoint is not finite).
      linear_solution: the adjoint ``v`` of Implicit (to warm-start), the tangents of Forward,
        ``()`` otherwise: the method's memory.
    """

    linear_iterations: jax.Array
    linear_residual: jax.Array
    status: jax.Array
    linear_solution: PyTree


def hypergradient(
    inner_loss: Callable,
    outer_loss: Callable,
    params: PyTree,
    hparams: PyTree,
    inner_batch: PyTree,
    outer_batch: PyTree,
    *,
    method: Method | None = None,
    inner_optimizer: optax.GradientTransformation | None = None,
    inner_state: PyTree | None = None,
    model_state: PyTree | None = None,
    return_info: bool = False,
    throw: bool = False,
):
    r"""One-shot hypergradient :math:`d L_V / d h` at given parameters.

    Without ``inner_optimizer``, ``inner_batch`` is one batch and no inner step runs: the method
    differentiates at ``params`` (only meaningful for ``solvers.Implicit``, which assumes
    ``params`` minimizes ``inner_loss``):

    .. math:: H v = \nabla_w L_V, \quad H = \nabla^2_{ww} L_B(w, h), \qquad
       g = \nabla_h L_V - (\nabla^2_{hw} L_B)^\top v

    With ``inner_optimizer``, ``inner_batch`` holds stacked batches (a leading axis of ``n``
    steps): ``n`` guarded ``inner_optimizer`` steps run from ``params`` and ``inner_state``
    (default: a fresh optimizer state), and the method differentiates ``L_V`` at the end (the
    implicit system on the last batch; through all steps for ``Unrolled``, the last ``K`` for
    ``Truncated``, forward tangents from zero for ``Forward``): the hypergradient
    ``BilevelOptimizer.step`` applies from that state. Every setting of the method is honoured
    (``checkpoint_every``, ``decay``); ``Implicit.warm_start`` has no previous solve here.

    With ``model_state`` (a stateful model, e.g. BatchNorm: see ``BilevelOptimizer(...,
    has_state=True)``) the losses are ``loss(params, h, batch, model_state) -> (scalar,
    new_model_state)``: the inner steps thread the state, the outer loss and the implicit system
    see the state after them, and the hypergradient treats it as a constant.

    Args:
      inner_loss, outer_loss: ``loss(params, h, batch) -> scalar``, or with ``model_state``
        ``loss(params, h, batch, model_state) -> (scalar, new_model_state)``.
      params: parameters.
      hparams: hyperparameter values ``h`` (the loss convention's constrained values; the
        gradient is w.r.t. these).
      inner_batch: the batch defining the Hessian, or stacked batches (with ``inner_optimizer``).
      outer_batch: validation batch.
      method: a :class:`solvers.AbstractMethod` (default ``solvers.Implicit()``).
      inner_optimizer: Optax transformation running the inner steps.
      inner_state: its state (default ``inner_optimizer.init(params)``).
      model_state: the model's non-parameter state (``None``: a stateless model).
      return_info: also return :class:`HypergradientInfo`.
      throw: raise instead of reporting a ``NONFINITE`` or ``LINEAR_SOLVE_FAILED`` status.

    Returns:
      ``g`` shaped like ``hparams``, or ``(g, info)``.

    Example:
      >>> import jax.numpy as jnp, bilevel
      >>> inner = lambda w, h, b: jnp.sum((w - b) ** 2) + h * jnp.sum(w ** 2)
      >>> outer = lambda w, h, b: jnp.sum((w - b) ** 2)
      >>> w = jnp.ones(2) / 1.5                                  # argmin at h = 0.5, b = 1
      >>> float(bilevel.hypergradient(inner, outer, w, 0.5, jnp.ones(2), jnp.ones(2)))
      0.5925...
    """
    method = solvers.Implicit() if method is None else method
    _check_method(method)
    if outer_batch is None:
        raise ValueError("outer_batch is None: pass the validation batch for outer_loss")
    params = jax.tree.map(jnp.asarray, params)
    hparams = jax.tree.map(jnp.asarray, hparams)
    has_state = model_state is not None
    model_state = _check_model_state(model_state, has_state, "hypergradient")
    wrap = _stateful_loss if has_state else _loss
    inner = wrap(inner_loss, "inner_loss", False)
    outer = wrap(outer_loss, "outer_loss", False)
    if inner_optimizer is None:
        if inner_state is not None:
            raise ValueError("inner_state= needs inner_optimizer= (the optimizer it belongs to)")
        n, inner_state = 0, ()
        loop = TrainingLoop(inner, None, lambda h: h, 0, shared=inner_batch, has_state=has_state)
    else:
        if not isinstance(inner_optimizer, optax.GradientTransformation):
            raise TypeError(
                f"inner_optimizer must be an optax.GradientTransformation, got {inner_optimizer!r}"
            )
        leaves = jax.tree.leaves(inner_batch)
        n = jnp.shape(leaves[0])[0] if leaves and jnp.ndim(leaves[0]) else 0
        if n < 1 or any(jnp.ndim(a) == 0 or jnp.shape(a)[0] != n for a in leaves):
            raise ValueError(
                "with inner_optimizer, inner_batch holds stacked batches: every leaf needs the "
                f"same leading axis (one entry per inner step); got {T.describe(inner_batch)}"
            )
        opt = optax.with_extra_args_support(inner_optimizer)
        inner_state = opt.init(params) if inner_state is None else inner_state
        loop = TrainingLoop(inner, opt, lambda h: h, n, xs=inner_batch, has_state=has_state)
    try:
        method.validate(n)
    except ValueError as e:
        if n == 0:
            raise ValueError(
                f"{e}. Without inner_optimizer= no inner step runs; pass inner_optimizer= and "
                "stacked inner batches for this method"
            ) from None
        raise
    carry = _Carry(params, inner_state, jnp.asarray(0, jnp.int32), model_state)

    def outer_at(p, h):
        if not has_state:
            return outer(p, h, outer_batch)
        return outer(p, h, outer_batch, jax.lax.stop_gradient(loop.model_state()))[0]

    hg = method.hypergradient(loop, carry, hparams, outer_at, None)
    if throw:
        solvers.error_if_failed(hg.status, "bilevel.hypergradient")
    if not return_info:
        return hg.grad
    info = HypergradientInfo(hg.linear_iterations, hg.linear_residual, hg.status, hg.memory)
    return hg.grad, info


def implicit_hypergradient(
    inner_loss: Callable,
    outer_loss: Callable,
    params: PyTree,
    hparams: PyTree,
    inner_batch: PyTree,
    outer_batch: PyTree,
    linear_solver: solvers.LinearSolver,
    init: PyTree | None = None,
):
    r"""Implicit hypergradient at ``params`` with the linear solve's diagnostics.

    .. math:: H v = \nabla_w L_V, \quad H = \nabla^2_{ww} L_B(w, h), \qquad
       g = \nabla_h L_V - (\nabla^2_{hw} L_B)^\top v

    ``solvers.Implicit(linear_solver=...)``'s hypergradient, warm-started from ``init``;
    ``outer_loss`` returns ``(value, aux)``.

    Returns:
      ``(g, v, stats, outer_value, outer_aux)``.
    """
    method = solvers.Implicit(linear_solver=linear_solver, warm_start=init is not None)
    inner = lambda p, h, b: (inner_loss(p, h, b), None)
    loop = TrainingLoop(inner, None, lambda h: h, 0, shared=inner_batch)
    carry = _Carry(params, (), jnp.asarray(0, jnp.int32))
    hg = method.hypergradient(
        loop, carry, hparams, lambda p, h: outer_loss(p, h, outer_batch), init
    )
    stats = solvers.SolveStats(
        hg.linear_iterations,
        hg.linear_residual,
        hg.status == solvers.Status.SUCCESS,
    )
    v = hg.memory if init is not None else hg.checks[1]
    return hg.grad, v, stats, hg.value, hg.aux
