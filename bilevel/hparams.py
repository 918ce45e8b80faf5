r"""Hyperparameter spaces: constrained values stored as unconstrained parameters.

Gradient steps on hyperparameters happen in an unconstrained space ``u``; each spec maps ``u`` to
its constrained value:

=========================  =======================================================  =============
spec                       value                                                    for
=========================  =======================================================  =============
``log(init)``              :math:`e^{u}`                                            weight decay
``log(init, lo, hi)``      :math:`\exp(\log lo + (\log hi - \log lo)\,\sigma(u))`   bounded scale
``log(init, lo)``          :math:`\exp(\log lo + \mathrm{softplus}(u))`
``log(init, None, hi)``    :math:`\exp(\log hi - \mathrm{softplus}(-u))`
``unit(init)``             :math:`lo + (hi - lo)\,\sigma(u)`, default ``(0, 1)``    dropout rate
``bounded(init, lo, hi)``  :math:`lo + (hi - lo)\,\sigma(u)` (one-sided: softplus)  magnitudes
``real(init)``             :math:`u`                                                offsets
=========================  =======================================================  =============

A *space* is any pytree (usually a dict) whose leaves are these specs. ``init`` may be an array
(one hyperparameter per feature, layer or example): ``log(jnp.full(n, 1e-3))``.

Dtypes: specs store float32 (float64 only for a float64 ``init`` under ``jax_enable_x64``),
never less: a bfloat16 or float16 ``init`` is cast to float32, so a model trained in bfloat16
still has float32 hyperparameters (see ``docs/mixed_precision.md``).

Two discrete specs hold hyperparameters no gradient reaches (a batch size, a layer count, a switch
between alternatives): ``choice(values)``, one of a list of numbers, and ``integer(lower, upper)``,
an integer in ``[lower, upper]``. They have no unconstrained form: :func:`init`, :func:`constrain`
and :func:`unconstrain` (so every gradient tuner) refuse them; :mod:`bilevel.pbt` manages them.

Example:
  >>> import jax.numpy as jnp
  >>> from bilevel import hparams
  >>> space = {"wd": hparams.log(1e-3), "dropout": hparams.unit(jnp.full(2, 0.1))}
  >>> u = hparams.init(space)
  >>> values = hparams.constrain(space, u)
  >>> round(float(values["wd"]), 6), values["dropout"].shape
  (0.001, (2,))
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Discrete",
    "Hyperparameter",
    "bounded",
    "choice",
    "constrain",
    "init",
    "integer",
    "log",
    "real",
    "unconstrain",
    "unit",
]

PyTree = Any


def _softplus_inv(y):
    # log(exp(y) - 1), stable for large and small y.
    return y + jnp.log(-jnp.expm1(-y))


def _logit(p):
    return jnp.log(p) - jnp.log1p(-p)


@dataclasses.dataclass(frozen=True, eq=False)
class Hyperparameter:
    """One entry of a space: a constrained hyperparameter (scalar or array) and its transform.

    Build it with :func:`log`, :func:`unit`, :func:`bounded` or :func:`real`.
    """

    kind: str  # "log", "linear" or "real"
    value: np.ndarray  # initial constrained value
    lower: float | None = None
    upper: float | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    def _check(self) -> None:
        v, lo, hi = self.value, self.lower, self.upper
        desc = (
            f"{self.kind if self.kind != 'linear' else 'bounded'}(init={_short(v)}, "
            f"lower={lo}, upper={hi})"
        )
        if not np.issubdtype(v.dtype, np.floating):
            raise ValueError(f"{desc}: init must be a real number or array, got dtype {v.dtype}")
        if not np.all(np.isfinite(v)):
            raise ValueError(f"{desc}: init must be finite")
        for name, b in (("lower", lo), ("upper", hi)):
            if b is not None and not math.isfinite(b):
                raise ValueError(f"{desc}: {name} must be finite or None, got {b}")
        if lo is not None and hi is not None and not lo < hi:
            raise ValueError(f"{desc}: lower must be < upper")
        if self.kind == "log":
            if lo is not None and lo <= 0:
                raise ValueError(f"{desc}: a log-scale lower bound must be > 0")
            if hi is not None and hi <= 0:
                raise ValueError(f"{desc}: a log-scale upper bound must be > 0")
            if np.any(v <= 0):
                raise ValueError(f"{desc}: a log-scale init must be > 0")
        if lo is not None and np.any(v <= lo):
            raise ValueError(f"{desc}: init must be strictly above lower={lo}")
        if hi is not None and np.any(v >= hi):
            raise ValueError(f"{desc}: init must be strictly below upper={hi}")

    def constrain(self, u: jax.Array) -> jax.Array:
        """Map an unconstrained array to the hyperparameter's value."""
        lo, hi = self.lower, self.upper
        if self.kind == "real":
            return u
        if self.kind == "log":
            if lo is None and hi is None:
                return jnp.exp(u)
            if hi is None:
                return jnp.exp(math.log(lo) + jax.nn.softplus(u))
            if lo is None:
                return jnp.exp(math.log(hi) - jax.nn.softplus(-u))
            return jnp.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * jax.nn.sigmoid(u))
        if lo is None and hi is None:
            return u
        if hi is None:
            return lo + jax.nn.softplus(u)
        if lo is None:
            return hi - jax.nn.softplus(-u)
        return lo + (hi - lo) * jax.nn.sigmoid(u)

    def unconstrain(self, value: jax.Array) -> jax.Array:
        """Inverse of :meth:`constrain`."""
        lo, hi = self.lower, self.upper
        if self.kind == "real":
            return value
        if self.kind == "log":
            x = jnp.log(value)
            lo = None if lo is None else math.log(lo)
            hi = None if hi is None else math.log(hi)
        else:
            x = value
        if lo is None and hi is None:
            return x
        if hi is None:
            return _softplus_inv(x - lo)
        if lo is None:
            return -_softplus_inv(hi - x)
        return _logit((x - lo) / (hi - lo))

    def __repr__(self) -> str:
        kind = "bounded" if self.kind == "linear" else self.kind
        return f"{kind}(init={_short(self.value)}, lower={self.lower}, upper={self.upper})"


