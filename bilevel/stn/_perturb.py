r"""Hyperparameter perturbation with learned scales, and its entropy bonus.

STN trains the best-response weights on hyperparameters drawn around the current value,
:math:`\tilde u = u + \sigma \odot \varepsilon`, :math:`\sigma = \mathrm{softplus}(\rho)`, in the
unconstrained space of :mod:`bilevel.hparams`; the scales :math:`\sigma` are tuned on the validation
loss with an entropy bonus that keeps them from collapsing.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["entropy", "perturb", "scale_from_param", "scale_to_param"]


def scale_from_param(rho: jax.typing.ArrayLike) -> jax.Array:
    r"""Perturbation scale from its unconstrained parameter: :math:`\sigma = \mathrm{softplus}(\rho)`."""
    return jax.nn.softplus(jnp.asarray(rho))


def scale_to_param(scale: jax.typing.ArrayLike) -> jax.Array:
    r"""Inverse of :func:`scale_from_param`: :math:`\rho = \log(e^{\sigma} - 1)` (``scale > 0``)."""
    s = jnp.asarray(scale)
    return s + jnp.log(-jnp.expm1(-s))


def perturb(
    key: jax.Array,
    u: jax.typing.ArrayLike,
    scale: jax.typing.ArrayLike,
    batch_size: int,
    *,
    shared: jax.typing.ArrayLike | bool = False,
) -> jax.Array:
    r"""Per-example perturbed (unconstrained) hyperparameters.

    .. math:: \tilde u_{i} = u + \sigma \odot \varepsilon_i, \qquad
       \varepsilon_i \sim \mathcal N(0, I)

    with one :math:`\varepsilon` per example, or one per batch for the hyperparameters marked
    ``shared`` (e.g. those that change the whole batch, like a learning rate or a batch-level
    augmentation).

    Args:
      key: PRNG key.
      u: unconstrained hyperparameters, shape ``(n,)``.
      scale: perturbation scales ``sigma >= 0``, shape ``(n,)`` (or broadcastable).
      batch_size: number of examples (static int).
      shared: bool or boolean mask of shape ``(n,)``: perturb these once per batch.

    Returns:
      Array of shape ``(batch_size, n)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from bilevel import stn
      >>> stn.perturb(jax.random.key(0), jnp.zeros(3), jnp.ones(3), 4).shape
      (4, 3)
    """
    u = jnp.asarray(u)
    if u.ndim != 1:
        raise ValueError(f"perturb: u must be a vector (n,), got shape {u.shape}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"perturb: batch_size must be an int >= 1, got {batch_size!r}")
    scale = jnp.broadcast_to(jnp.asarray(scale, u.dtype), u.shape)
    k_ex, k_sh = jax.random.split(key)
    eps = jax.random.normal(k_ex, (batch_size, u.shape[0]), u.dtype)
    shared = jnp.broadcast_to(jnp.asarray(shared, bool), u.shape)
    eps_shared = jax.random.normal(k_sh, (1, u.shape[0]), u.dtype)
    eps = jnp.where(shared, eps_shared, eps)
    return u + scale * eps


def entropy(scale: jax.typing.ArrayLike) -> jax.Array:
    r"""Differential entropy of the perturbation :math:`\mathcal N(u, \mathrm{diag}(\sigma^2))`.

    .. math:: H = \sum_j \log \sigma_j + \tfrac{n}{2} (1 + \log 2\pi)

    The STN hyper step minimizes :math:`L_V - \tau H`; only :math:`\sum_j \log\sigma_j` depends
    on the scales.

    Args:
      scale: perturbation scales ``sigma > 0``, any shape.

    Returns:
      A scalar.

    Example:
      >>> import jax.numpy as jnp
      >>> from bilevel import stn
      >>> round(float(stn.entropy(jnp.ones(2))), 4)
      2.8379
    """
    scale = jnp.asarray(scale)
    return jnp.sum(jnp.log(scale)) + 0.5 * scale.size * (1.0 + math.log(2.0 * math.pi))
