r"""STN variants as strategy objects: :class:`STN` and :class:`DeltaSTN`.

A variant owns how the hypernetwork features ``hnet`` are formed from the perturbed
hyperparameters, at which hyperparameters each group of weights is trained, and the Delta-STN
linearization. :class:`~bilevel.stn.Trainer` calls the two methods of the protocol
(:meth:`StnMethod.features`, :meth:`StnMethod.inner_value_and_grad`) and never branches on the
variant, so a new variant is one class here plus its tests.

Notation: ``u`` the unconstrained hyperparameters, :math:`\tilde u = u + \sigma\varepsilon` the
perturbed ones (per example), ``encode`` the trainer's encoding (identity or
:func:`~bilevel.stn.mip_encoding`), :math:`\theta` the general weights (``nnx.Param``) and
:math:`\psi` the response weights (:class:`~bilevel.stn.ResponseParam`).

Example:
  >>> import jax.numpy as jnp
  >>> from bilevel import stn
  >>> u, ut = jnp.array([0.5]), jnp.array([[0.75], [0.25]])
  >>> stn.STN().features(lambda a: a, ut, u).tolist()
  [[0.75], [0.25]]
  >>> stn.DeltaSTN().features(lambda a: a, ut, u).tolist()
  [[0.25], [-0.25]]
  >>> stn.DeltaSTN(linearize=True)
  DeltaSTN(linearize=True)
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bilevel.stn._layers import ResponseParam

__all__ = ["STN", "DeltaSTN", "StnHparams", "StnMethod"]

PyTree = Any
# loss(params, h) -> (value, new_model_state): the trainer's inner loss at fixed batch and key.
InnerLoss = Callable[[PyTree, "StnHparams"], tuple[jax.Array, PyTree]]

_GENERAL = nnx.All(nnx.Param, nnx.Not(ResponseParam))


class UnknownHyperparameterError(KeyError):
    """A loss asked :class:`StnHparams` for a name the space lacks."""


class _Reads:
    """Which hyperparameters the losses read while a step is traced (compared by identity)."""

    def __init__(self, names: tuple[str, ...] | None):
        self.names = names  # the space's top-level keys, None when the space is not a dict
        self.used: set = set()
        self.everything = False


@jax.tree_util.register_pytree_node_class
class StnHparams:
    """What the loss functions receive as hyperparameters: per-example values and ``hnet``.

    Attributes:
      values: constrained hyperparameter values, the space's structure with a leading example
        axis on every leaf (``h["dropout"]`` is short for ``h.values["dropout"]``).
      hnet: features for the best-response layers, shape ``(batch, num_features)``.
      linearize: the Delta-STN linearization is on: :meth:`apply` returns the first-order Taylor
        expansion of the network in ``hnet``.
    """

    def __init__(
        self, values: PyTree, hnet: jax.Array, linearize: bool = False, _reads: Any = None
    ):
        self._values = values
        self.hnet = hnet
        self.linearize = bool(linearize)
        self._reads = _reads

    @property
    def values(self) -> PyTree:
        if self._reads is not None:
            self._reads.everything = True
        return self._values

    def __getitem__(self, name):
        values = self._values
        if isinstance(values, dict) and name not in values:
            raise UnknownHyperparameterError(
                f"hyperparameter {name!r} is not in the space; the space has "
                f"{sorted(map(str, values))}"
            )
        if self._reads is not None:
            self._reads.used.add(name)
        return values[name]

    def with_linearize(self, linearize: bool) -> StnHparams:
        """The same values and features with the linearization switched on or off."""
        return StnHparams(self._values, self.hnet, linearize, self._reads)

    def apply(self, fn: Callable, *args, **kwargs):
        r"""``fn(*args, hnet, **kwargs)``; linearized in ``hnet`` when ``linearize`` is set.

        .. math:: f(x, \mathrm{hnet}) \approx f(x, 0) + \partial_{\mathrm{hnet}} f(x, 0)\,
           \mathrm{hnet}

        Write the forward pass of the inner loss as ``h.apply(model, x)`` (rather than
        ``model(x, h.hnet)``) to support ``Trainer(..., method=DeltaSTN(linearize=True))``.
        """
        if not self.linearize:
            return fn(*args, self.hnet, **kwargs)
        zero = jnp.zeros_like(self.hnet)
        out, tangent = jax.jvp(lambda z: fn(*args, z, **kwargs), (zero,), (self.hnet,))
        return jax.tree.map(jnp.add, out, tangent)

    def tree_flatten(self):
        return (self._values, self.hnet), (self.linearize, self._reads)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, linearize=aux[0], _reads=aux[1])

    def __repr__(self):
        return (
            f"StnHparams(values={jax.tree.map(jnp.shape, self._values)}, "
            f"hnet={jnp.shape(self.hnet)}, linearize={self.linearize})"
        )


class StnMethod(abc.ABC):
    """The protocol of an STN variant (see the module docstring)."""

    @abc.abstractmethod
    def features(
        self, encode: Callable[[jax.Array], jax.Array], u_tilde: jax.Array, u: jax.Array
    ) -> jax.Array:
        """``hnet`` from perturbed ``u_tilde`` (``(..., n)``) and unperturbed ``u`` (``(n,)``).

        ``features(encode, u, u)`` are the features of the current hyperparameters.
        """

    @abc.abstractmethod
    def inner_value_and_grad(
        self, loss: InnerLoss, params: PyTree, perturbed: StnHparams, center: StnHparams
    ) -> tuple[jax.Array, PyTree, PyTree]:
        """One inner step's loss, new model state and gradient w.r.t. every ``nnx.Param``.

        Args:
          loss: ``loss(params, h) -> (value, model_state)`` at the step's batch and key.
          params: every ``nnx.Param`` of the model (an ``nnx.State``).
          perturbed: hyperparameters at :math:`\\tilde u` (features from :meth:`features`).
          center: the same at ``u`` (no perturbation).

        Returns:
          ``(value, model_state, grads)``, ``grads`` shaped like ``params``; ``value`` is
          non-finite whenever a loss evaluated for the gradient is.
        """


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class STN(StnMethod):
    r"""Self-Tuning Networks (MacKay et al., ICLR 2019).

    ``hnet`` is :math:`\mathrm{encode}(\tilde u)` and every weight (general and response) is
    trained at the perturbed hyperparameters:

    .. math:: (\theta, \psi) \leftarrow (\theta, \psi) - \alpha\nabla_{\theta,\psi}\,
       \mathbb E_\varepsilon L_T\big(w_{\theta,\psi}(\tilde u), c(\tilde u)\big)

    Example:
      >>> from bilevel import stn
      >>> stn.STN()
      STN()

    Reference: MacKay, Vicol, Lorraine, Duvenaud and Grosse, "Self-Tuning Networks", ICLR 2019.
    """

    def features(self, encode, u_tilde, u):
        return encode(u_tilde)

    def inner_value_and_grad(self, loss, params, perturbed, center):
        (value, model_state), grads = jax.value_and_grad(loss, has_aux=True)(params, perturbed)
        return value, model_state, grads


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeltaSTN(StnMethod):
    r"""Delta-STN (Bae and Grosse, NeurIPS 2020): centred features, split weight updates.

    ``hnet`` is :math:`\mathrm{encode}(\tilde u) - \mathrm{stop\_gradient}(\mathrm{encode}(u))`,
    zero at the current hyperparameters. The general weights :math:`\theta` are trained at the
    unperturbed hyperparameters (``hnet = 0``), the response weights :math:`\psi` at the
    perturbed ones:

    .. math:: \theta \leftarrow \theta - \alpha\nabla_\theta L_T\big(w(u), c(u)\big), \qquad
       \psi \leftarrow \psi - \alpha\nabla_\psi\,
       \mathbb E_\varepsilon L_T\big(w(\tilde u), c(\tilde u)\big)

    Args:
      linearize: replace the network by its first-order expansion in ``hnet`` (``jax.jvp``) for
        the response step (the loss must call the network as ``h.apply(model, x)``, see
        :meth:`StnHparams.apply`).

    Example:
      >>> from bilevel import stn
      >>> stn.DeltaSTN(linearize=True).linearize
      True

    Reference: Bae and Grosse, "Delta-STN: Efficient Bilevel Optimization for Neural Networks
    using Structured Response Jacobians", NeurIPS 2020.
    """

    linearize: bool = False

    def __post_init__(self):
        object.__setattr__(self, "linearize", _check_bool("linearize", self.linearize))

    def features(self, encode, u_tilde, u):
        return encode(u_tilde) - jax.lax.stop_gradient(encode(u))

    def inner_value_and_grad(self, loss, params, perturbed, center):
        general, response = nnx.split_state(params, _GENERAL, ResponseParam)
        (value, model_state), g_general = jax.value_and_grad(
            lambda g: loss(nnx.merge_state(g, response), center), has_aux=True
        )(general)
        h = perturbed.with_linearize(self.linearize)
        (value_r, _), g_response = jax.value_and_grad(
            lambda r: loss(nnx.merge_state(general, r), h), has_aux=True
        )(response)
        grads = nnx.merge_state(g_general, g_response)
        return jnp.where(jnp.isfinite(value_r), value, value_r), model_state, grads
