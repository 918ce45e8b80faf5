"""Federated learning in pure JAX with FedHyper's hypergradient learning-rate schedulers.

:class:`Federated` runs federated rounds (clients vmapped, optionally sharded over devices;
FedAvg weighting; an Optax server optimizer, so FedAvg, FedAdam and FedAdagrad are
``optax.sgd(1.0)``, ``optax.adam(...)``, ``optax.adagrad(...)``) with the schedulers of FedHyper
(Wang, Wang and Li, ICLR 2024): :func:`global_lr` (FedHyper-G), :func:`global_momentum_lr`
(-GM), :func:`server_local_lr` (-SL) and :func:`client_local_lr` (-CL). Non-IID client data
comes from :func:`dirichlet_split` or :func:`classes_per_client_split` and :func:`pad_clients`.

Example:
  >>> import jax, jax.numpy as jnp, numpy as np
  >>> from bilevel import fed
  >>> y = np.repeat(np.arange(4), 25); x = np.eye(4, dtype=np.float32)[y]
  >>> data = fed.pad_clients((x, y), fed.dirichlet_split(y, 8, alpha=0.5, key=0))
  >>> loss = lambda w, b: jnp.mean((b[0] @ w - b[1]) ** 2)
  >>> fl = fed.Federated(loss, learning_rate=0.1, clients_per_round=4, batch_size=4,
  ...                    scheduler=fed.global_momentum_lr())
  >>> state, metrics = jax.jit(fl.step)(fl.init(jnp.zeros(4)), data)
  >>> int(metrics["clients"]), int(state.step)
  (4, 1)
"""

from bilevel.fed._data import (
    ClientData,
    classes_per_client_split,
    dirichlet_split,
    pad_clients,
)
from bilevel.fed._federated import Federated, FederatedState
from bilevel.fed._schedulers import (
    ClientLocalLR,
    FedHyperState,
    GlobalLR,
    GlobalMomentumLR,
    ServerLocalLR,
    client_local_lr,
    global_lr,
    global_momentum_lr,
    server_local_lr,
)

__all__ = [
    "ClientData",
    "ClientLocalLR",
    "FedHyperState",
    "Federated",
    "FederatedState",
    "GlobalLR",
    "GlobalMomentumLR",
    "ServerLocalLR",
    "classes_per_client_split",
    "client_local_lr",
    "dirichlet_split",
    "global_lr",
    "global_momentum_lr",
    "pad_clients",
    "server_local_lr",
]
