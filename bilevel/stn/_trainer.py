r"""The STN / Delta-STN trainer: best-response steps alternating with hyper steps.

Notation: ``u`` the unconstrained hyperparameters (:mod:`bilevel.hparams`), ``sigma`` the learned
perturbation scales, :math:`\tilde u = u + \sigma\varepsilon` per example, ``hnet`` the features fed
to the best-response layers, :math:`\theta` the general weights (``nnx.Param``) and
:math:`\psi` the response weights (:class:`bilevel.stn.ResponseParam`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.flatten_util import ravel_pytree

from bilevel import hparams as hp
from bilevel._bilevel import _check_scalar
from bilevel._utils import minibatches
from bilevel.stn._layers import ResponseParam, mip_encoding, stn_layers
from bilevel.stn._perturb import entropy, perturb, scale_from_param, scale_to_param
from solvers import tree as T

__all__ = ["StnHparams", "Trainer", "TrainerState"]

PyTree = Any

_NOISE, _TRAIN_DATA, _VAL_DATA = 0x5354, 1, 2
_GENERAL = nnx.All(nnx.Param, nnx.Not(ResponseParam))


@jax.tree_util.register_pytree_node_class
class StnHparams:
    """What the loss functions receive as hyperparameters: per-example values and ``hnet``.

    Attributes:
      values: constrained hyperparameter values, the space's structure with a leading example
        axis on every leaf (``h["dropout"]`` is short for ``h.values["dropout"]``).
      hnet: features for the best-response layers, shape ``(batch, num_features)``.
      linearize: Delta-STN linearization is on: :meth:`apply` returns the first-order Taylor
        expansion of the network in ``hnet``.
    """

    def __init__(self, values: PyTree, hnet: jax.Array, linearize: bool = False):
        self.values = values
        self.hnet = hnet
        self.linearize = linearize

    def __getitem__(self, name):
        return self.values[name]

    def apply(self, fn: Callable, *args, **kwargs):
        r"""``fn(*args, hnet, **kwargs)``; linearized in ``hnet`` when :attr:`linearize` is set.

        .. math:: f(x, \mathrm{hnet}) \approx f(x, 0) + \partial_{\mathrm{hnet}} f(x, 0)\,
           \mathrm{hnet}

        Write the forward pass of the training loss as ``h.apply(model, x)`` (rather than
        ``model(x, h.hnet)``) to support ``Trainer(..., variant="delta", linearize=True)``.
        """
        if not self.linearize:
            return fn(*args, self.hnet, **kwargs)
        zero = jnp.zeros_like(self.hnet)
        out, tangent = jax.jvp(lambda z: fn(*args, z, **kwargs), (zero,), (self.hnet,))
        return jax.tree.map(jnp.add, out, tangent)

    def tree_flatten(self):
        return (self.values, self.hnet), self.linearize

    @classmethod
    def tree_unflatten(cls, linearize, children):
        return cls(*children, linearize=linearize)

    def __repr__(self):
        return (
            f"StnHparams(values={jax.tree.map(jnp.shape, self.values)}, "
            f"hnet={jnp.shape(self.hnet)}, linearize={self.linearize})"
        )


class TrainerState(NamedTuple):
    """State of :class:`Trainer` (a pytree of arrays: jit, vmap and checkpoint it).

    Attributes:
      params: every ``nnx.Param`` of the model (general and response weights), an ``nnx.State``.
      rest: the model's other state (batch statistics, RNG counters), an ``nnx.State``.
      opt_state: state of ``optimizer`` (over ``params``).
      hparams: unconstrained hyperparameters ``u`` (the space's structure).
      scale: unconstrained perturbation scales ``rho``, ``sigma = softplus(rho)`` (same structure).
      hyper_opt_state: state of ``hyper_optimizer`` (over ``(hparams, scale)``).
      step: calls of ``warmup`` / ``step`` so far (int32); with ``key`` it fixes the data order
        and the noise of the next call.
      train_skipped: train steps skipped because of a non-finite loss or gradient (int32).
      val_skipped: hyper steps skipped likewise (int32).
      key: PRNG key of the run (the trainer derives its noise from ``fold_in(key, ...)``).
    """

    params: PyTree
    rest: PyTree
    opt_state: PyTree
    hparams: PyTree
    scale: PyTree
    hyper_opt_state: PyTree
    step: jax.Array
    train_skipped: jax.Array
    val_skipped: jax.Array
    key: jax.Array


def _check_int(name, value, low=1):
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


class Trainer:
    r"""Self-Tuning Network trainer: alternate best-response steps and hyper steps.

    One :meth:`step` (a cycle) runs ``train_steps`` steps of ``optimizer`` on the network weights
    at perturbed hyperparameters, then ``val_steps`` steps of ``hyper_optimizer`` on the
    hyperparameters and perturbation scales along the validation loss through the best response:

    .. math::
       \phi &\leftarrow \phi - \alpha \nabla_\phi\,
          \mathbb E_{\varepsilon}\, L_T\big(w_\phi(\tilde u), c(\tilde u)\big),
          \qquad \tilde u = u + \sigma\varepsilon \\
       (u, \rho) &\leftarrow (u, \rho) - \beta \nabla_{u,\rho}\Big(
          \mathbb E_{\varepsilon}\, L_V\big(w_\phi(\tilde u)\big) - \tau\, H[\mathcal N(u,\sigma^2)]
          \Big), \qquad \sigma = \mathrm{softplus}(\rho)

    ``optimizer`` updates every ``nnx.Param`` of the model (general weights ``W_e, b_e`` and the
    :class:`~bilevel.stn.ResponseParam` weights ``W_r, b_r, V``); ``hyper_optimizer`` updates the
    unconstrained hyperparameters ``u`` and the scale parameters ``rho`` (``rho`` stays fixed
    when ``tune_scales=False``). The hypergradient reaches hyperparameters the training loss
    cannot be differentiated by (dropout, augmentation) through ``hnet``, the response layers'
    input; ``val_loss`` should use the network without regularizers or augmentation.

    Variants:

    - ``"stn"`` (MacKay et al., ICLR 2019): ``hnet`` is :math:`\tilde u` (``encoding="identity"``);
      all weights are trained at the perturbed hyperparameters.
    - ``"delta"`` (Delta-STN, Bae and Grosse, NeurIPS 2020): centred
      :math:`\mathrm{hnet} = \tilde u - \mathrm{stop\_gradient}(u)`; the general weights are
      trained at the unperturbed hyperparameters (``hnet = 0``), the response weights at the
      perturbed ones; with ``linearize=True`` the network is replaced by its first-order
      expansion in ``hnet`` (``jax.jvp``) for the response step, see :meth:`StnHparams.apply`.

    Losses: ``train_loss(model, h, batch, key) -> scalar`` and ``val_loss(model, h, batch) ->
    scalar``, ``model`` the merged NNX model, ``h`` a :class:`StnHparams` (``h["name"]`` the
    constrained per-example values, ``h.hnet`` the features to feed the layers:
    ``model(x, h.hnet)``), ``key`` a fresh PRNG key for dropout/augmentation. The example axis of
    each batch is the leading axis of its first leaf. Non-finite steps are skipped and counted.

    Args:
      model: an ``nnx.Module`` with best-response layers (some :class:`ResponseParam`).
      space: hyperparameter space (pytree of :mod:`bilevel.hparams` specs).
      train_loss: training loss (with regularizers/augmentation driven by ``h``).
      val_loss: validation loss.
      optimizer: Optax transformation for the network weights.
      hyper_optimizer: Optax transformation for ``(u, rho)``.
      train_steps: train steps per cycle (``>= 1``).
      val_steps: hyper steps per cycle (``>= 1``).
      init_scale: initial perturbation scale ``sigma`` (in unconstrained units, ``> 0``).
      tune_scales: learn ``sigma`` in the hyper steps.
      entropy_weight: ``tau >= 0``, weight of the entropy bonus.
      variant: ``"stn"`` or ``"delta"``.
      shared: ``True`` / ``False`` or a pytree of bools matching ``space``: perturb these
        hyperparameters once per batch instead of once per example.
      encoding: ``"identity"`` (``hnet`` in unconstrained units) or ``"mip"``
        (:func:`~bilevel.stn.mip_encoding` of ``sigmoid(u)``, twice as many features).
      linearize: Delta-STN linearization (``variant="delta"`` only).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from flax import nnx
      >>> from bilevel import hparams, stn
      >>> X, y = jax.random.normal(jax.random.key(0), (32, 4)), jnp.ones((32, 1))
      >>> def train_loss(m, h, b, key):
      ...     err = jnp.mean((m(b[0], h.hnet) - b[1]) ** 2)
      ...     return err + jnp.mean(h["wd"] * stn.effective_l2(m, h.hnet))
      >>> val_loss = lambda m, h, b: jnp.mean((m(b[0], h.hnet) - b[1]) ** 2)
      >>> trainer = stn.Trainer(stn.StnLinear(4, 1, 1, rngs=nnx.Rngs(0)),
      ...     {"wd": hparams.log(0.1)}, train_loss, val_loss,
      ...     optimizer=optax.adam(1e-2), hyper_optimizer=optax.adam(1e-2))
      >>> state = trainer.init(jax.random.key(1))
      >>> batches = jax.tree.map(lambda a: jnp.stack([a] * 5), (X, y))
      >>> state, metrics = jax.jit(trainer.step)(state, batches, (X[None], y[None]))
      >>> int(state.step), trainer.hparams(state)["wd"].shape
      (1, ())

    References: MacKay, Vicol, Lorraine, Duvenaud and Grosse, "Self-Tuning Networks", ICLR 2019;
    Bae and Grosse, "Delta-STN: Efficient Bilevel Optimization for Neural Networks using
    Structured Response Jacobians", NeurIPS 2020.
    """

    def __init__(
        self,
        model: nnx.Module,
        space: PyTree,
        train_loss: Callable,
        val_loss: Callable,
        *,
        optimizer: optax.GradientTransformation,
        hyper_optimizer: optax.GradientTransformation,
        train_steps: int = 5,
        val_steps: int = 1,
        init_scale: float = 1.0,
        tune_scales: bool = True,
        entropy_weight: float = 1e-3,
        variant: str = "stn",
        shared: bool | PyTree = False,
        encoding: str = "identity",
        linearize: bool = False,
    ):
        if not isinstance(model, nnx.Module):
            raise TypeError(f"model must be a flax.nnx.Module, got {type(model).__name__}")
        for name, fn in (("train_loss", train_loss), ("val_loss", val_loss)):
            if not callable(fn):
                raise TypeError(f"{name} must be callable, got {fn!r}")
        for name, tx in (("optimizer", optimizer), ("hyper_optimizer", hyper_optimizer)):
            if not isinstance(tx, optax.GradientTransformation):
                raise TypeError(f"{name} must be an optax.GradientTransformation, got {tx!r}")
        if variant not in ("stn", "delta"):
            raise ValueError(f'variant must be "stn" or "delta", got {variant!r}')
        if encoding not in ("identity", "mip"):
            raise ValueError(f'encoding must be "identity" or "mip", got {encoding!r}')
        if linearize and variant != "delta":
            raise ValueError('linearize=True is the Delta-STN linearization: use variant="delta"')
        self.train_steps = _check_int("train_steps", train_steps)
        self.val_steps = _check_int("val_steps", val_steps)
        if not (
            isinstance(init_scale, int | float) and math.isfinite(init_scale) and init_scale > 0
        ):
            raise ValueError(f"init_scale must be a finite number > 0, got {init_scale!r}")
        if not (
            isinstance(entropy_weight, int | float)
            and math.isfinite(entropy_weight)
            and entropy_weight >= 0
        ):
            raise ValueError(f"entropy_weight must be a finite number >= 0, got {entropy_weight!r}")

        self.space = space
        self._u0 = hp.init(space)  # validates the space
        flat, self._unravel = ravel_pytree(self._u0)
        self.num_hparams = int(flat.size)
        self.num_features = self.num_hparams * (2 if encoding == "mip" else 1)
        self._shared = self._shared_mask(shared)

        layers = stn_layers(model)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
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
        self._graphdef, self._params0, self._rest0 = graphdef, params, rest
        self.train_loss, self.val_loss = train_loss, val_loss
        self.optimizer = optax.with_extra_args_support(optimizer)
        self.hyper_optimizer = optax.with_extra_args_support(hyper_optimizer)
        self.init_scale = float(init_scale)
        self.tune_scales = bool(tune_scales)
        self.entropy_weight = float(entropy_weight)
        self.variant = variant
        self.encoding = encoding
        self.linearize = bool(linearize)
        self._fit_runners: dict = {}  # jitted chunks of fit(), per batch size

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
        key: jax.Array | None = None,
        hparams: PyTree | None = None,
        params: PyTree | None = None,
    ) -> TrainerState:
        """The initial state.

        Args:
          key: PRNG key of the run (default ``jax.random.key(0)``).
          hparams: optional **unconstrained** hyperparameters (default: the space's initial
            values); pass one per member under ``jax.vmap`` to train a population.
          params: optional ``nnx.State`` of the model's ``nnx.Param`` (default: the model's).

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
        key = jax.random.key(0) if key is None else key
        zero = jnp.asarray(0, jnp.int32)
        return TrainerState(
            params=params,
            rest=self._rest0,
            opt_state=self.optimizer.init(params),
            hparams=u,
            scale=rho,
            hyper_opt_state=self.hyper_optimizer.init((u, rho)),
            step=zero,
            train_skipped=zero,
            val_skipped=zero,
            key=key,
        )

    def hparams(self, state: TrainerState) -> PyTree:
        """Constrained (unperturbed) hyperparameter values of ``state``."""
        return hp.constrain(self.space, state.hparams)

    def scales(self, state: TrainerState) -> PyTree:
        """Perturbation scales ``sigma`` (unconstrained units), the space's structure."""
        return jax.tree.map(scale_from_param, state.scale)

    def hnet(self, state: TrainerState) -> jax.Array:
        """Features of the unperturbed hyperparameters, ``(num_features,)``: feed these to the
        network to evaluate it at the current hyperparameters (zeros for Delta-STN)."""
        uf = ravel_pytree(state.hparams)[0]
        return self._features(uf, uf)

    def model(self, state: TrainerState) -> nnx.Module:
        """The NNX model with the weights of ``state`` (a fresh copy)."""
        return nnx.merge(self._graphdef, state.params, state.rest, copy=True)

    def warmup(self, state: TrainerState, train_batches: PyTree) -> tuple[TrainerState, dict]:
        """Train steps only (perturbed hyperparameters, no hyper step), e.g. before tuning starts.

        Args:
          state: current state.
          train_batches: pytree whose leaves have a leading axis of length ``K >= 1`` (one
            batch per step).

        Returns:
          ``(state, metrics)`` with ``train_loss`` (mean over the finite steps) and
          ``train_skipped`` (cumulative).
        """
        k = self._num_batches(train_batches, None, "train_batches")
        keys = jax.random.split(self._cycle_key(state), k)
        params, rest, opt_state, losses, oks = self._train(state, train_batches, keys)
        state = state._replace(
            params=params,
            rest=rest,
            opt_state=opt_state,
            step=state.step + 1,
            train_skipped=state.train_skipped + jnp.sum(~oks).astype(jnp.int32),
        )
        return state, {
            "train_loss": _masked_mean(losses, oks),
            "train_skipped": state.train_skipped,
        }

    def step(
        self, state: TrainerState, train_batches: PyTree, val_batches: PyTree
    ) -> tuple[TrainerState, dict]:
        """One cycle: ``train_steps`` train steps, then ``val_steps`` hyper steps.

        Args:
          state: current state.
          train_batches: leaves with a leading axis of length ``train_steps``.
          val_batches: leaves with a leading axis of length ``val_steps``.

        Returns:
          ``(state, metrics)``; metrics: ``train_loss`` / ``val_loss`` (means over the finite
          steps of the cycle), ``entropy`` (of the perturbation), ``hparams`` and ``scales``
          (after the cycle), ``train_skipped`` / ``val_skipped`` (cumulative counts).
        """
        self._num_batches(train_batches, self.train_steps, "train_batches")
        self._num_batches(val_batches, self.val_steps, "val_batches")
        keys = jax.random.split(self._cycle_key(state), self.train_steps + self.val_steps)
        params, rest, opt_state, t_losses, t_oks = self._train(
            state, train_batches, keys[: self.train_steps]
        )

        def hyper_body(carry, xs):
            u, rho, hstate = carry
            batch, key = xs
            (total, (value, ent)), grads = jax.value_and_grad(self._hyper_objective, has_aux=True)(
                (u, rho), params, rest, batch, key
            )
            g_u, g_rho = grads
            if not self.tune_scales:
                g_rho = jax.tree.map(jnp.zeros_like, g_rho)
            updates, new_hstate = self.hyper_optimizer.update(
                (g_u, g_rho), hstate, (u, rho), value=total, grad=(g_u, g_rho)
            )
            if not self.tune_scales:
                updates = (updates[0], jax.tree.map(jnp.zeros_like, updates[1]))
            new_u, new_rho = optax.apply_updates((u, rho), updates)
            ok = (
                jnp.isfinite(total)
                & T.tree_all_finite((g_u, g_rho))
                & T.tree_all_finite((new_u, new_rho))
            )
            carry = T.tree_select(ok, (new_u, new_rho, new_hstate), (u, rho, hstate))
            return carry, (value, ent, ok)

        (u, rho, hstate), (v_losses, ents, v_oks) = jax.lax.scan(
            hyper_body,
            (state.hparams, state.scale, state.hyper_opt_state),
            (val_batches, keys[self.train_steps :]),
        )
        state = TrainerState(
            params=params,
            rest=rest,
            opt_state=opt_state,
            hparams=u,
            scale=rho,
            hyper_opt_state=hstate,
            step=state.step + 1,
            train_skipped=state.train_skipped + jnp.sum(~t_oks).astype(jnp.int32),
            val_skipped=state.val_skipped + jnp.sum(~v_oks).astype(jnp.int32),
            key=state.key,
        )
        metrics = {
            "train_loss": _masked_mean(t_losses, t_oks),
            "val_loss": _masked_mean(v_losses, v_oks),
            "entropy": ents[-1],
            "hparams": self.hparams(state),
            "scales": self.scales(state),
            "train_skipped": state.train_skipped,
            "val_skipped": state.val_skipped,
        }
        return state, metrics

    def sample_batches(
        self,
        state: TrainerState,
        train_data: PyTree,
        val_data: PyTree,
        batch_size: int,
        val_batch_size: int | None = None,
    ) -> tuple[PyTree, PyTree]:
        """The minibatches of the next :meth:`step`, a pure function of ``(state.key, state.step)``.

        Drawn with :func:`bilevel.minibatches` from the full datasets (pytrees of arrays with a
        leading example axis), so a resumed run replays the same data order.

        Returns:
          ``(train_batches, val_batches)`` shaped for :meth:`step`.
        """
        vbs = batch_size if val_batch_size is None else val_batch_size
        train = minibatches(
            train_data,
            jax.random.fold_in(state.key, _TRAIN_DATA),
            state.step,
            batch_size,
            self.train_steps,
        )
        val = minibatches(
            val_data, jax.random.fold_in(state.key, _VAL_DATA), state.step, vbs, self.val_steps
        )
        return train, val

    def fit(
        self,
        state: TrainerState,
        train_data: PyTree,
        val_data: PyTree,
        *,
        cycles: int,
        batch_size: int,
        val_batch_size: int | None = None,
        warmup_cycles: int = 0,
        chunk: int = 10,
        callback: Callable[[int], Any] | None = None,
    ) -> tuple[TrainerState, dict[str, np.ndarray]]:
        """Run ``warmup_cycles`` warm-up cycles then ``cycles`` cycles, recording the schedule.

        Batches come from :meth:`sample_batches`; ``chunk`` cycles run per jitted call (a
        ``lax.scan``). ``callback(cycles_done)`` is called after every chunk (progress bars).

        Returns:
          ``(state, history)``: ``history`` maps ``"step"``, ``"train_loss"``, ``"val_loss"``,
          ``"entropy"``, ``"hparams/<name>"`` and ``"scales/<name>"`` to NumPy arrays with one
          row per (non-warm-up) cycle; the hyperparameter columns are the schedule.
        """
        _check_int("cycles", cycles, 0)
        _check_int("warmup_cycles", warmup_cycles, 0)
        _check_int("chunk", chunk)
        run = self._fit_runners.get((batch_size, val_batch_size))
        if run is None:
            run = _jitted_chunks(self, batch_size, val_batch_size)
            self._fit_runners[batch_size, val_batch_size] = run
        done = 0
        while done < warmup_cycles:
            n = min(chunk, warmup_cycles - done)
            state, _ = run(state, train_data, val_data, n, True)
            done += n
            if callback is not None:
                callback(done)
        records = []
        done = 0
        while done < cycles:
            n = min(chunk, cycles - done)
            step0 = int(state.step)
            state, metrics = run(state, train_data, val_data, n, False)
            metrics = jax.device_get(metrics)
            metrics["step"] = np.arange(step0 + 1, step0 + n + 1)
            records.append(metrics)
            done += n
            if callback is not None:
                callback(warmup_cycles + done)
        return state, _history(records)

    # ------------------------------------------------------------------ internals

    def _num_batches(self, batches, expected, name):
        leaves = jax.tree.leaves(batches)
        if not leaves:
            raise ValueError(f"{name} is empty")
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

    def _features(self, ut, uf):
        """hnet from perturbed ``ut`` (``(..., n)``) and unperturbed ``uf`` (``(n,)``)."""
        if self.encoding == "mip":
            enc = lambda a: mip_encoding(jax.nn.sigmoid(a))
        else:
            enc = lambda a: a
        if self.variant == "delta":
            return enc(ut) - jax.lax.stop_gradient(enc(uf))
        return enc(ut)

    def _values(self, ut):
        return jax.vmap(lambda a: hp.constrain(self.space, self._unravel(a)))(ut)

    def _perturbed(self, u, rho, key, batch_size, linearize=False):
        uf = ravel_pytree(u)[0]
        sf = scale_from_param(ravel_pytree(rho)[0])
        ut = perturb(key, uf, sf, batch_size, shared=self._shared)
        return StnHparams(self._values(ut), self._features(ut, uf), linearize)

    def _unperturbed(self, u, batch_size):
        uf = ravel_pytree(u)[0]
        ut = jnp.broadcast_to(uf, (batch_size, uf.shape[0]))
        hnet = jnp.zeros((batch_size, self.num_features), uf.dtype)
        return StnHparams(self._values(ut), hnet)

    def _call_train(self, params_parts, rest, h, batch, key):
        model = nnx.merge(self._graphdef, *params_parts, rest)
        value = self.train_loss(model, h, batch, key)
        _check_scalar(value, "train_loss")
        new_rest = nnx.state(model, nnx.Not(nnx.Param))
        return value, new_rest

    def _train(self, state, batches, keys):
        u, rho = state.hparams, state.scale

        def body(carry, xs):
            params, rest, opt_state = carry
            batch, key = xs
            bsz = _batch_size(batch)
            k_eps, k_loss = jax.random.split(key)
            if self.variant == "stn":
                h = self._perturbed(u, rho, k_eps, bsz)
                (value, new_rest), grads = jax.value_and_grad(
                    lambda p: self._call_train((p,), rest, h, batch, k_loss), has_aux=True
                )(params)
            else:
                general, response = nnx.split_state(params, _GENERAL, ResponseParam)
                h0 = self._unperturbed(u, bsz)
                (value, new_rest), g_gen = jax.value_and_grad(
                    lambda g: self._call_train((g, response), rest, h0, batch, k_loss),
                    has_aux=True,
                )(general)
                h = self._perturbed(u, rho, k_eps, bsz, self.linearize)
                (value_r, _), g_resp = jax.value_and_grad(
                    lambda r: self._call_train((general, r), rest, h, batch, k_loss),
                    has_aux=True,
                )(response)
                grads = nnx.merge_state(g_gen, g_resp)
                value = jnp.where(jnp.isfinite(value_r), value, value_r)
            updates, new_opt = self.optimizer.update(
                grads, opt_state, params, value=value, grad=grads
            )
            new_params = optax.apply_updates(params, updates)
            ok = jnp.isfinite(value) & T.tree_all_finite(grads) & T.tree_all_finite(new_params)
            carry = T.tree_select(ok, (new_params, new_rest, new_opt), (params, rest, opt_state))
            return carry, (value, ok)

        (params, rest, opt_state), (losses, oks) = jax.lax.scan(
            body, (state.params, state.rest, state.opt_state), (batches, keys)
        )
        return params, rest, opt_state, losses, oks

    def _hyper_objective(self, hyper, params, rest, batch, key):
        u, rho = hyper
        h = self._perturbed(u, rho, key, _batch_size(batch))
        model = nnx.merge(self._graphdef, params, rest)
        value = self.val_loss(model, h, batch)
        _check_scalar(value, "val_loss")
        ent = entropy(scale_from_param(ravel_pytree(rho)[0]))
        return value - self.entropy_weight * ent, (value, ent)


