r"""Structured best-response layers of Self-Tuning Networks for Flax NNX.

A best-response layer computes, for hyperparameter features ``hnet`` (per example or shared),

.. math:: [u; v] = V^\top \mathrm{hnet}, \qquad
   y = (W_e x + b_e) + u \odot (W_r x) + v \odot b_r

so its effective weights are :math:`W_e + \mathrm{diag}(u) W_r` and :math:`b_e + v \odot b_r`: a
rank-structured, row-gated linear function of the hyperparameters (MacKay et al., ICLR 2019).
``W_e, b_e`` are plain ``nnx.Param`` ("general weights"); ``W_r, b_r, V`` are
:class:`ResponseParam` ("response weights"), a subclass of ``nnx.Param``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = [
    "ResponseParam",
    "StnConv",
    "StnLinear",
    "effective_l2",
    "mip_encoding",
    "stn_layers",
]

default_kernel_init = nnx.initializers.lecun_normal()
default_zeros_init = nnx.initializers.zeros_init()


class ResponseParam(nnx.Param):
    """Response weights ``W_r``, ``b_r`` and ``V`` of a best-response layer (an ``nnx.Param``)."""


def _check_int(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _promote_dtype(arrays: Sequence[Any], dtype: Any = None) -> tuple[jax.Array, ...]:
    """``arrays`` cast to ``dtype`` (default: their common inexact type)."""
    if dtype is None:
        dtype = jnp.result_type(*arrays)
        if not jnp.issubdtype(dtype, jnp.inexact):
            dtype = jnp.promote_types(jnp.float32, dtype)
    return tuple(jnp.asarray(a, dtype) for a in arrays)


def _canonical_padding(padding: Any, rank: int) -> str | list[tuple[int, int]]:
    """A padding string unchanged, or ``rank`` explicit ``(low, high)`` pairs."""
    if isinstance(padding, str):
        return padding
    if isinstance(padding, int):
        return [(padding, padding)] * rank
    if isinstance(padding, Sequence) and len(padding) == rank:
        pairs = []
        for p in padding:
            if isinstance(p, int):
                pairs.append((p, p))
            elif isinstance(p, Sequence) and len(p) == 2 and all(isinstance(q, int) for q in p):
                pairs.append((int(p[0]), int(p[1])))
            else:
                break
        else:
            return pairs
    raise ValueError(
        f"StnConv: padding must be a string, an int or {rank} ints / (low, high) pairs, "
        f"got {padding!r}"
    )


def mip_encoding(x: jax.typing.ArrayLike) -> jax.Array:
    r"""Magnitude-invariant encoding of normalized hyperparameters: ``[cos(pi x / 2), sin(pi x / 2)]``.

    .. math:: e(x) = \big(\cos(\tfrac{\pi}{2} x), \sin(\tfrac{\pi}{2} x)\big), \qquad
       \|e(x_j)\| = 1

    Every hyperparameter is mapped onto the unit quarter circle, so the input of the hypernetwork
    has a constant norm whatever the hyperparameter values (Ortiz, Guttag and Dalca, "Magnitude
    Invariant Parametrizations Improve Hypernetwork Learning", ICLR 2024). The trainer uses it
    with ``encoding="mip"`` on ``sigmoid`` of the unconstrained hyperparameters (the normalized
    value for bounded specs); the layers then need ``num_hparams = 2 * n``.

    Args:
      x: normalized hyperparameters in ``[0, 1]``, shape ``(..., n)``.

    Returns:
      Array of shape ``(..., 2 n)``: all cosines, then all sines.

    Example:
      >>> import jax.numpy as jnp
      >>> from bilevel import stn
      >>> stn.mip_encoding(jnp.array([0.0, 1.0])).round(3).tolist()
      [1.0, -0.0, 0.0, 1.0]
    """
    x = jnp.asarray(x)
    angle = 0.5 * math.pi * x
    return jnp.concatenate([jnp.cos(angle), jnp.sin(angle)], axis=-1)


class _StnBase(nnx.Module):
    """Shared hypernetwork part: ``hnet -> (u, v)`` and the effective-weight helpers."""

    in_features: int
    out_features: int
    num_hparams: int
    use_bias: bool

    def _gates(self, hnet: jax.Array, dtype) -> tuple[jax.Array, jax.Array | None]:
        hnet = jnp.asarray(hnet)
        if hnet.ndim not in (1, 2) or hnet.shape[-1] != self.num_hparams:
            raise ValueError(
                f"{type(self).__name__}: hnet must have shape ({self.num_hparams},) (shared) or "
                f"(batch, {self.num_hparams}) (per example), got {hnet.shape}"
            )
        # The gates are computed in at least float32 (a small product; it carries the
        # hypergradient to hnet), then cast to the computation dtype when there is one.
        wide = jnp.promote_types(jnp.result_type(hnet, self.hnet_kernel[...]), jnp.float32)
        (hnet, v_mat) = _promote_dtype((hnet, self.hnet_kernel[...]), dtype=wide)
        cast = (lambda a: a) if dtype is None else (lambda a: a.astype(dtype))
        if self.use_bias:
            # Two products against the column blocks of V, not one product sliced: the
            # backward pass then concatenates the small (num_hparams, out) gradients of V
            # instead of padding the (batch, out) gradients of u and v (a profile of the rank-8
            # train step: about 0.4 ms of thread time per layer and step in those pads; the
            # epoch's wall time moved by less than run-to-run noise).
            out = self.out_features
            return cast(hnet @ v_mat[:, :out]), cast(hnet @ v_mat[:, out:])
        return cast(hnet @ v_mat), None

    def _compute_dtype(self, x, *params) -> Any:
        """The computation dtype: ``dtype``, else the promoted dtype of ``x`` and the weights
        (not of ``hnet``), so bfloat16 inputs and weights give bfloat16 activations even when
        ``hnet`` (from float32 hyperparameters) is float32."""
        dtype = self.dtype
        if dtype is None:
            dtype = jnp.result_type(x, *params)
            if not jnp.issubdtype(dtype, jnp.inexact):
                dtype = jnp.promote_types(jnp.float32, dtype)
        return dtype

    def effective_bias(self, hnet: jax.typing.ArrayLike) -> jax.Array | None:
        r"""Effective bias :math:`b_e + v \odot b_r`, shape ``(out,)`` or ``(batch, out)``.

        Args:
          hnet: hyperparameter features, ``(num_hparams,)`` or ``(batch, num_hparams)``.

        Returns:
          The bias (``None`` without bias).
        """
        if not self.use_bias:
            return None
        _, v = self._gates(hnet, self.dtype)
        return self.bias[...] + v * self.response_bias[...]

    def effective_l2(self, hnet: jax.typing.ArrayLike, *, include_bias: bool = False) -> jax.Array:
        r"""Squared norm of the effective weights, without materializing them.

        .. math:: \|W_e + \mathrm{diag}(u) W_r\|^2 = \sum_o \|w_{e,o}\|^2
           + 2 u_o \langle w_{e,o}, w_{r,o}\rangle + u_o^2 \|w_{r,o}\|^2

        Args:
          hnet: hyperparameter features, ``(num_hparams,)`` or ``(batch, num_hparams)``.
          include_bias: add :math:`\|b_e + v \odot b_r\|^2`.

        Returns:
          A scalar (shared ``hnet``) or one value per example, shape ``(batch,)``.
        """
        u, v = self._gates(hnet, self.dtype)
        k_e, k_r = self.kernel[...], self._response_kernel()
        axes = tuple(range(k_e.ndim - 1))  # every axis but the output channels
        see = jnp.sum(k_e * k_e, axis=axes)
        ser = jnp.sum(k_e * k_r, axis=axes)
        srr = jnp.sum(k_r * k_r, axis=axes)
        out = jnp.sum(see + 2.0 * u * ser + u * u * srr, axis=-1)
        if include_bias and self.use_bias:
            b = self.bias[...] + v * self.response_bias[...]
            out = out + jnp.sum(b * b, axis=-1)
        return out

    def effective_kernel(self, hnet: jax.typing.ArrayLike) -> jax.Array:
        r"""Effective kernel :math:`W_e + u \odot W_r` (gated per output unit).

        Args:
          hnet: hyperparameter features, ``(num_hparams,)`` or ``(batch, num_hparams)``.

        Returns:
          The kernel, shape ``kernel.shape`` (shared) or ``(batch, *kernel.shape)``.
        """
        u, _ = self._gates(hnet, self.dtype)
        return (
            self.kernel[...]
            + u[..., *([None] * (self.kernel[...].ndim - 1)), :] * self._response_kernel()
        )

    def _response_kernel(self) -> jax.Array:
        """``W_r`` (materialized from its factors for a low-rank response)."""
        return self.response_kernel[...]

    def _init_response(
        self, kernel_shape, kernel_init, bias_init, hnet_init, param_dtype, rngs, rank=None
    ) -> None:
        self.kernel = nnx.Param(kernel_init(rngs.params(), kernel_shape, param_dtype))
        if rank is None:
            self.response_kernel = ResponseParam(
                kernel_init(rngs.params(), kernel_shape, param_dtype)
            )
        else:  # W_r = P Q with P (in, r), Q (r, out): Var(W_r) = r Var(P) Var(Q) = 1 / in
            n_in, n_out = kernel_shape
            self.response_left = ResponseParam(
                kernel_init(rngs.params(), (n_in, rank), param_dtype)
            )
            self.response_right = ResponseParam(
                kernel_init(rngs.params(), (rank, n_out), param_dtype)
            )
        gates = 2 * self.out_features if self.use_bias else self.out_features
        self.hnet_kernel = ResponseParam(
            hnet_init(rngs.params(), (self.num_hparams, gates), param_dtype)
        )
        if self.use_bias:
            self.bias = nnx.Param(bias_init(rngs.params(), (self.out_features,), param_dtype))
            self.response_bias = ResponseParam(
                bias_init(rngs.params(), (self.out_features,), param_dtype)
            )
        else:
            self.bias = nnx.data(None)
            self.response_bias = nnx.data(None)

    def _combine(self, y_e, y_r, u, v, batch_axes: int):
        """``y_e + u * y_r (+ b_e + v * b_r)`` with the gates broadcast over non-batch axes."""
        if u.ndim == 2:  # per example: (batch, out) -> (batch, 1, ..., 1, out)
            if y_e.shape[0] != u.shape[0]:
                raise ValueError(
                    f"{type(self).__name__}: per-example hnet has {u.shape[0]} rows but the "
                    f"input has batch size {y_e.shape[0]}"
                )
            shape = (u.shape[0],) + (1,) * (y_e.ndim - 2) + (u.shape[1],)
            u = u.reshape(shape)
            v = None if v is None else v.reshape(shape)
        y = y_e + u * y_r
        if self.use_bias:
            y = y + self.bias[...] + v * self.response_bias[...]
        return y


class StnLinear(_StnBase):
    r"""Best-response dense layer: ``nnx.Linear`` whose weights respond to the hyperparameters.

    .. math:: [u; v] = V^\top \mathrm{hnet}, \qquad
       y = (x W_e + b_e) + u \odot (x W_r) + v \odot b_r

    ``kernel`` (``W_e``) and ``bias`` (``b_e``) are ``nnx.Param``; ``response_kernel`` (``W_r``),
    ``response_bias`` (``b_r``) and ``hnet_kernel`` (``V``, shape ``(num_hparams, 2 out)``, or
    ``(num_hparams, out)`` without bias) are :class:`ResponseParam`. With ``V = 0`` the layer is
    ``nnx.Linear(in_features, out_features)`` with the same ``kernel`` and ``bias``; ``V`` starts
    at zero by default, so a fresh layer computes the same function as its base layer.

    Args:
      in_features: input size.
      out_features: output size.
      num_hparams: size of the hyperparameter features ``hnet``.
      use_bias: add ``b_e + v * b_r``.
      dtype: computation dtype (default: promoted from ``x`` and the weights; ``hnet``, which
        comes from float32 hyperparameters, does not widen it: the gates
        :math:`V^\top \mathrm{hnet}` are computed in at least float32 and cast to it, so
        bfloat16 inputs and weights give bfloat16 activations).
      param_dtype: parameter dtype.
      precision: matmul precision.
      kernel_init: initializer of ``W_e`` and ``W_r`` (drawn independently).
      bias_init: initializer of ``b_e`` and ``b_r``.
      hnet_init: initializer of ``V``.
      response_rank: ``None`` (default): a full response kernel ``W_r``. An int ``r``: the
        low-rank response ``W_r = P Q`` (``response_left`` ``P`` of shape ``(in, r)``,
        ``response_right`` ``Q`` of shape ``(r, out)``), which turns the per-example response
        product ``x W_r`` (a second full matmul) into ``(x P) Q``: ``r (in + out)`` instead of
        ``in * out`` multiply-adds per example. Each output unit's response direction is then
        a combination of ``r`` shared directions: a coarser best-response approximation than
        the structured one of the paper, measured in ``experiments.bench_stn``.
      rngs: random streams (``rngs.params``).

    Returns:
      A module called as ``layer(x, hnet)`` with ``x`` of shape ``(..., in_features)`` and
      ``hnet`` shared ``(num_hparams,)`` or per example ``(batch, num_hparams)`` (then
      ``x.shape[0] == batch``); output ``(..., out_features)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from bilevel import stn
      >>> layer = stn.StnLinear(4, 3, num_hparams=2, rngs=nnx.Rngs(0))
      >>> layer(jnp.ones((5, 4)), jnp.zeros((5, 2))).shape
      (5, 3)

    Reference: MacKay, Vicol, Lorraine, Duvenaud and Grosse, "Self-Tuning Networks: Bilevel
    Optimization of Hyperparameters using Structured Best-Response Functions", ICLR 2019.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_hparams: int,
        *,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Any = default_kernel_init,
        bias_init: Any = default_zeros_init,
        hnet_init: Any = default_zeros_init,
        response_rank: int | None = None,
        rngs: nnx.Rngs,
    ):
        self.in_features = _check_int("in_features", in_features)
        self.out_features = _check_int("out_features", out_features)
        self.num_hparams = _check_int("num_hparams", num_hparams)
        if response_rank is not None:
            response_rank = _check_int("response_rank", response_rank)
        self.response_rank = response_rank
        self.use_bias = bool(use_bias)
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision
        self._init_response(
            (in_features, out_features),
            kernel_init,
            bias_init,
            hnet_init,
            param_dtype,
            rngs,
            rank=response_rank,
        )

    def _response_kernel(self) -> jax.Array:
        if self.response_rank is None:
            return self.response_kernel[...]
        return jnp.matmul(
            self.response_left[...], self.response_right[...], precision=self.precision
        )

    def __call__(self, x: jax.typing.ArrayLike, hnet: jax.typing.ArrayLike) -> jax.Array:
        x = jnp.asarray(x)
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"StnLinear: input must have shape (..., {self.in_features}), got {x.shape}"
            )
        weights = [self.kernel[...]]
        weights += (
            [self.response_kernel[...]]
            if self.response_rank is None
            else [self.response_left[...], self.response_right[...]]
        )
        u, v = self._gates(hnet, self._compute_dtype(x, *weights))
        if u.ndim == 1:
            # Shared hyperparameters: one effective kernel, one matmul.
            x, k_e, k_r = _promote_dtype(
                (x, self.kernel[...], self._response_kernel()), dtype=self.dtype
            )
            y = jnp.matmul(x, k_e + u * k_r, precision=self.precision)
            if self.use_bias:
                y = y + self.bias[...] + v * self.response_bias[...]
            return y
        if x.ndim < 2:
            raise ValueError("StnLinear: a per-example hnet needs a batched input (batch, ...)")
        if self.response_rank is not None:
            # Low rank: x [W_e, P] in one matmul, then the small (r, out) product.
            x, k_e, p, q = _promote_dtype(
                (x, self.kernel[...], self.response_left[...], self.response_right[...]),
                dtype=self.dtype,
            )
            y_e = jnp.matmul(x, k_e, precision=self.precision)
            y_r = jnp.matmul(x, p, precision=self.precision)
            y_r = jnp.matmul(y_r, q, precision=self.precision)
            return self._combine(y_e, y_r, u, v, 1)
        x, k_e, k_r = _promote_dtype(
            (x, self.kernel[...], self.response_kernel[...]), dtype=self.dtype
        )
        # Per example: two matmuls. One against the concatenated [W_e, W_r] (or [W_e, P]) was
        # slower on XLA:CPU: the slices of its output and the concatenation in the backward
        # pass cost more than the second call (experiments.bench_stn, epoch / plain epoch:
        # 2.35x -> 2.29x full, 2.04x -> 1.78x rank 8).
        y_e = jnp.matmul(x, k_e, precision=self.precision)
        y_r = jnp.matmul(x, k_r, precision=self.precision)
        return self._combine(y_e, y_r, u, v, 1)