def _short(v: np.ndarray) -> str:
    return f"{float(v):g}" if v.ndim == 0 else f"array{list(v.shape)}"


def _is_narrow_float(dtype: Any) -> bool:
    """Whether ``dtype`` is a floating type narrower than float32 (float16, bfloat16, ...)."""
    return jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize < 4


def _at_least_float32(x: Any) -> jax.Array:
    """``x`` as a JAX array, cast to float32 when it is a narrower float (bfloat16, float16)."""
    x = jnp.asarray(x)
    return x.astype(jnp.float32) if _is_narrow_float(x.dtype) else x


def _as_array(init: Any) -> np.ndarray:
    if isinstance(init, jax.core.Tracer):
        raise TypeError(
            "a hyperparameter spec needs a concrete init value, not a traced one; "
            "build spaces outside jit"
        )
    try:
        v = np.asarray(init)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"init must be a number or an array of numbers, got {init!r} ({e})"
        ) from None
    if not (
        np.issubdtype(v.dtype, np.number) or v.dtype == bool or _is_narrow_float(v.dtype)
    ) or np.issubdtype(v.dtype, np.complexfloating):
        raise TypeError(
            f"init must be a real number or an array of real numbers, got {init!r} "
            f"(dtype {v.dtype})"
        )
    if np.issubdtype(v.dtype, np.integer) or v.dtype == bool:
        v = v.astype(np.float32)
    if _is_narrow_float(v.dtype):
        v = v.astype(np.float32)  # hyperparameters are never stored below float32
    if v.dtype == np.float64 and not jax.config.jax_enable_x64:
        v = v.astype(np.float32)
    return v


