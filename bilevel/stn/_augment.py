r"""Hyperparameter-driven regularizers in JAX: dropout and data augmentation, per example.

Each function takes a per-example magnitude (a scalar, shared by the batch, or one value per
example, shape ``(batch,)``) and a PRNG key, and runs inside a jitted train step. Magnitudes only
shape the random draws: they pass through ``stop_gradient``, since the training loss is not
differentiated by these hyperparameters (STN tunes them through the best-response weights).
Discrete magnitudes (cutout length, translation in pixels) are continuous inputs floored inside,
so a perturbed hyperparameter can be used as is. Images are channels-last
``(batch, height, width, ...)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["brightness", "contrast", "cutout", "dropout", "gaussian_noise", "translate"]


def _per_example(m: jax.typing.ArrayLike, x: jax.Array, name: str) -> jax.Array:
    """A scalar or ``(batch,)`` magnitude reshaped to broadcast against ``x``."""
    m = lax.stop_gradient(
        jnp.asarray(m, dtype=x.dtype if jnp.issubdtype(x.dtype, jnp.inexact) else None)
    )
    if m.ndim == 0:
        return m
    if m.ndim == 1 and x.ndim >= 1 and m.shape[0] == x.shape[0]:
        return m.reshape((m.shape[0],) + (1,) * (x.ndim - 1))
    raise ValueError(
        f"{name}: the magnitude must be a scalar or have shape (batch,) = ({x.shape[0]},), "
        f"got {m.shape}"
    )


def _images(x: jax.typing.ArrayLike, name: str) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim < 3:
        raise ValueError(
            f"{name}: images must have shape (batch, height, width, ...), got {x.shape}"
        )
    return x


def _is_key(a) -> bool:
    dtype = getattr(a, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _is_legacy_key(a) -> bool:
    dtype = getattr(a, "dtype", None)
    return dtype == jnp.uint32 and jnp.shape(a) == (2,)


def _what(a) -> str:
    dtype = getattr(a, "dtype", None)
    if dtype is None:
        return f"{type(a).__name__} {a!r}"
    return f"{dtype}{list(jnp.shape(a))}"


def _check_args(name: str, magnitude_name: str, x, magnitude, key) -> None:
    """A clear ``TypeError`` when the PRNG key is not the last argument."""
    if _is_key(x) or _is_key(magnitude) or not (_is_key(key) or _is_legacy_key(key)):
        raise TypeError(
            f"{name} takes (x, {magnitude_name}, key) with the PRNG key last, e.g. "
            f"stn.{name}(x, {magnitude_name}, jax.random.key(0)); got x={_what(x)}, "
            f"{magnitude_name}={_what(magnitude)}, key={_what(key)}"
        )


def dropout(x: jax.typing.ArrayLike, rate: jax.typing.ArrayLike, key: jax.Array) -> jax.Array:
    r"""Inverted dropout with a (per-example) rate.

    .. math:: y = x \odot m / (1 - p), \qquad m \sim \mathrm{Bernoulli}(1 - p)

    Masks are drawn from ``stop_gradient(rate)``; a rate of 1 zeroes the input.

    Args:
      x: activations, shape ``(batch, ...)``.
      rate: drop probability in ``[0, 1]``, scalar or shape ``(batch,)``.
      key: PRNG key.

    Returns:
      Array like ``x``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from bilevel import stn
      >>> stn.dropout(jnp.ones((2, 3)), jnp.array([0.0, 0.5]), jax.random.key(0)).shape
      (2, 3)

    Reference: Srivastava et al., "Dropout", JMLR 2014; used as a tuned hyperparameter in
    MacKay et al., ICLR 2019.
    """
    _check_args("dropout", "rate", x, rate, key)
    x = jnp.asarray(x)
    p = jnp.clip(_per_example(rate, x, "dropout"), 0.0, 1.0)
    keep = 1.0 - p
    mask = jax.random.uniform(key, x.shape, dtype=p.dtype) < keep
    return jnp.where(mask, x / jnp.where(keep > 0, keep, 1.0), jnp.zeros_like(x))


def gaussian_noise(x: jax.typing.ArrayLike, std: jax.typing.ArrayLike, key: jax.Array) -> jax.Array:
    r"""Additive Gaussian input noise with a (per-example) standard deviation.

    .. math:: y = x + s\, \varepsilon, \qquad \varepsilon \sim \mathcal N(0, I)

    Args:
      x: inputs, shape ``(batch, ...)``.
      std: noise scale ``s >= 0``, scalar or ``(batch,)``.
      key: PRNG key.

    Returns:
      Array like ``x``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from bilevel import stn
      >>> stn.gaussian_noise(jnp.ones((2, 3)), 0.0, jax.random.key(0)).tolist()
      [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    """
    _check_args("gaussian_noise", "std", x, std, key)
    x = jnp.asarray(x)
    s = _per_example(std, x, "gaussian_noise")
    return x + s * jax.random.normal(key, x.shape, x.dtype)


def _shift_one(img, dy, dx):
    h, w = img.shape[0], img.shape[1]
    rows = jnp.arange(h) - dy
    cols = jnp.arange(w) - dx
    valid = ((rows >= 0) & (rows < h))[:, None] & ((cols >= 0) & (cols < w))[None, :]
    out = img[jnp.clip(rows, 0, h - 1)][:, jnp.clip(cols, 0, w - 1)]
    valid = valid.reshape(valid.shape + (1,) * (img.ndim - 2))
    return jnp.where(valid, out, jnp.zeros_like(out))


def translate(
    x: jax.typing.ArrayLike, max_shift: jax.typing.ArrayLike, key: jax.Array
) -> jax.Array:
    r"""Random translation by up to ``floor(max_shift)`` pixels per axis, zero fill.

    .. math:: y_{i,j} = x_{i - d_y,\, j - d_x}, \qquad
       d_y, d_x \sim \mathcal U\{-\lfloor s \rfloor, \dots, \lfloor s \rfloor\}

    Args:
      x: images ``(batch, height, width, ...)``.
      max_shift: ``s >= 0`` in pixels (continuous, floored), scalar or ``(batch,)``.
      key: PRNG key.

    Returns:
      Array like ``x``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from bilevel import stn
      >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)
      >>> bool(jnp.all(stn.translate(x, 0.9, jax.random.key(0)) == x))
      True
    """
    _check_args("translate", "max_shift", x, max_shift, key)
    x = _images(x, "translate")
    b = x.shape[0]
    s = jnp.floor(
        jnp.maximum(
            jnp.broadcast_to(_per_example(max_shift, x[:, 0, 0], "translate").reshape(-1), (b,)),
            0.0,
        )
    )
    r = jax.random.uniform(key, (2, b), s.dtype)
    d = jnp.floor(r * (2.0 * s + 1.0)) - s  # uniform integers in [-s, s]
    d = jnp.minimum(d, s).astype(jnp.int32)
    return jax.vmap(_shift_one)(x, d[0], d[1])


def cutout(x: jax.typing.ArrayLike, length: jax.typing.ArrayLike, key: jax.Array) -> jax.Array:
    r"""Cutout: zero a ``floor(length)``-sided square at a uniformly random centre (may clip).

    .. math:: y = x \odot (1 - \mathbb 1_{\text{square}}), \qquad
       \text{side} = \lfloor \ell \rfloor

    Args:
      x: images ``(batch, height, width, ...)``.
      length: side ``l >= 0`` in pixels (continuous, floored), scalar or ``(batch,)``.
      key: PRNG key.

    Returns:
      Array like ``x``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from bilevel import stn
      >>> y = stn.cutout(jnp.ones((1, 8, 8, 1)), 2.5, jax.random.key(3))
      >>> int((y == 0).sum()) <= 4
      True

    Reference: DeVries and Taylor, "Improved Regularization of Convolutional Neural Networks
    with Cutout", 2017.
    """
    _check_args("cutout", "length", x, length, key)
    x = _images(x, "cutout")
    b, h, w = x.shape[:3]
    side = jnp.floor(
        jnp.maximum(
            jnp.broadcast_to(_per_example(length, x[:, 0, 0], "cutout").reshape(-1), (b,)), 0.0
        )
    )
    k_y, k_x = jax.random.split(key)
    cy = jax.random.randint(k_y, (b,), 0, h).astype(side.dtype)
    cx = jax.random.randint(k_x, (b,), 0, w).astype(side.dtype)
    y0 = cy - jnp.floor(side / 2.0)
    x0 = cx - jnp.floor(side / 2.0)
    rows = jnp.arange(h, dtype=side.dtype)[None, :]
    cols = jnp.arange(w, dtype=side.dtype)[None, :]
    in_r = (rows >= y0[:, None]) & (rows < (y0 + side)[:, None])  # (b, h)
    in_c = (cols >= x0[:, None]) & (cols < (x0 + side)[:, None])  # (b, w)
    hole = in_r[:, :, None] & in_c[:, None, :]
    hole = hole.reshape(hole.shape + (1,) * (x.ndim - 3))
    return jnp.where(hole, jnp.zeros_like(x), x)


def brightness(
    x: jax.typing.ArrayLike, magnitude: jax.typing.ArrayLike, key: jax.Array
) -> jax.Array:
    r"""Random brightness shift, uniform in ``[-m, m]`` per example.

    .. math:: y = x + \delta, \qquad \delta \sim \mathcal U(-m, m)

    Args:
      x: inputs ``(batch, ...)``.
      magnitude: ``m >= 0``, scalar or ``(batch,)``.
      key: PRNG key.

    Returns:
      Array like ``x``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from bilevel import stn
      >>> stn.brightness(jnp.zeros((2, 4, 4, 1)), 0.1, jax.random.key(0)).shape
      (2, 4, 4, 1)
    """
    _check_args("brightness", "magnitude", x, magnitude, key)
    x = jnp.asarray(x)
    m = _per_example(magnitude, x, "brightness")
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    delta = jax.random.uniform(key, shape, x.dtype, -1.0, 1.0)
    return x + m * delta


def contrast(x: jax.typing.ArrayLike, magnitude: jax.typing.ArrayLike, key: jax.Array) -> jax.Array:
    r"""Random contrast change around each example's mean, factor uniform in ``[1 - m, 1 + m]``.

    .. math:: y = \bar x + c\,(x - \bar x), \qquad c \sim \mathcal U(\max(0, 1 - m), 1 + m)

    Args:
      x: inputs ``(batch, ...)``.
      magnitude: ``m >= 0``, scalar or ``(batch,)``.
      key: PRNG key.

    Returns:
      Array like ``x``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from bilevel import stn
      >>> x = jnp.ones((2, 4, 4, 1))
      >>> bool(jnp.allclose(stn.contrast(x, 0.5, jax.random.key(0)), x))
      True
    """
    _check_args("contrast", "magnitude", x, magnitude, key)
    x = jnp.asarray(x)
    m = _per_example(magnitude, x, "contrast")
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    r = jax.random.uniform(key, shape, x.dtype, -1.0, 1.0)
    factor = jnp.maximum(1.0 + m * r, 0.0)
    mean = jnp.mean(x, axis=tuple(range(1, x.ndim)), keepdims=True)
    return mean + factor * (x - mean)
