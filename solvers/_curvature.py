r"""Curvature matrices for the implicit system: the generalized Gauss-Newton matrix.

The implicit hypergradient solves :math:`A v = \nabla_w L_V` with :math:`A` the inner Hessian
:math:`\nabla^2_{ww} L`. Away from a minimum of a network's training loss that Hessian is
indefinite and conjugate gradients breaks down. When the inner loss is an output loss of a model
plus a regularizer,

.. math:: L(w) = \ell\big(f(w)\big) + r(w),

the generalized Gauss-Newton matrix (Schraudolph, 2002; Martens, 2010) drops the term of the
Hessian that carries the model's second derivatives:

.. math:: \nabla^2 L = J^\top H_\ell J + \sum_k \frac{\partial \ell}{\partial f_k}
   \nabla^2 f_k + \nabla^2 r
   \quad\longrightarrow\quad
   G = J^\top H_\ell J + \nabla^2 r,

with :math:`J = \partial f / \partial w` and :math:`H_\ell = \nabla^2_{ff} \ell`. ``G`` is
positive semidefinite whenever :math:`\ell` is convex in the outputs (squared error, softmax
cross-entropy) and :math:`r` is convex (weight decay), whatever the model; it equals the Hessian
for a linear model. ``G v`` is one Jacobian-vector product, one Hessian-vector product of the
output loss (on the outputs, cheap) and one vector-Jacobian product: no matrix is ever formed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any

__all__ = ["GaussNewton", "gauss_newton"]


@dataclasses.dataclass(frozen=True)
class GaussNewton:
    r"""Generalized Gauss-Newton curvature :math:`G = J^\top H_\ell J + \nabla^2 r`.

    For an inner loss :math:`L(w, \cdot) = \ell(f(w, \cdot), \cdot) + r(w, \cdot)` given as its
    two (three) pieces. Pass it as ``solvers.Implicit(curvature=...)``: the implicit system's
    matrix becomes ``G`` (positive semidefinite for a convex ``output_loss`` and ``regularizer``)
    while its right-hand side, the mixed derivative of the inner gradient, is unchanged.

    .. math:: G v = J^\top \big(H_\ell\, (J v)\big) + \nabla^2 r\, v,
       \qquad J = \partial_w f(w, \cdot),\quad H_\ell = \nabla^2_{ff}\, \ell

    computed as ``jax.jvp`` of the model, a Hessian-vector product of the output loss, and
    ``jax.vjp`` of the model (no dense matrix).

    The pieces take the inner loss's own arguments after ``params``: ``(h, batch)`` for
    ``bilevel`` losses ``loss(params, h, batch)``, ``(h, batch, model_state)`` for stateful ones
    (``has_state=True``; ``model_fn`` then returns the outputs only, dropping the new state).
    :meth:`loss` is the inner loss they define: use it (or a loss equal to it) as the inner
    loss, so that the curvature belongs to the function being minimized.

    Args:
      model_fn: ``model_fn(params, *args) -> outputs`` (any pytree of arrays, e.g. logits).
      output_loss: ``output_loss(outputs, *args) -> scalar``, e.g. the mean cross-entropy of
        the batch's labels; convex in ``outputs`` for ``G`` to be positive semidefinite.
      regularizer: optional ``regularizer(params, *args) -> scalar`` whose exact Hessian is
        added (weight decay ``sum_l h_l ||W_l||^2``: convex, so ``G`` stays semidefinite).

    Example:
      >>> import jax.numpy as jnp, solvers
      >>> model = lambda w, x: jnp.tanh(x @ w)
      >>> sq = lambda out, x: 0.5 * jnp.sum(out ** 2)
      >>> gn = solvers.GaussNewton(model, sq)
      >>> x, w = jnp.eye(2), jnp.array([0.0, 0.0])
      >>> gn.matvec(w, x)(jnp.array([1.0, 2.0]))       # J = I at w = 0: G = I
      Array([1., 2.], dtype=float32)

    References: N. Schraudolph, "Fast curvature matrix-vector products for second-order gradient
    descent", Neural Computation 2002; J. Martens, "Deep learning via Hessian-free
    optimization", ICML 2010.
    """

    model_fn: Callable
    output_loss: Callable
    regularizer: Callable | None = None

    def __post_init__(self):
        for name in ("model_fn", "output_loss"):
            if not callable(getattr(self, name)):
                raise TypeError(
                    f"GaussNewton: {name} must be callable, got {getattr(self, name)!r}"
                )
        if self.regularizer is not None and not callable(self.regularizer):
            raise TypeError(
                "GaussNewton: regularizer must be callable regularizer(params, *args) -> scalar "
                f"or None, got {self.regularizer!r}"
            )

    def loss(self, params: PyTree, *args: Any) -> jax.Array:
        r"""The inner loss these pieces define, :math:`\ell(f(w, \cdot), \cdot) + r(w, \cdot)`.

        Args:
          params: the parameters ``w``.
          *args: the loss's other arguments (``h, batch`` in ``bilevel``).

        Returns:
          The scalar loss.
        """
        value = self.output_loss(self.model_fn(params, *args), *args)
        if self.regularizer is not None:
            value = value + self.regularizer(params, *args)
        return value

    def matvec(self, params: PyTree, *args: Any) -> Callable[[PyTree], PyTree]:
        r"""The product ``v -> G v`` at ``params`` (linearized once, applied many times).

        .. math:: G v = J^\top H_\ell J v + \nabla^2 r\, v

        Args:
          params: the point ``w`` (a pytree).
          *args: the other arguments of the pieces (``h, batch`` in ``bilevel``).

        Returns:
          A linear function from pytrees shaped like ``params`` to the same.
        """
        outputs, jvp_fn = jax.linearize(lambda p: self.model_fn(p, *args), params)
        _, vjp_fn = jax.vjp(lambda p: self.model_fn(p, *args), params)
        out_grad = jax.grad(lambda o: self.output_loss(o, *args))

        def output_hvp(u):
            return jax.jvp(out_grad, (outputs,), (u,))[1]

        if self.regularizer is not None:
            reg_grad = jax.grad(lambda p: self.regularizer(p, *args))

            def reg_hvp(v):
                return jax.jvp(reg_grad, (params,), (v,))[1]

        def mv(v):
            (gv,) = vjp_fn(output_hvp(jvp_fn(v)))
            if self.regularizer is not None:
                gv = jax.tree.map(jnp.add, gv, reg_hvp(v))
            return gv

        return mv


gauss_newton = GaussNewton
"""Generalized Gauss-Newton curvature: ``solvers.gauss_newton(model_fn, output_loss)``; the
class :class:`GaussNewton`."""
