r"""The Self-Tuning Networks trainer: best-response steps alternating with hyper steps.

Notation: ``u`` the unconstrained hyperparameters (:mod:`bilevel.hparams`), ``sigma`` the learned
perturbation scales, :math:`\tilde u = u + \sigma\varepsilon` per example, ``hnet`` the features fed
to the best-response layers, :math:`\theta` the general weights (``nnx.Param``) and
:math:`\psi` the response weights (:class:`bilevel.stn.ResponseParam`). The variant (STN or
Delta-STN) is a strategy object of :mod:`bilevel.stn._methods`.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.flatten_util import ravel_pytree

import solvers
from bilevel import hparams as hp
from bilevel._bilevel import _describe_output, _masked_mean, _typed_key
from bilevel._fit import fit as _fit
from bilevel._utils import minibatches
from bilevel.stn._layers import ResponseParam, mip_encoding, stn_layers
from bilevel.stn._methods import (
    STN,
    StnHparams,
    StnMethod,
    UnknownHyperparameterError,
    _Reads,
)
from bilevel.stn._perturb import entropy, perturb, scale_from_param, scale_to_param
from solvers import checks
from solvers import tree as T

__all__ = ["StnHparams", "Trainer", "TrainerState"]

PyTree = Any

_NOISE, _INNER_DATA, _OUTER_DATA = 0x5354, 1, 2


class TrainerState(NamedTuple):
    """State of :class:`Trainer` (a pytree of arrays: jit, vmap and checkpoint it).

    Attributes:
      params: every ``nnx.Param`` of the model (general and response weights), an ``nnx.State``.
      model_state: the model's other state (batch statistics, RNG counters), an ``nnx.State``;
        threaded through the inner steps, never differentiated.
      inner_state: state of ``inner_optimizer`` (over ``params``).
      hparams: unconstrained hyperparameters ``u`` (the space's structure).
      scale: unconstrained perturbation scales ``rho``, ``sigma = softplus(rho)`` (same structure).
      outer_state: state of ``outer_optimizer`` (over ``(hparams, scale)``).
      step: calls of ``warmup`` / ``step`` so far (int32); with ``key`` it fixes the data order
        and the noise of the next call.
      skipped: outer (hyper) steps not applied because something they produced was non-finite
        (int32).
      inner_skipped: inner (best-response) steps not applied likewise (int32).
      key: typed PRNG key of the run (the trainer derives its noise from ``fold_in(key, ...)``).
    """

    params: PyTree
    model_state: PyTree
    inner_state: PyTree
    hparams: PyTree
    scale: PyTree
    outer_state: PyTree
    step: jax.Array
    skipped: jax.Array
    inner_skipped: jax.Array
    key: jax.Array


class _Inner(NamedTuple):
    params: PyTree
    model_state: PyTree
    inner_state: PyTree
    losses: jax.Array
    applied: jax.Array
    skipped: jax.Array


def _check_loss(value: Any, name: str, signature: str) -> jax.Array:
    """``value`` if it is a real scalar, else a ``TypeError`` naming the loss and what it gave."""
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    is_array = hasattr(value, "shape") and hasattr(value, "dtype")
    if not (is_number or is_array):
        hint = (
            " (the STN trainer has no has_aux: return the loss value alone)"
            if isinstance(value, tuple | list)
            else ""
        )
        raise TypeError(
            f"{name} returned {_describe_output(value)}; the trainer expects {signature} to return a "
            f"real scalar (shape ()){hint}"
        )
    if jnp.shape(value) != () or not jnp.issubdtype(jnp.result_type(value), jnp.floating):
        raise TypeError(
            f"{name} returned {_describe_output(value)}; the trainer expects {signature} to return a "
            f"real scalar (shape ()): reduce it, e.g. with jnp.mean"
        )
    return value


class Trainer:
    r"""Self-Tuning Network trainer: alternate best-response steps and hyper steps.

    One :meth:`step` (a cycle) runs ``inner_steps`` steps of ``inner_optimizer`` on the network
    weights at perturbed hyperparameters, then ``outer_steps`` steps of ``outer_optimizer`` on the
    hyperparameters and perturbation scales along the outer (validation) loss through the best
    response:

    .. math::
       \phi &\leftarrow \phi - \alpha \nabla_\phi\,
          \mathbb E_{\varepsilon}\, L_I\big(w_\phi(\tilde u), c(\tilde u)\big),
          \qquad \tilde u = u + \sigma\varepsilon \\
       (u, \rho) &\leftarrow (u, \rho) - \beta \nabla_{u,\rho}\Big(
          \mathbb E_{\varepsilon}\, L_O\big(w_\phi(\tilde u)\big) - \tau\, H[\mathcal N(u,\sigma^2)]
          \Big), \qquad \sigma = \mathrm{softplus}(\rho)

    ``inner_optimizer`` updates every ``nnx.Param`` of the model (general weights ``W_e, b_e`` and
    the :class:`~bilevel.stn.ResponseParam` weights ``W_r, b_r, V``); which of them train at which
    hyperparameters is the ``method``'s business (:class:`~bilevel.stn.STN`,
    :class:`~bilevel.stn.DeltaSTN`). ``outer_optimizer`` updates the unconstrained
    hyperparameters ``u`` and the scale parameters ``rho`` (``rho`` stays fixed when
    ``tune_scales=False``). The hypergradient reaches hyperparameters the inner loss cannot be
    differentiated by (dropout, augmentation) through ``hnet``, the response layers' input;
    ``outer_loss`` should use the network without regularizers or augmentation.

    Losses: ``inner_loss(model, h, batch, key) -> scalar`` and ``outer_loss(model, h, batch) ->
    scalar``, ``model`` the merged NNX model, ``h`` a :class:`StnHparams` (``h["name"]`` the
    constrained per-example values, ``h.hnet`` the features to feed the layers:
    ``model(x, h.hnet)``, or ``h.apply(model, x)`` for the Delta-STN linearization), ``key`` a
    fresh PRNG key for dropout/augmentation. The example axis of each batch is the leading axis
    of its first leaf.

    Stateful models (``nnx.BatchNorm``, ``nnx.Dropout`` with its own RNG stream, any
    ``nnx.Variable`` that is not an ``nnx.Param``): the losses receive a fresh copy of the model
    holding the current state (``state.model_state``) and update it the NNX way, by calling it.
    An applied inner step keeps the state its copy ends with (a skipped step keeps the old
    one); the outer loss sees the state after the inner steps of the cycle, and what it does to
    its copy is discarded: call ``model.eval()`` on that copy first to evaluate with the running
    statistics, or leave it in train mode. The state is never differentiated and is
    checkpointed with the rest of :class:`TrainerState`. Every step goes through :func:`solvers.guard`: a step that produces a
    non-finite loss, gradient, parameter, optimizer state, hyperparameter or scale is not applied
    and is counted (``skipped``, ``inner_skipped``).

    Args:
      model: an ``nnx.Module`` with best-response layers (some :class:`ResponseParam`).
      inner_loss: training loss (with regularizers/augmentation driven by ``h``).
      outer_loss: validation loss.
      space: hyperparameter space (pytree of :mod:`bilevel.hparams` specs).
      inner_optimizer: Optax transformation for the network weights.
      outer_optimizer: Optax transformation for ``(u, rho)``.
      method: the variant, :class:`~bilevel.stn.STN` or :class:`~bilevel.stn.DeltaSTN`.
      inner_steps: inner steps per cycle (``>= 1``).
      outer_steps: hyper steps per cycle (``>= 1``).
      init_scale: initial perturbation scale ``sigma`` (in unconstrained units, ``> 0``).
      tune_scales: learn ``sigma`` in the hyper steps.
      entropy_weight: ``tau >= 0``, weight of the entropy bonus.
      shared: ``True`` / ``False`` or a pytree of bools matching ``space``: perturb these
        hyperparameters once per batch instead of once per example.
      encoding: ``"identity"`` (``hnet`` in unconstrained units) or ``"mip"``
        (:func:`~bilevel.stn.mip_encoding` of ``sigmoid(u)``, twice as many features).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from flax import nnx
      >>> from bilevel import hparams, stn
      >>> X, y = jax.random.normal(jax.random.key(0), (32, 4)), jnp.ones((32, 1))
      >>> def inner_loss(m, h, b, key):
      ...     err = jnp.mean((m(b[0], h.hnet) - b[1]) ** 2)
      ...     return err + jnp.mean(h["wd"] * stn.effective_l2(m, h.hnet))
      >>> outer_loss = lambda m, h, b: jnp.mean((m(b[0], h.hnet) - b[1]) ** 2)
      >>> trainer = stn.Trainer(stn.StnLinear(4, 1, 1, rngs=nnx.Rngs(0)), inner_loss, outer_loss,
      ...     space={"wd": hparams.log(0.1)}, inner_optimizer=optax.adam(1e-2),
      ...     outer_optimizer=optax.adam(1e-2), method=stn.DeltaSTN())
      >>> state = trainer.init(key=jax.random.key(1))
      >>> batches = jax.tree.map(lambda a: jnp.stack([a] * 5), (X, y))
      >>> state, metrics = jax.jit(trainer.step)(state, batches, (X[None], y[None]))
      >>> int(state.step), trainer.hparams(state)["wd"].shape, int(metrics["status"])
      (1, (), 0)
      >>> state, history = trainer.fit(state, (X, y), (X, y), steps=4, batch_size=8,
      ...     chunk=2, progress=False)
      >>> history["hparams/wd"].shape, history["step"].tolist()
      ((4,), [2, 3, 4, 5])

    References: MacKay, Vicol, Lorraine, Duvenaud and Grosse, "Self-Tuning Networks", ICLR 2019;
    Bae and Grosse, "Delta-STN: Efficient Bilevel Optimization for Neural Networks using
    Structured Response Jacobians", NeurIPS 2020.
    """

    def __init__(
        self,
        model: nnx.Module,
        inner_loss: Callable,
        outer_loss: Callable,
        *,
        space: PyTree,
        inner_optimizer: optax.GradientTransformation,
        outer_optimizer: optax.GradientTransformation,
        method: StnMethod = STN(),  # noqa: B008 (immutable)
        inner_steps: int = 5,
        outer_steps: int = 1,
        init_scale: float = 1.0,
        tune_scales: bool = True,
        entropy_weight: float = 1e-3,
        shared: bool | PyTree = False,
        encoding: str = "identity",
        sampler: Callable = minibatches,
    ):
        if not isinstance(model, nnx.Module):
            raise TypeError(f"model must be a flax.nnx.Module, got {type(model).__name__}")
        for name, fn in (("inner_loss", inner_loss), ("outer_loss", outer_loss)):
            if not callable(fn):
                raise TypeError(f"{name} must be callable, got {fn!r}")
        for name, tx in (
            ("inner_optimizer", inner_optimizer),
            ("outer_optimizer", outer_optimizer),
        ):
            if not isinstance(tx, optax.GradientTransformation):
                raise TypeError(f"{name} must be an optax.GradientTransformation, got {tx!r}")
        if not isinstance(method, StnMethod):
            raise TypeError(
                f"method must be a bilevel.stn method (stn.STN() or stn.DeltaSTN()), got {method!r}"
            )
        if encoding not in ("identity", "mip"):
            raise ValueError(f'encoding must be "identity" or "mip", got {encoding!r}')
        if not callable(sampler):
            raise TypeError(
                "sampler must be callable as sampler(data, key, step, batch_size, num) "
                f"(bilevel.minibatches or bilevel.epoch_minibatches), got {sampler!r}"
            )
        self.sampler = sampler
        if not isinstance(tune_scales, bool | np.bool_):
            raise TypeError(f"tune_scales must be a bool, got {tune_scales!r}")
        self.inner_steps = checks.integer("inner_steps", inner_steps)
        self.outer_steps = checks.integer("outer_steps", outer_steps)
        self.init_scale = checks.number("init_scale", init_scale, low=0.0, low_open=True)
        self.entropy_weight = checks.number("entropy_weight", entropy_weight, low=0.0)
        self._step_jit = jax.jit(self._step_impl)

        self.space = space
        self._u0 = hp.init(space)  # validates the space
        flat, self._unravel = ravel_pytree(self._u0)
        self.num_hparams = int(flat.size)
        self.num_features = self.num_hparams * (2 if encoding == "mip" else 1)
        self._shared = self._shared_mask(shared)
        self._names = tuple(space) if isinstance(space, dict) else None

        layers = stn_layers(model)
        graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
        if not jax.tree.leaves(nnx.state(model, ResponseParam)):
            raise ValueError(
                "model has no response weights (bilevel.stn.ResponseParam): build it from "
                "StnLinear / StnConv layers"
            )
        bad = [
            f"{'.'.join(map(str, p)) or '<root>'} (num_hparams={layer.num_hparams})"
            for p, layer in layers
            if layer.num_hparams != self.num_features
        ]
        if bad:
            raise ValueError(
                f"the space has {self.num_hparams} hyperparameter(s), so with encoding="
                f"{encoding!r} the layers need num_hparams={self.num_features}; mismatched: "
                + ", ".join(bad)
            )
        self._graphdef, self._params0, self._model_state0 = graphdef, params, model_state
        self.inner_loss, self.outer_loss = inner_loss, outer_loss
        self.inner_optimizer = optax.with_extra_args_support(inner_optimizer)
        self.outer_optimizer = optax.with_extra_args_support(outer_optimizer)
        self.method = method
        self.tune_scales = bool(tune_scales)
        self.encoding = encoding
        self._warned_unused = False

    def _shared_mask(self, shared) -> np.ndarray:
        if isinstance(shared, bool | np.bool_):
            return np.full(self.num_hparams, bool(shared))
        leaves, treedef = jax.tree.flatten(
            self.space, is_leaf=lambda x: isinstance(x, hp.Hyperparameter)
        )
        try:
            flags = treedef.flatten_up_to(shared)
        except (ValueError, TypeError) as e:
            raise ValueError(f"shared must be a bool or match the space's structure: {e}") from None
        out = []
        for spec, flag in zip(leaves, flags, strict=True):
            if not isinstance(flag, bool | np.bool_):
                raise TypeError(f"shared entries must be Python bools, got {flag!r}")
            out.append(np.full(int(np.prod(spec.shape)), bool(flag)))
        return np.concatenate(out)

    # ------------------------------------------------------------------ public API

    def init(
        self,
        params: PyTree | None = None,
        hparams: PyTree | None = None,
        key: jax.Array | None = None,
    ) -> TrainerState:
        """The initial state.

        Args:
          params: optional ``nnx.State`` of the model's ``nnx.Param`` (default: the model's).
          hparams: optional **unconstrained** hyperparameters (default: the space's initial
            values); pass one per member under ``jax.vmap`` to train a population.
          key: PRNG key of the run (default ``jax.random.key(0)``); a legacy ``uint32`` key
            (``jax.random.PRNGKey``) is wrapped into a typed one.

        Returns:
          A :class:`TrainerState`.
        """
        if hparams is None:
            u = self._u0
        else:
            hp.constrain(self.space, hparams)  # structure and shape check
            u = jax.tree.map(lambda a, ref: jnp.asarray(a, ref.dtype), hparams, self._u0)
        params = self._params0 if params is None else params
        if jax.tree.structure(params) != jax.tree.structure(self._params0):
            raise ValueError("params does not match the model's nnx.Param state")
        rho = jax.tree.map(
            lambda a: jnp.full(jnp.shape(a), scale_to_param(self.init_scale), jnp.result_type(a)), u
        )
        zero = jnp.asarray(0, jnp.int32)
        return TrainerState(
            params=params,
            model_state=self._model_state0,
            inner_state=self.inner_optimizer.init(params),
            hparams=u,
            scale=rho,
            outer_state=self.outer_optimizer.init((u, rho)),
            step=zero,
            skipped=zero,
            inner_skipped=zero,
            key=_typed_key(key),
        )

    def hparams(self, state: TrainerState) -> PyTree:
        """Constrained (unperturbed) hyperparameter values of ``state``."""
        return hp.constrain(self.space, state.hparams)

    def params(self, state: TrainerState) -> PyTree:
        """Every ``nnx.Param`` of the model in ``state`` (an ``nnx.State``)."""
        return state.params

    def scales(self, state: TrainerState) -> PyTree:
        """Perturbation scales ``sigma`` (unconstrained units), the space's structure."""
        return jax.tree.map(scale_from_param, state.scale)

    def hnet(self, state: TrainerState) -> jax.Array:
        """Features of the unperturbed hyperparameters, ``(num_features,)``: feed these to the
        network to evaluate it at the current hyperparameters (zeros for Delta-STN)."""
        uf = ravel_pytree(state.hparams)[0]
        return self.method.features(self._encode, uf, uf)

    def model(self, state: TrainerState) -> nnx.Module:
        """The NNX model with the weights of ``state`` (a fresh copy)."""
        return nnx.merge(self._graphdef, state.params, state.model_state, copy=True)

    def update_model(self, model: nnx.Module, state: TrainerState) -> nnx.Module:
        """Write the weights and model state of ``state`` into ``model`` in place (returns it).

        ``model`` is the network given to the trainer (or one of the same structure); after the
        call it evaluates like :meth:`model` ``(state)``. Evaluate it at the tuned
        hyperparameters with ``hnet = trainer.hnet(state)``.
        """
        if not isinstance(model, nnx.Module):
            raise TypeError(f"model must be a flax.nnx.Module, got {type(model).__name__}")
        nnx.update(model, state.params, state.model_state)
        return model

    def warmup(self, state: TrainerState, inner_batches: PyTree) -> tuple[TrainerState, dict]:
        """Inner steps only (perturbed hyperparameters, no hyper step), e.g. before tuning starts.

        Args:
          state: current state.
          inner_batches: pytree whose leaves have a leading axis of length ``K >= 1`` (one
            batch per step).

        Returns:
          ``(state, metrics)`` with ``inner_loss`` (mean over the applied steps), ``skipped`` and
          ``inner_skipped`` (cumulative).
        """
        k = self._num_batches(inner_batches, None, "inner_batches")
        keys = jax.random.split(self._cycle_key(state), k)
        inner = self._inner(state, inner_batches, keys, _Reads(self._names))
        state = state._replace(
            params=inner.params,
            model_state=inner.model_state,
            inner_state=inner.inner_state,
            step=state.step + 1,
            inner_skipped=inner.skipped,
        )
        return state, {
            "inner_loss": _masked_mean(inner.losses, inner.applied),
            "skipped": state.skipped,
            "inner_skipped": state.inner_skipped,
        }

    def step(
        self, state: TrainerState, inner_batches: PyTree, outer_batches: PyTree
    ) -> tuple[TrainerState, dict]:
        """One cycle: ``inner_steps`` inner steps, then ``outer_steps`` hyper steps (jitted).

        Jitted inside (compose freely with an outer ``jax.jit`` / ``jax.vmap``).

        Args:
          state: current state.
          inner_batches: leaves with a leading axis of length ``inner_steps``.
          outer_batches: leaves with a leading axis of length ``outer_steps``.

        Returns:
          ``(state, metrics)``; metrics (the names of :class:`bilevel.BilevelOptimizer`):
          ``inner_loss`` / ``outer_loss`` (means over the applied steps of the cycle),
          ``hparams`` (after the cycle), ``hypergrad`` (gradient of the last hyper step w.r.t.
          ``u``) and ``hypergrad_norm``, ``skipped`` / ``inner_skipped`` (cumulative counts),
          ``status`` (int32 :class:`solvers.Status`: ``SUCCESS``, or ``NONFINITE`` when the
          cycle's last hyper step was skipped); STN-specific: ``entropy`` (of the perturbation)
          and ``scales``.
        """
        self._num_batches(inner_batches, self.inner_steps, "inner_batches")
        self._num_batches(outer_batches, self.outer_steps, "outer_batches")
        return self._step_jit(state, inner_batches, outer_batches)

    def _step_impl(self, state, inner_batches, outer_batches):
        keys = jax.random.split(self._cycle_key(state), self.inner_steps + self.outer_steps)
        reads = _Reads(self._names)
        inner = self._inner(state, inner_batches, keys[: self.inner_steps], reads)
        u, rho, outer_state, skipped, (o_losses, ents, o_applied, grads_u) = self._outer(
            state, inner, outer_batches, keys[self.inner_steps :], reads
        )
        self._warn_unused(reads)
        state = TrainerState(
            params=inner.params,
            model_state=inner.model_state,
            inner_state=inner.inner_state,
            hparams=u,
            scale=rho,
            outer_state=outer_state,
            step=state.step + 1,
            skipped=skipped,
            inner_skipped=inner.skipped,
            key=state.key,
        )
        hypergrad = jax.tree.map(lambda g: g[-1], grads_u)
        status = jnp.where(o_applied[-1], solvers.Status.SUCCESS, solvers.Status.NONFINITE)
        metrics = {
            "inner_loss": _masked_mean(inner.losses, inner.applied),
            "outer_loss": _masked_mean(o_losses, o_applied),
            "hparams": self.hparams(state),
            "hypergrad": hypergrad,
            "hypergrad_norm": T.tree_norm(hypergrad),
            "skipped": state.skipped,
            "inner_skipped": state.inner_skipped,
            "status": status.astype(jnp.int32),
            "entropy": ents[-1],
            "scales": self.scales(state),
        }
        return state, metrics

    def sample_batches(
        self,
        state: TrainerState,
        inner_data: PyTree,
        outer_data: PyTree,
        batch_size: int,
        outer_batch_size: int | None = None,
    ) -> tuple[PyTree, PyTree]:
        """The minibatches of the next :meth:`step`, a pure function of ``(state.key, state.step)``.

        Drawn with the trainer's ``sampler`` (:func:`bilevel.minibatches` by default) from the
        full datasets (pytrees of arrays with a leading example axis), so a resumed run replays
        the same data order.

        Args:
          state: current state.
          inner_data: the training set.
          outer_data: the validation set.
          batch_size: examples per inner batch.
          outer_batch_size: examples per outer batch (default ``batch_size``).

        Returns:
          ``(inner_batches, outer_batches)`` shaped for :meth:`step`.
        """
        batch_size = checks.integer("batch_size", batch_size)
        obs = checks.optional_integer("outer_batch_size", outer_batch_size)
        obs = batch_size if obs is None else obs
        for name, data in (("inner_data", inner_data), ("outer_data", outer_data)):
            if data is None or not jax.tree.leaves(data):
                raise ValueError(f"{name} is {data!r}: it must be a pytree of arrays (a dataset)")
        inner = self.sampler(
            inner_data,
            jax.random.fold_in(state.key, _INNER_DATA),
            state.step,
            batch_size,
            self.inner_steps,
        )
        outer = self.sampler(
            outer_data,
            jax.random.fold_in(state.key, _OUTER_DATA),
            state.step,
            obs,
            self.outer_steps,
        )
        return inner, outer

    def fit(
        self, state: TrainerState, inner_data: PyTree, outer_data: PyTree, **kwargs: Any
    ) -> tuple[TrainerState, dict[str, np.ndarray]]:
        """:func:`bilevel.fit` on this trainer: ``fit(self, state, inner_data, outer_data, **kw)``.

        Keyword arguments: ``steps``, ``batch_size``, ``outer_batch_size``, ``warmup_steps``,
        ``chunk``, ``callbacks``, ``checkpoint_dir``, ``checkpoint_every``, ``resume``,
        ``progress``, ``desc``, ``log_dir`` (per-step ``metrics.jsonl``), ``tensorboard``.

        Returns:
          ``(state, history)``; ``history`` has ``"step"``, ``"inner_loss"``, ``"outer_loss"``,
          ``"hparams/<name>"``, ``"scales/<name>"``, ... with one row per (non-warm-up) step.
        """
        return _fit(self, state, inner_data, outer_data, **kwargs)

    # ------------------------------------------------------------------ internals

    def _num_batches(self, batches, expected, name):
        if batches is None:
            raise ValueError(
                f"{name} is None: pass a pytree of arrays with a leading steps axis "
                f"({'K' if expected is None else expected}) and an example axis, e.g. from "
                "sample_batches"
            )
        leaves = jax.tree.leaves(batches)
        if not leaves:
            raise ValueError(f"{name} is empty: {batches!r}")
        n = jnp.shape(leaves[0])[0] if jnp.ndim(leaves[0]) else None
        if n is None or any(jnp.ndim(a) < 2 or jnp.shape(a)[0] != n for a in leaves):
            raise ValueError(
                f"{name}: every leaf needs a leading steps axis and an example axis, got "
                f"{jax.tree.map(jnp.shape, batches)}"
            )
        if expected is not None and n != expected:
            raise ValueError(f"{name} has {n} batches on its leading axis, expected {expected}")
        return n

    def _cycle_key(self, state):
        return jax.random.fold_in(jax.random.fold_in(state.key, _NOISE), state.step)

    def _encode(self, a):
        return mip_encoding(jax.nn.sigmoid(a)) if self.encoding == "mip" else a

    def _values(self, ut):
        return jax.vmap(lambda a: hp.constrain(self.space, self._unravel(a)))(ut)

    def _hparams_at(self, ut, uf, reads):
        return StnHparams(
            self._values(ut), self.method.features(self._encode, ut, uf), False, reads
        )

    def _perturbed(self, u, rho, key, batch_size, reads):
        uf = ravel_pytree(u)[0]
        sf = scale_from_param(ravel_pytree(rho)[0])
        return self._hparams_at(perturb(key, uf, sf, batch_size, shared=self._shared), uf, reads)

    def _center(self, u, batch_size, reads):
        uf = ravel_pytree(u)[0]
        return self._hparams_at(jnp.broadcast_to(uf, (batch_size, uf.shape[0])), uf, reads)

    def _call(self, name, signature, fn, *args):
        try:
            value = fn(*args)
        except UnknownHyperparameterError as e:
            raise KeyError(f"{name} asked for {e.args[0]}") from None
        return _check_loss(value, name, signature)

    def _inner(self, state, batches, keys, reads) -> _Inner:
        u, rho = state.hparams, state.scale

        def body(carry, xs):
            params, model_state, inner_state, skipped = carry
            batch, key = xs
            bsz = _batch_size(batch, "inner_batches")
            k_eps, k_loss = jax.random.split(key)

            def loss(p, h):
                model = nnx.merge(self._graphdef, p, jax.lax.stop_gradient(model_state))
                value = self._call(
                    "inner_loss",
                    "inner_loss(model, h, batch, key)",
                    self.inner_loss,
                    model,
                    h,
                    batch,
                    k_loss,
                )
                return value, jax.lax.stop_gradient(nnx.state(model, nnx.Not(nnx.Param)))

            value, new_model_state, grads = self.method.inner_value_and_grad(
                loss,
                params,
                self._perturbed(u, rho, k_eps, bsz, reads),
                self._center(u, bsz, reads),
            )
            updates, new_inner_state = self.inner_optimizer.update(
                grads, inner_state, params, value=value, grad=grads
            )
            new_params = optax.apply_updates(params, updates)
            g = solvers.guard(
                (params, model_state, inner_state),
                (new_params, new_model_state, new_inner_state),
                skipped,
                also=(value, grads),
            )
            return (*g.value, g.skipped), (value, g.applied)

        (params, model_state, inner_state, skipped), (losses, applied) = jax.lax.scan(
            body,
            (state.params, state.model_state, state.inner_state, state.inner_skipped),
            (batches, keys),
        )
        return _Inner(params, model_state, inner_state, losses, applied, skipped)

    def _outer(self, state, inner, batches, keys, reads):
        def objective(hyper, batch, key):
            u, rho = hyper
            h = self._perturbed(u, rho, key, _batch_size(batch, "outer_batches"), reads)
            # The state after the inner steps; what the outer loss does to it is discarded.
            model = nnx.merge(
                self._graphdef, inner.params, jax.lax.stop_gradient(inner.model_state)
            )
            value = self._call(
                "outer_loss", "outer_loss(model, h, batch)", self.outer_loss, model, h, batch
            )
            ent = entropy(scale_from_param(ravel_pytree(rho)[0]))
            return value - self.entropy_weight * ent, (value, ent)

        def body(carry, xs):
            u, rho, outer_state, skipped = carry
            batch, key = xs
            (total, (value, ent)), (g_u, g_rho) = jax.value_and_grad(objective, has_aux=True)(
                (u, rho), batch, key
            )
            if not self.tune_scales:
                g_rho = T.tree_zeros_like(g_rho)
            updates, new_outer_state = self.outer_optimizer.update(
                (g_u, g_rho), outer_state, (u, rho), value=total, grad=(g_u, g_rho)
            )
            if not self.tune_scales:
                updates = (updates[0], T.tree_zeros_like(updates[1]))
            new_u, new_rho = optax.apply_updates((u, rho), updates)
            g = solvers.guard(
                (u, rho, outer_state),
                (new_u, new_rho, new_outer_state),
                skipped,
                also=(
                    total,
                    (g_u, g_rho),
                    hp.constrain(self.space, new_u),
                    jax.tree.map(scale_from_param, new_rho),
                ),
            )
            return (*g.value, g.skipped), (value, ent, g.applied, g_u)

        (u, rho, outer_state, skipped), outs = jax.lax.scan(
            body, (state.hparams, state.scale, state.outer_state, state.skipped), (batches, keys)
        )
        return u, rho, outer_state, skipped, outs

    def _warn_unused(self, reads):
        if self._warned_unused or reads.names is None or reads.everything:
            return
        unused = [n for n in reads.names if n not in reads.used]
        if unused:
            self._warned_unused = True
            warnings.warn(
                f"STN hyperparameter(s) {unused} are read by neither inner_loss nor outer_loss "
                "(as h[name]); they are still perturbed and fed to the network through hnet, so "
                "they drift without meaning: use them in a loss or remove them from the space",
                UserWarning,
                stacklevel=3,
            )


def _batch_size(batch, name) -> int:
    leaves = jax.tree.leaves(batch)
    if not leaves or jnp.ndim(leaves[0]) == 0:
        raise ValueError(f"{name}: a batch needs at least one array with a leading example axis")
    return int(jnp.shape(leaves[0])[0])
