r"""FedHyper's learning-rate schedulers: hypergradients of the global and local learning rates.

Wang, Wang and Li, "FedHyper: A Universal and Robust Learning Rate Scheduler for Federated
Learning with Hypergradient Descent", ICLR 2024, https://arxiv.org/abs/2310.03156, reference code
https://github.com/ATP-1010/FedHyper. Notation: :math:`\Delta_t = \bar w_t - x_t` the average of
the sampled clients' updates in round :math:`t` (the negative pseudo-gradient), :math:`s_t` the
server optimizer's update computed from :math:`-\Delta_t` (:math:`s_t = \Delta_t` for FedAvg's
``optax.sgd(1.0)``), :math:`x_{t+1} = x_t + u_t` the global model. As in hypergradient descent
(Baydin et al., 2018), :math:`-\langle \Delta_{t-1}, \Delta_t \rangle` is the derivative of the
round-:math:`t` objective with respect to the global learning rate used in round :math:`t-1`:
when consecutive updates agree, the rate grows.

The schedulers are small immutable configurations; :class:`bilevel.fed.Federated` calls them. The
server-side ones (:func:`global_lr`, :func:`global_momentum_lr`, :func:`server_local_lr`) act
once per round on :math:`\Delta_t`; the client-side one (:func:`client_local_lr`) acts inside
every client's local steps. Pass one, or a server-side and a client-side one together
(``scheduler=(fed.global_momentum_lr(), fed.client_local_lr())`` is the reference code's
"FedHyper-FULL").
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from bilevel._hd import _check_bounds, _lr_dtype
from solvers import checks
from solvers import tree as T

__all__ = [
    "ClientLocalLR",
    "FedHyperState",
    "GlobalLR",
    "GlobalMomentumLR",
    "ServerLocalLR",
    "client_local_lr",
    "global_lr",
    "global_momentum_lr",
    "server_local_lr",
]

PyTree = Any


class FedHyperState(NamedTuple):
    r"""State of a server-side FedHyper scheduler, carried from round to round.

    Attributes:
      agg: the accumulated hypergradient :math:`a_t` (a scalar): the global rate is
        :math:`1 + a_t` (:func:`global_lr`, :func:`global_momentum_lr`); the clients' rate is
        :math:`\alpha_0 (1 + a_t)`, clipped (:func:`server_local_lr`).
      momentum: :func:`global_momentum_lr` only (else ``None``): the momentum :math:`m_{t-1}` of
        the server updates, shaped like the parameters.
    """

    agg: jax.Array
    momentum: PyTree = None


class RoundSignals(NamedTuple):
    """What a server-side scheduler reports for one round (the round's metrics)."""

    hypergrad: jax.Array
    global_learning_rate: jax.Array


def _bounds(name: str, bounds: Any, low: float | None = None) -> tuple[float, float]:
    checked = _check_bounds(name, bounds)
    if checked is None or None in checked:
        raise TypeError(f"{name} must be a pair of numbers (lo, hi), got {bounds!r}")
    lo, hi = checked
    if low is not None and lo < low:
        raise ValueError(f"{name} must have lo >= {low}, got {bounds!r}")
    return lo, hi


class _ServerScheduler:
    side: ClassVar[str] = "server"

    def init(self, params: PyTree) -> FedHyperState:
        """The state before the first round (:math:`a_0 = 0`)."""
        return FedHyperState(jnp.zeros((), _lr_dtype(params)))


@dataclasses.dataclass(frozen=True)
class GlobalLR(_ServerScheduler):
    r"""FedHyper-G: the global learning rate adapted by the hypergradient of consecutive rounds.

    .. math::

      h_t = \langle \Delta_{t-1}, \Delta_t \rangle, \qquad
      a_t = \operatorname{clip}\big(a_{t-1} + \beta h_t,\ lo - 1,\ hi - 1\big), \qquad
      u_t = (1 + a_t)\, s_t,

    with :math:`a_0 = 0`, :math:`\Delta_{-1} = 0` (the first round is FedAvg's) and
    :math:`\beta` = ``hyper_lr``: the effective global rate :math:`\eta_t = 1 + a_t` stays in
    ``lr_bounds``. Build it with :func:`global_lr`.
    """

    hyper_lr: float = 1.0
    lr_bounds: tuple[float, float] = (0.2, 5.0)

    def __post_init__(self):
        object.__setattr__(self, "hyper_lr", checks.number("hyper_lr", self.hyper_lr, low=0.0))
        lo, hi = _bounds("lr_bounds", self.lr_bounds)
        if not lo <= 1.0 <= hi:
            raise ValueError(f"lr_bounds must contain the initial global rate 1, got {(lo, hi)}")
        object.__setattr__(self, "lr_bounds", (lo, hi))

    def server(self, state, delta, prev_delta, update, learning_rate, initial_learning_rate):
        """One round: ``(update, state, client learning rate, RoundSignals)``."""
        del initial_learning_rate
        h = T.tree_vdot(prev_delta, delta).astype(state.agg.dtype)
        lo, hi = self.lr_bounds
        agg = jnp.clip(state.agg + self.hyper_lr * h, lo - 1.0, hi - 1.0)
        eta = 1.0 + agg
        update = T.tree_scale(eta, update)
        return update, FedHyperState(agg), learning_rate, RoundSignals(h, eta)


@dataclasses.dataclass(frozen=True)
class GlobalMomentumLR(_ServerScheduler):
    r"""FedHyper-GM: the global learning rate with momentum, the reference code's rule.

    .. math::

      h_t = \langle m_{t-1}, \Delta_t \rangle, \quad
      a_t = \operatorname{clip}\big(a_{t-1} + \beta h_t,\ lo - 1,\ hi - 1\big), \quad
      m_t = s_t + \mu\, m_{t-1}, \quad
      u_t = s_t + a_t\, m_t,

    with :math:`a_0 = 0`, :math:`m_{-1} = 0`, :math:`\beta` = ``hyper_lr`` and :math:`\mu` =
    ``momentum``; the reported global rate is :math:`1 + a_t`. With FedAvg's server
    (:math:`s_t = \Delta_t`) this is the code's
    ``x + Delta + agg * Delta + 0.9 * agg * last``: the momentum enters in proportion to
    :math:`a_t`, so :math:`a_t = 0` is plain FedAvg. Build it with :func:`global_momentum_lr`.
    """

    hyper_lr: float = 1.0
    momentum: float = 0.9
    lr_bounds: tuple[float, float] = (0.8, 5.0)

    def __post_init__(self):
        object.__setattr__(self, "hyper_lr", checks.number("hyper_lr", self.hyper_lr, low=0.0))
        object.__setattr__(
            self,
            "momentum",
            checks.number("momentum", self.momentum, low=0.0, high=1.0, high_open=True),
        )
        lo, hi = _bounds("lr_bounds", self.lr_bounds)
        if not lo <= 1.0 <= hi:
            raise ValueError(f"lr_bounds must contain the initial global rate 1, got {(lo, hi)}")
        object.__setattr__(self, "lr_bounds", (lo, hi))

    def init(self, params: PyTree) -> FedHyperState:
        """The state before the first round (:math:`a_0 = 0`, :math:`m_{-1} = 0`)."""
        return FedHyperState(jnp.zeros((), _lr_dtype(params)), T.tree_zeros_like(params))

    def server(self, state, delta, prev_delta, update, learning_rate, initial_learning_rate):
        """One round: ``(update, state, client learning rate, RoundSignals)``."""
        del prev_delta, initial_learning_rate
        h = T.tree_vdot(state.momentum, delta).astype(state.agg.dtype)
        lo, hi = self.lr_bounds
        agg = jnp.clip(state.agg + self.hyper_lr * h, lo - 1.0, hi - 1.0)
        momentum = T.tree_add_scaled(update, self.momentum, state.momentum)
        update = T.tree_add_scaled(update, agg, momentum)
        return update, FedHyperState(agg, momentum), learning_rate, RoundSignals(h, 1.0 + agg)


@dataclasses.dataclass(frozen=True)
class ServerLocalLR(_ServerScheduler):
    r"""FedHyper-SL: the server sets the clients' local learning rate from the global signal.

    .. math::

      h_t = \langle \Delta_{t-1}, \Delta_t \rangle, \qquad
      a_t = a_{t-1} + \beta h_t, \qquad
      \alpha_{t+1} = \operatorname{clip}\big(\alpha_0 (1 + a_t),\ lo,\ hi\big),

    with :math:`a_0 = 0`, :math:`\Delta_{-1} = 0`, :math:`\alpha_0` the initial local rate and
    :math:`\beta` = ``hyper_lr``; :math:`a_t` itself is not clipped, and the global update is
    the server optimizer's :math:`u_t = s_t`. Default bounds ``(0.001, 0.1)`` as in the reference
    code, which computes these rates but resets every client's rate to :math:`\alpha_0` before
    the next round (so that its SL runs as FedAvg); here :math:`\alpha_{t+1}` is used in round
    :math:`t + 1`, as the paper describes. Build it with :func:`server_local_lr`.
    """

    hyper_lr: float = 1.0
    lr_bounds: tuple[float, float] = (0.001, 0.1)

    def __post_init__(self):
        object.__setattr__(self, "hyper_lr", checks.number("hyper_lr", self.hyper_lr, low=0.0))
        lo, hi = _bounds("lr_bounds", self.lr_bounds)
        if not lo > 0:
            raise ValueError(f"lr_bounds must be positive learning rates, got {(lo, hi)}")
        object.__setattr__(self, "lr_bounds", (lo, hi))

    def server(self, state, delta, prev_delta, update, learning_rate, initial_learning_rate):
        """One round: ``(update, state, client learning rate, RoundSignals)``."""
        h = T.tree_vdot(prev_delta, delta).astype(state.agg.dtype)
        agg = state.agg + self.hyper_lr * h
        lo, hi = self.lr_bounds
        rate = jnp.clip(initial_learning_rate * (1.0 + agg), lo, hi)
        rate = rate.astype(jnp.result_type(learning_rate))
        return update, FedHyperState(agg), rate, RoundSignals(h, jnp.ones_like(agg))


@dataclasses.dataclass(frozen=True)
class ClientLocalLR:
    r"""FedHyper-CL: each client adapts its local rate at every local step, the code's rule.

    In round :math:`t` client :math:`i` starts from the rate :math:`\alpha_t` with the factor
    :math:`b_0 = 1` and :math:`p = \Delta_{t-1}`; its local step :math:`k` moves its parameters
    by :math:`v_k = -\alpha_t b_k d_k` (:math:`d_k` the client direction). After the step, unless
    it is the first step of a local epoch,

    .. math::

      x_k = \frac{c}{m} \langle v_k, \Delta_{t-1} \rangle, \quad
      y_k = \langle v_k, p \rangle, \quad
      \gamma_k = \min(\gamma_{max},\ 1 + x_k + y_k), \quad
      b_{k+1} = \operatorname{clip}(\gamma_k b_k,\ lo,\ hi), \quad p \leftarrow v_k,

    with :math:`c` = ``global_weight``, :math:`m` the clients per round and :math:`\gamma_{max}`
    = ``max_growth``; otherwise :math:`b_{k+1} = b_k` and :math:`p` is kept. The factor is not
    carried to the next round. This transcribes the reference code (``update.py``), including
    its quirks: the first batch of every local epoch does not adapt (its counter is reset per
    epoch), and the first comparison of a round is with the previous global update
    :math:`\Delta_{t-1}`. Build it with :func:`client_local_lr`.
    """

    global_weight: float = 0.1
    max_growth: float = 1.1
    factor_bounds: tuple[float, float] = (0.1, 10.0)
    side: ClassVar[str] = "client"

    def __post_init__(self):
        object.__setattr__(
            self, "global_weight", checks.number("global_weight", self.global_weight)
        )
        object.__setattr__(
            self, "max_growth", checks.number("max_growth", self.max_growth, low=1.0)
        )
        lo, hi = _bounds("factor_bounds", self.factor_bounds)
        if not lo > 0 or not lo <= 1.0 <= hi:
            raise ValueError(
                f"factor_bounds must be positive and contain the initial factor 1, got {(lo, hi)}"
            )
        object.__setattr__(self, "factor_bounds", (lo, hi))

    def init(self, params: PyTree) -> None:
        """No state outlives a round."""
        del params

    def local(self, factor, prev, step_update, global_update, clients_per_round):
        """The factor and the previous local update after one adapted local step."""
        x = self.global_weight * T.tree_vdot(step_update, global_update) / clients_per_round
        y = T.tree_vdot(step_update, prev)
        gamma = jnp.minimum(self.max_growth, 1.0 + x + y).astype(factor.dtype)
        lo, hi = self.factor_bounds
        return jnp.clip(gamma * factor, lo, hi), step_update


def global_lr(hyper_lr: float = 1.0, lr_bounds: tuple[float, float] = (0.2, 5.0)) -> GlobalLR:
    r"""FedHyper-G: the server's learning rate :math:`\eta_t = 1 + a_t` by hypergradient descent.

    .. math::

      a_t = \operatorname{clip}\big(a_{t-1} + \beta \langle \Delta_{t-1}, \Delta_t \rangle,\
      lo - 1,\ hi - 1\big), \qquad x_{t+1} = x_t + (1 + a_t)\, s_t

    (:class:`GlobalLR`). The reference code clips :math:`a_t` to ``[-0.8, 4]`` (the default
    ``lr_bounds=(0.2, 5.0)`` on :math:`\eta_t`) and has no :math:`\beta` (``hyper_lr=1``). The
    inner product is of raw parameter updates, so :math:`\beta` has units: rescaling the model
    or the local rate changes the adaptation speed.

    Args:
      hyper_lr: :math:`\beta \ge 0` (0: FedAvg).
      lr_bounds: ``(lo, hi)`` bounds of the global rate :math:`\eta_t`, containing 1.

    Returns:
      A :class:`GlobalLR` for ``Federated(..., scheduler=...)``.

    Example:
      >>> from bilevel import fed
      >>> fed.global_lr().lr_bounds
      (0.2, 5.0)
    """
    return GlobalLR(hyper_lr, lr_bounds)


def global_momentum_lr(
    hyper_lr: float = 1.0, momentum: float = 0.9, lr_bounds: tuple[float, float] = (0.8, 5.0)
) -> GlobalMomentumLR:
    r"""FedHyper-GM: the global rate with server momentum (the paper's recommended variant).

    .. math::

      a_t = \operatorname{clip}\big(a_{t-1} + \beta \langle m_{t-1}, \Delta_t \rangle,\
      lo - 1,\ hi - 1\big), \quad m_t = s_t + \mu m_{t-1}, \quad
      x_{t+1} = x_t + s_t + a_t m_t

    (:class:`GlobalMomentumLR`). The reference code clips :math:`a_t` to ``[-0.2, 4]`` (the
    default ``lr_bounds=(0.8, 5.0)`` on :math:`1 + a_t`), with :math:`\mu = 0.9`, :math:`\beta = 1`.

    Args:
      hyper_lr: :math:`\beta \ge 0`.
      momentum: :math:`\mu \in [0, 1)`.
      lr_bounds: ``(lo, hi)`` bounds of :math:`1 + a_t`, containing 1.

    Returns:
      A :class:`GlobalMomentumLR` for ``Federated(..., scheduler=...)``.

    Example:
      >>> from bilevel import fed
      >>> fed.global_momentum_lr().momentum
      0.9
    """
    return GlobalMomentumLR(hyper_lr, momentum, lr_bounds)


def server_local_lr(
    hyper_lr: float = 1.0, lr_bounds: tuple[float, float] = (0.001, 0.1)
) -> ServerLocalLR:
    r"""FedHyper-SL: the server sets the clients' local rate from the global hypergradient.

    .. math::

      a_t = a_{t-1} + \beta \langle \Delta_{t-1}, \Delta_t \rangle, \qquad
      \alpha_{t+1} = \operatorname{clip}\big(\alpha_0 (1 + a_t),\ lo,\ hi\big)

    (:class:`ServerLocalLR`); the reference code's bounds ``(0.001, 0.1)`` and :math:`\beta = 1`
    are the defaults. The rate of round :math:`t` is ``metrics["learning_rate"]``.

    Args:
      hyper_lr: :math:`\beta \ge 0`.
      lr_bounds: ``(lo, hi)`` bounds of the clients' rate, ``0 < lo < hi``.

    Returns:
      A :class:`ServerLocalLR` for ``Federated(..., scheduler=...)``.

    Example:
      >>> from bilevel import fed
      >>> fed.server_local_lr().lr_bounds
      (0.001, 0.1)
    """
    return ServerLocalLR(hyper_lr, lr_bounds)


def client_local_lr(
    global_weight: float = 0.1,
    max_growth: float = 1.1,
    factor_bounds: tuple[float, float] = (0.1, 10.0),
) -> ClientLocalLR:
    r"""FedHyper-CL: every client scales its local rate by a factor adapted at each local step.

    .. math::

      b_{k+1} = \operatorname{clip}\Big(b_k \min\big(\gamma_{max},\ 1
      + \tfrac{c}{m}\langle v_k, \Delta_{t-1}\rangle + \langle v_k, v_{k-1}\rangle\big),\
      lo,\ hi\Big)

    with :math:`v_k` the client's parameter change at local step :math:`k` and :math:`b_0 = 1`
    each round (:class:`ClientLocalLR`, which states the reference code's exact step rule). The
    defaults are the code's: :math:`c = 0.1`, :math:`\gamma_{max} = 1.1`, factor in
    ``[0.1, 10]``.

    Args:
      global_weight: :math:`c`, the weight of the agreement with the last global update.
      max_growth: :math:`\gamma_{max} \ge 1`, the largest growth of the factor per step.
      factor_bounds: ``(lo, hi)`` bounds of the factor :math:`b_k`, containing 1.

    Returns:
      A :class:`ClientLocalLR` for ``Federated(..., scheduler=...)``.

    Example:
      >>> from bilevel import fed
      >>> fed.client_local_lr().factor_bounds
      (0.1, 10.0)
    """
    return ClientLocalLR(global_weight, max_growth, factor_bounds)
