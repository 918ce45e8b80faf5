"""Validation of static arguments, shared by ``solvers`` and ``bilevel``.

Python, NumPy and (concrete) JAX scalars are all valid numbers: ``np.int64(20)``,
``np.float32(0.9)`` and ``jnp.asarray(1e-6)`` pass wherever ``20``, ``0.9`` and ``1e-6`` do.
Errors are ``ValueError`` / ``TypeError`` naming the argument, what it must be and what it got.

Example:
  >>> import numpy as np
  >>> from solvers import checks
  >>> checks.integer("maxiter", np.int64(20))
  20
  >>> checks.number("tol", np.float32(0.5), low=0.0)
  0.5
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

__all__ = ["integer", "number", "optional_integer", "optional_number"]


def _scalar(value: Any) -> Any:
    """A Python scalar for Python/NumPy/JAX scalars; ``value`` unchanged otherwise."""
    if isinstance(value, bool | np.bool_):
        return value
    if isinstance(value, numbers.Number):
        return value
    shape = getattr(value, "shape", None)
    if shape == () and hasattr(value, "dtype"):
        try:
            return np.asarray(value).item()  # concrete JAX or NumPy 0-d array
        except Exception:  # a tracer: not a static number
            return value
    return value


def integer(name: str, value: Any, low: int = 1, high: int | None = None) -> int:
    """``value`` as a Python ``int`` in ``[low, high]``, or a clear ``ValueError``/``TypeError``.

    Args:
      name: the argument's name, for the message.
      value: a Python, NumPy or concrete JAX integer (``bool`` is refused).
      low: smallest allowed value.
      high: largest allowed value (``None``: no limit).

    Returns:
      ``int(value)``.
    """
    v = _scalar(value)
    if isinstance(v, bool | np.bool_) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= {low}, got {value!r}")
    v = int(v)
    if v < low or (high is not None and v > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an integer {bound}, got {v}")
    return v


def optional_integer(name: str, value: Any, low: int = 1) -> int | None:
    """:func:`integer`, or ``None`` passed through."""
    return None if value is None else integer(name, value, low)


def number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite Python ``float`` within the bounds, or a clear error.

    Args:
      name: the argument's name, for the message.
      value: a Python, NumPy or concrete JAX real scalar (``bool`` is refused).
      low, high: bounds (``None``: unbounded on that side).
      low_open, high_open: exclude the bound itself.

    Returns:
      ``float(value)``.
    """
    v = _scalar(value)
    if isinstance(v, bool | np.bool_) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    v = float(v)
    lo = "" if low is None else (f"> {low}" if low_open else f">= {low}")
    hi = "" if high is None else (f"< {high}" if high_open else f"<= {high}")
    want = " and ".join(s for s in (lo, hi) if s) or "finite"
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number ({want}), got {v}")
    if low is not None and (v <= low if low_open else v < low):
        raise ValueError(f"{name} must be {want}, got {v}")
    if high is not None and (v >= high if high_open else v > high):
        raise ValueError(f"{name} must be {want}, got {v}")
    return v


def optional_number(name: str, value: Any, **bounds: Any) -> float | None:
    """:func:`number`, or ``None`` passed through."""
    return None if value is None else number(name, value, **bounds)