def _bound(b: Any, name: str) -> float | None:
    if b is None:
        return None
    try:
        return float(b)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number or None, got {b!r}") from None


def _make(kind: str, init: Any, lower: Any, upper: Any) -> Hyperparameter:
    hp = Hyperparameter(kind, _as_array(init), _bound(lower, "lower"), _bound(upper, "upper"))
    hp._check()
    return hp


def log(init: Any, lower: float | None = None, upper: float | None = None) -> Hyperparameter:
    """A positive hyperparameter searched on a log scale (weight decay, learning rate, noise).

    Args:
      init: initial value(s), > 0; scalar or array.
      lower: optional lower bound (> 0).
      upper: optional upper bound.

    Returns:
      A :class:`Hyperparameter` spec.
    """
    return _make("log", init, lower, upper)


def unit(init: Any, lower: float = 0.0, upper: float = 1.0) -> Hyperparameter:
    """A hyperparameter in an open interval, default ``(0, 1)`` (dropout rate, mixing weight).

    Args:
      init: initial value(s), strictly inside ``(lower, upper)``.
      lower, upper: the interval.

    Returns:
      A :class:`Hyperparameter` spec (scaled sigmoid).
    """
    return _make("linear", init, lower, upper)


def bounded(init: Any, lower: float | None, upper: float | None) -> Hyperparameter:
    """A hyperparameter in ``(lower, upper)``; one side may be ``None`` (softplus form).

    Args:
      init: initial value(s), strictly inside the bounds.
      lower, upper: bounds; ``None`` for an open side.

    Returns:
      A :class:`Hyperparameter` spec.
    """
    return _make("linear", init, lower, upper)


def real(init: Any) -> Hyperparameter:
    """An unconstrained real hyperparameter (identity transform).

    Args:
      init: initial value(s).

    Returns:
      A :class:`Hyperparameter` spec.
    """
    return _make("real", init, None, None)


@dataclasses.dataclass(frozen=True, eq=False)
class Discrete:
    """A discrete hyperparameter: one of a list of numbers, or an integer in a range.

    Build it with :func:`choice` or :func:`integer`. It has no unconstrained form, so gradient
    tuners refuse it; :mod:`bilevel.pbt` explores it by resampling or by moving to a neighbour.

    Attributes:
      kind: ``"choice"`` or ``"integer"``.
      choices: the options in order (``choice``), or ``None`` (``integer``).
      lower, upper: the inclusive range of an ``integer`` (for ``choice``: ``0`` and the last
        index).
      value: the initial value (a NumPy scalar).
    """

    kind: str  # "choice" or "integer"
    choices: np.ndarray | None
    lower: int
    upper: int
    value: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return ()

    @property
    def dtype(self) -> np.dtype:
        """The dtype of the values a loss receives (``int32`` or ``float32``)."""
        return self.value.dtype

    @property
    def num_options(self) -> int:
        """How many values the hyperparameter can take."""
        return self.upper - self.lower + 1

    def index(self, value: Any) -> np.ndarray:
        """Position of ``value`` among the options (NumPy; raises on a value that is none)."""
        v = np.asarray(value)
        if self.kind == "integer":
            if np.any(v != np.round(v)) or np.any(v < self.lower) or np.any(v > self.upper):
                raise ValueError(f"{self!r}: {value!r} is not an integer in the range")
            return (v - self.lower).astype(np.int32)
        hit = v[..., None] == self.choices
        if not np.all(hit.any(-1)):
            raise ValueError(f"{self!r}: {value!r} is not one of the choices")
        return hit.argmax(-1).astype(np.int32)

    def decode(self, index: jax.Array) -> jax.Array:
        """The value at option position ``index`` (traceable)."""
        if self.kind == "integer":
            return (index + self.lower).astype(self.dtype)
        return jnp.asarray(self.choices)[index]

    def decode_numpy(self, index: Any) -> np.ndarray:
        """:meth:`decode` in NumPy (nothing to compile)."""
        index = np.asarray(index)
        if self.kind == "integer":
            return (index + self.lower).astype(self.dtype)
        return self.choices[index]

    def __repr__(self) -> str:
        if self.kind == "integer":
            return f"integer({self.lower}, {self.upper}, init={self.value.item()})"
        return f"choice({self.choices.tolist()}, init={self.value.item()})"