def _batch_size(batch) -> int:
    leaves = jax.tree.leaves(batch)
    if not leaves or jnp.ndim(leaves[0]) == 0:
        raise ValueError("a batch needs at least one array with a leading example axis")
    return int(jnp.shape(leaves[0])[0])


def _masked_mean(values, oks):
    n = jnp.sum(oks)
    total = jnp.sum(jnp.where(oks, values, 0.0))
    return jnp.where(n > 0, total / jnp.maximum(n, 1), jnp.nan)


def _jitted_chunks(trainer: Trainer, batch_size, val_batch_size):
    def run(state, train_data, val_data, n, warm):
        def body(state, _):
            tb, vb = trainer.sample_batches(state, train_data, val_data, batch_size, val_batch_size)
            if warm:
                state, _m = trainer.warmup(state, tb)
                return state, None
            state, metrics = trainer.step(state, tb, vb)
            return state, metrics

        return jax.lax.scan(body, state, None, length=n)

    return jax.jit(run, static_argnums=(3, 4))


def _history(records) -> dict[str, np.ndarray]:
    if not records:
        return {}
    cat = lambda key: np.concatenate([np.asarray(r[key]) for r in records])
    out = {"step": cat("step")}
    for key in ("train_loss", "val_loss", "entropy", "train_skipped", "val_skipped"):
        out[key] = cat(key)
    for group in ("hparams", "scales"):
        flat = [jax.tree_util.tree_flatten_with_path(r[group])[0] for r in records]
        for i, (path, _) in enumerate(flat[0]):
            name = jax.tree_util.keystr(path, simple=True, separator="/")
            out[f"{group}/{name}" if name else group] = np.concatenate(
                [np.asarray(f[i][1]) for f in flat]
            )
    return out