class StnConv(_StnBase):
    r"""Best-response convolution: ``nnx.Conv`` whose filters respond to the hyperparameters.

    .. math:: [u; v] = V^\top \mathrm{hnet}, \qquad
       y = (W_e * x + b_e) + u \odot (W_r * x) + v \odot b_r

    gated per output channel (broadcast over the spatial positions). Parameters as in
    :class:`StnLinear`; ``kernel`` has nnx's ``(*kernel_size, in, out)`` layout, inputs are
    channels-last ``(batch, *spatial, in_features)``. With ``V = 0`` (the default init) it equals
    ``nnx.Conv`` with the same ``kernel`` and ``bias``.

    Args:
      in_features: input channels.
      out_features: output channels.
      kernel_size: int or tuple (its length is the number of spatial dimensions, default 2).
      num_hparams: size of the hyperparameter features ``hnet``.
      strides: int or tuple.
      padding: ``"SAME"``, ``"VALID"``, an int or a sequence of ``(low, high)`` pairs.
      kernel_dilation: int or tuple.
      use_bias, dtype, param_dtype, precision, kernel_init, bias_init, hnet_init: as in
        :class:`StnLinear`.
      rngs: random streams (``rngs.params``).

    Returns:
      A module called as ``layer(x, hnet)``; ``hnet`` shared ``(num_hparams,)`` or per example
      ``(batch, num_hparams)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from bilevel import stn
      >>> conv = stn.StnConv(1, 4, 3, num_hparams=2, rngs=nnx.Rngs(0))
      >>> conv(jnp.ones((2, 8, 8, 1)), jnp.zeros((2, 2))).shape
      (2, 8, 8, 4)

    Reference: MacKay et al., "Self-Tuning Networks", ICLR 2019.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int],
        num_hparams: int,
        *,
        strides: int | Sequence[int] = 1,
        padding: Any = "SAME",
        kernel_dilation: int | Sequence[int] = 1,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Any = default_kernel_init,
        bias_init: Any = default_zeros_init,
        hnet_init: Any = default_zeros_init,
        rngs: nnx.Rngs,
    ):
        self.in_features = _check_int("in_features", in_features)
        self.out_features = _check_int("out_features", out_features)
        self.num_hparams = _check_int("num_hparams", num_hparams)
        if isinstance(kernel_size, int):
            kernel_size = (kernel_size, kernel_size)
        kernel_size = tuple(kernel_size)
        if not kernel_size:
            raise ValueError("StnConv: kernel_size must not be empty")
        for k in kernel_size:
            _check_int("kernel_size", k)
        self.kernel_size = kernel_size
        rank = len(kernel_size)

        def tup(name, value):
            value = (value,) * rank if isinstance(value, int) else tuple(value)
            if len(value) != rank:
                raise ValueError(f"StnConv: {name} needs {rank} entries, got {value}")
            for s in value:
                _check_int(name, s)
            return value

        self.strides = tup("strides", strides)
        self.kernel_dilation = tup("kernel_dilation", kernel_dilation)
        self.padding = _canonical_padding(padding, rank)
        if self.padding in ("CIRCULAR", "REFLECT", "CAUSAL"):
            raise ValueError(
                "StnConv: padding must be 'SAME', 'VALID', an int or (low, high) pairs"
            )
        self.use_bias = bool(use_bias)
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision
        self._init_response(
            (*kernel_size, in_features, out_features),
            kernel_init,
            bias_init,
            hnet_init,
            param_dtype,
            rngs,
        )

    def _conv(self, x, kernel):
        rank = len(self.kernel_size)
        spatial = "".join("DHW"[-rank:]) if rank <= 3 else None
        if spatial is None:
            dn = jax.lax.conv_dimension_numbers(
                x.shape, kernel.shape, (0, rank + 1, *range(1, rank + 1)), None, None
            )
        else:
            dn = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=self.strides,
            padding=self.padding,
            rhs_dilation=self.kernel_dilation,
            dimension_numbers=dn,
            precision=self.precision,
        )

    def __call__(self, x: jax.typing.ArrayLike, hnet: jax.typing.ArrayLike) -> jax.Array:
        x = jnp.asarray(x)
        rank = len(self.kernel_size)
        if x.ndim != rank + 2 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"StnConv: input must have shape (batch, {rank} spatial dims, "
                f"{self.in_features}), got {x.shape}"
            )
        dtype = self._compute_dtype(x, self.kernel[...], self.response_kernel[...])
        u, v = self._gates(hnet, dtype)
        x, k_e, k_r = _promote_dtype((x, self.kernel[...], self.response_kernel[...]), dtype=dtype)
        if u.ndim == 1:
            y = self._conv(x, k_e + u * k_r)
            if self.use_bias:
                y = y + self.bias[...] + v * self.response_bias[...]
            return y
        yy = self._conv(x, jnp.concatenate([k_e, k_r], axis=-1))
        y_e, y_r = yy[..., : self.out_features], yy[..., self.out_features :]
        return self._combine(y_e, y_r, u, v, 1)


def stn_layers(model: nnx.Module) -> list[tuple[tuple, _StnBase]]:
    """The best-response layers (:class:`StnLinear`, :class:`StnConv`) of a model, with paths.

    Args:
      model: an ``nnx.Module``.

    Returns:
      A list of ``(path, layer)``.
    """
    return [(p, m) for p, m in nnx.iter_graph(model) if isinstance(m, _StnBase)]


def effective_l2(
    model: nnx.Module, hnet: jax.typing.ArrayLike, *, include_bias: bool = False
) -> jax.Array:
    r"""Weight decay on the effective weights of every best-response layer of ``model``.

    .. math:: \Omega(\mathrm{hnet}) = \sum_{\ell} \|W_{e,\ell} + u_\ell \odot W_{r,\ell}\|^2

    Multiply by a tuned weight-decay hyperparameter in the training loss; with a per-example
    ``hnet`` each example is penalized at its own (perturbed) hyperparameters.

    Args:
      model: module containing :class:`StnLinear` / :class:`StnConv` layers.
      hnet: hyperparameter features, ``(num_hparams,)`` or ``(batch, num_hparams)``.
      include_bias: also penalize the effective biases.

    Returns:
      A scalar, or ``(batch,)`` for a per-example ``hnet``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from bilevel import stn
      >>> layer = stn.StnLinear(3, 2, 1, rngs=nnx.Rngs(0))
      >>> stn.effective_l2(layer, jnp.zeros((4, 1))).shape
      (4,)
    """
    layers = stn_layers(model)
    if not layers:
        raise ValueError("effective_l2: the model has no StnLinear/StnConv layer")
    return sum(layer.effective_l2(hnet, include_bias=include_bias) for _, layer in layers)