def _numbers(values: Any, what: str) -> np.ndarray:
    if isinstance(values, jax.core.Tracer):
        raise TypeError(
            f"{what} must be concrete numbers, not traced values; build spaces outside jit"
        )
    try:
        v = np.asarray(values)
    except (TypeError, ValueError):
        v = np.asarray(values, dtype=object)
    if v.dtype == bool:
        v = v.astype(np.int32)
    if not (np.issubdtype(v.dtype, np.integer) or np.issubdtype(v.dtype, np.floating)):
        raise TypeError(
            f"{what} must be real numbers, got {values!r}; encode other alternatives as integers "
            "(choice([0, 1, 2]) and jax.lax.switch on the value)"
        )
    if np.issubdtype(v.dtype, np.integer):
        return v.astype(np.int32)
    return v.astype(np.float32 if not jax.config.jax_enable_x64 else v.dtype)


def choice(values: Any, init: Any = None) -> Discrete:
    """A hyperparameter that takes one of ``values`` (numbers, in a meaningful order).

    PBT's explore step resamples it uniformly or moves it to a neighbouring entry of ``values``
    (so order them: ``[32, 64, 128]``, not ``[64, 32, 128]``). A switch between alternatives is
    ``choice([0, 1, 2])`` read with ``jax.lax.switch``.

    Args:
      values: a non-empty 1-D sequence of distinct real numbers (integers give ``int32`` values,
        otherwise ``float32``).
      init: the initial value, one of ``values`` (default ``values[0]``).

    Returns:
      A :class:`Discrete` spec.

    Example:
      >>> from bilevel import hparams
      >>> hparams.choice([32, 64, 128], init=64)
      choice([32, 64, 128], init=64)
    """
    v = _numbers(values, "choice values")
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"choice values must be a non-empty 1-D sequence, got {values!r}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"choice values must be finite, got {values!r}")
    if len(np.unique(v)) != v.size:
        raise ValueError(f"choice values must be distinct, got {values!r}")
    spec = Discrete("choice", v, 0, v.size - 1, v[0])
    if init is None:
        return spec
    idx = int(spec.index(_numbers(init, "choice init")))
    return dataclasses.replace(spec, value=v[idx])


def integer(lower: int, upper: int, init: int | None = None) -> Discrete:
    """An integer hyperparameter in ``[lower, upper]`` (both included).

    PBT's explore step resamples it uniformly or scales it by the perturbation factor, rounded
    and moved by at least one, then clipped to the range.

    Args:
      lower, upper: the inclusive range, ``lower <= upper``.
      init: the initial value (default ``lower``).

    Returns:
      A :class:`Discrete` spec (``int32`` values).

    Example:
      >>> from bilevel import hparams
      >>> hparams.integer(1, 8, init=4)
      integer(1, 8, init=4)
    """
    bounds = []
    for name, b in (("lower", lower), ("upper", upper)):
        if isinstance(b, bool) or not isinstance(b, int | np.integer):
            raise TypeError(f"integer(): {name} must be a Python or NumPy int, got {b!r}")
        bounds.append(int(b))
    lo, hi = bounds
    if lo > hi:
        raise ValueError(f"integer(): lower={lo} must be <= upper={hi}")
    if max(abs(lo), abs(hi)) >= 2**31 - 1:
        raise ValueError(f"integer(): the range [{lo}, {hi}] does not fit int32")
    spec = Discrete("integer", None, lo, hi, np.asarray(lo, np.int32))
    if init is None:
        return spec
    if isinstance(init, bool) or not isinstance(init, int | np.integer):
        raise TypeError(f"integer(): init must be an int, got {init!r}")
    spec.index(init)  # range check
    return dataclasses.replace(spec, value=np.asarray(init, np.int32))


def _is_spec(x: Any) -> bool:
    return isinstance(x, Hyperparameter | Discrete)


def _path_str(path) -> str:
    return "hparams" + "".join(str(k) for k in path)


def _leaves(space: PyTree):
    """``([(path, spec)], treedef)`` of a space of continuous and discrete specs."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(space, is_leaf=_is_spec)
    if not leaves:
        raise ValueError("the hyperparameter space is empty")
    for path, leaf in leaves:
        if not _is_spec(leaf):
            raise TypeError(
                f"{_path_str(path)} is {leaf!r}, not a hyperparameter spec: wrap it with "
                "bilevel.hparams.log/unit/bounded/real (or choice/integer for bilevel.pbt)"
            )
    return leaves, treedef


def _specs(space: PyTree):
    """The leaves of a space of continuous specs: a discrete one is refused, named."""
    leaves, treedef = _leaves(space)
    for path, leaf in leaves:
        if isinstance(leaf, Discrete):
            raise ValueError(
                f"{_path_str(path)} is a discrete hyperparameter ({leaf!r}): it cannot be tuned "
                "by hypergradient; manage it with bilevel.pbt (put it in the PBT space and in "
                "the tuner's fixed_hparams)"
            )
    return leaves, treedef


def init(space: PyTree) -> PyTree:
    """The unconstrained parameters of a space at its initial values (``jnp`` arrays).

    Args:
      space: pytree of :class:`Hyperparameter` specs.

    Returns:
      A pytree of the same structure holding unconstrained arrays.
    """
    leaves, treedef = _specs(space)
    out = []
    for path, spec in leaves:
        # Specs hold concrete values: evaluate eagerly even when called under jit.
        with jax.ensure_compile_time_eval():
            u = spec.unconstrain(jnp.asarray(spec.value))
            finite = bool(jnp.all(jnp.isfinite(u)))
        if not finite:
            raise ValueError(
                f"{_path_str(path)}: {spec!r} is too close to a bound to be "
                "represented in its dtype"
            )
        out.append(u)
    return jax.tree.unflatten(treedef, out)


def _check_values(space, tree, what):
    leaves, treedef = _specs(space)
    try:
        values = treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"{what} does not match the space: expected structure {treedef}, got "
            f"{jax.tree.structure(tree)} ({e})"
        ) from None
    for (path, spec), v in zip(leaves, values, strict=True):
        if jnp.shape(v) != spec.shape:
            raise ValueError(
                f"{what}: {_path_str(path)} has shape {jnp.shape(v)}, the space says {spec.shape}"
            )
    return leaves, treedef, values


def constrain(space: PyTree, u: PyTree) -> PyTree:
    """Constrained hyperparameter values from unconstrained parameters ``u``.

    Args:
      space: pytree of specs.
      u: unconstrained pytree of the same structure (e.g. from :func:`init`).

    Returns:
      The values, same structure.
    """
    leaves, treedef, values = _check_values(space, u, "unconstrained hyperparameters")
    return jax.tree.unflatten(
        treedef, [spec.constrain(x) for (_, spec), x in zip(leaves, values, strict=True)]
    )


def unconstrain(space: PyTree, values: PyTree) -> PyTree:
    """Unconstrained parameters for given constrained values (inverse of :func:`constrain`).

    Useful to start a population of tuners at chosen values. Values narrower than float32
    (bfloat16, float16) are cast to float32 first: hyperparameters are never stored below it.
    """
    leaves, treedef, vals = _check_values(space, values, "hyperparameter values")
    return jax.tree.unflatten(
        treedef,
        [spec.unconstrain(_at_least_float32(x)) for (_, spec), x in zip(leaves, vals, strict=True)],
    )
