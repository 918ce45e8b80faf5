"""Client data for federated simulation: non-IID splits by class, and padding into one array."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from solvers import checks

__all__ = ["ClientData", "classes_per_client_split", "dirichlet_split", "pad_clients"]

PyTree = Any


class ClientData(NamedTuple):
    """Every client's examples padded to one size, as :func:`pad_clients` builds them.

    Attributes:
      data: the examples, a pytree whose leaves are shaped ``(num_clients, max_size, ...)``;
        client ``i`` owns rows ``0 .. sizes[i] - 1`` of its slice, the rest is padding that is
        never read.
      sizes: the number of examples of each client, int32 of shape ``(num_clients,)``.
    """

    data: PyTree
    sizes: jax.Array


def _labels(labels: Any) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array of class ids, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise TypeError(f"labels must be integer class ids, got dtype {y.dtype}")
        y = y.astype(np.int64)
    if y.min() < 0:
        raise ValueError(f"labels must be class ids >= 0, got a minimum of {y.min()}")
    return y


def _rng(key: Any) -> np.random.Generator:
    """A NumPy generator seeded by an int or by a JAX PRNG key (typed or legacy uint32)."""
    if isinstance(key, int | np.integer) and not isinstance(key, bool):
        return np.random.default_rng(int(key))
    try:
        arr = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    except TypeError:
        arr = None
    if arr is not None and jax.dtypes.issubdtype(arr.dtype, jax.dtypes.prng_key):
        return np.random.default_rng(np.asarray(jax.random.key_data(arr)).ravel())
    if arr is not None and arr.dtype == jnp.uint32 and arr.ndim == 1:
        return np.random.default_rng(np.asarray(arr))
    raise TypeError(
        f"key must be a JAX PRNG key (jax.random.key(seed)) or an int seed, got {key!r}"
    )


def dirichlet_split(
    labels: Any,
    num_clients: int,
    alpha: float,
    key: Any,
    *,
    min_size: int = 1,
    max_tries: int = 100,
) -> list[np.ndarray]:
    r"""Split example indices over clients with class proportions drawn from a Dirichlet.

    For every class :math:`c`, proportions :math:`p_c \sim \mathrm{Dir}(\alpha \mathbf 1_N)` over
    the :math:`N` clients are drawn and the class's shuffled examples are cut at
    :math:`\lfloor n_c \operatorname{cumsum}(p_c) \rfloor` (Hsu, Qi and Brown, 2019; the split of
    the FedHyper reference code). Small :math:`\alpha` gives each client few classes and unequal
    sizes; :math:`\alpha \to \infty` tends to IID. The whole split is drawn again until every client
    has at least ``min_size`` examples (the reference code has no minimum: ``min_size=0``).

    Args:
      labels: integer class ids, shape ``(n,)``.
      num_clients: :math:`N \ge 1`.
      alpha: concentration :math:`\alpha > 0`.
      key: a JAX PRNG key or an int seed (the split is drawn with NumPy).
      min_size: smallest client size accepted (``0``: any).
      max_tries: draws before giving up.

    Returns:
      ``num_clients`` sorted int64 index arrays into ``labels``, disjoint and covering every
      example.

    Raises:
      ValueError: bad arguments, or no draw within ``max_tries`` gave every client ``min_size``
        examples (lower ``min_size`` or raise ``alpha``).

    Example:
      >>> import numpy as np
      >>> from bilevel import fed
      >>> parts = fed.dirichlet_split(np.repeat(np.arange(10), 50), 20, alpha=0.5, key=0)
      >>> len(parts), sum(len(p) for p in parts), min(len(p) for p in parts) >= 1
      (20, 500, True)
    """
    y = _labels(labels)
    num_clients = checks.integer("num_clients", num_clients)
    alpha = checks.number("alpha", alpha, low=0.0, low_open=True)
    min_size = checks.integer("min_size", min_size, low=0)
    max_tries = checks.integer("max_tries", max_tries)
    if min_size * num_clients > y.size:
        raise ValueError(
            f"min_size={min_size} for {num_clients} clients needs {min_size * num_clients} "
            f"examples, only {y.size} given; lower min_size or num_clients"
        )
    rng = _rng(key)
    classes = np.unique(y)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            p = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(p)[:-1] * idx.size).astype(int)
            for i, chunk in enumerate(np.split(idx, cuts)):
                parts[i].append(chunk)
        out = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        if min(o.size for o in out) >= min_size:
            return out
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split in {max_tries} draws gave each of the {num_clients} "
        f"clients at least min_size={min_size} examples; lower min_size, raise alpha or "
        "max_tries"
    )


def classes_per_client_split(labels: Any, num_clients: int, k: int, key: Any) -> list[np.ndarray]:
    r"""Split example indices so that each client holds exactly ``k`` classes.

    The classes are shuffled once into :math:`\pi`; client :math:`i` holds classes
    :math:`\pi_{(ik + j) \bmod C}`, :math:`j < k` (``k`` distinct classes, each class held by
    about :math:`Nk/C` clients, every class held when :math:`Nk \ge C`). Each class's shuffled
    examples are divided as evenly as possible among the clients holding it ("pathological
    non-IID" of McMahan et al., 2017, with ``k`` classes instead of two label-sorted shards).

    Args:
      labels: integer class ids, shape ``(n,)``.
      num_clients: :math:`N \ge 1`.
      k: classes per client, :math:`1 \le k \le C` (:math:`C` the number of distinct labels).
      key: a JAX PRNG key or an int seed (the split is drawn with NumPy).

    Returns:
      ``num_clients`` sorted int64 index arrays into ``labels``, disjoint; they cover every
      example when :math:`Nk \ge C`.

    Example:
      >>> import numpy as np
      >>> from bilevel import fed
      >>> y = np.repeat(np.arange(10), 50)
      >>> parts = fed.classes_per_client_split(y, 20, k=2, key=0)
      >>> sorted({len(np.unique(y[p])) for p in parts}), sum(len(p) for p in parts)
      ([2], 500)
    """
    y = _labels(labels)
    num_clients = checks.integer("num_clients", num_clients)
    classes = np.unique(y)
    k = checks.integer("k", k, low=1, high=classes.size)
    rng = _rng(key)
    order = rng.permutation(classes)
    held = [[order[(i * k + j) % classes.size] for j in range(k)] for i in range(num_clients)]
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in classes:
        owners = [i for i in range(num_clients) if c in held[i]]
        if not owners:
            continue
        idx = rng.permutation(np.flatnonzero(y == c))
        for i, chunk in zip(owners, np.array_split(idx, len(owners)), strict=True):
            parts[i].append(chunk)
    return [
        np.sort(np.concatenate(p)).astype(np.int64) if p else np.zeros(0, np.int64) for p in parts
    ]


def pad_clients(data: PyTree, clients: Sequence[Any], *, max_size: int | None = None) -> ClientData:
    """Gather each client's examples into one zero-padded array per leaf (for ``jax.vmap``).

    Args:
      data: the whole dataset, a pytree of arrays with a common leading example axis (e.g.
        ``(x, y)``).
      clients: one integer index array into ``data`` per client (what
        :func:`dirichlet_split` and :func:`classes_per_client_split` return).
      max_size: the padded size (default: the largest client); at least that.

    Returns:
      A :class:`ClientData`: leaves shaped ``(len(clients), max_size, ...)`` and the sizes.

    Raises:
      ValueError: ``data`` without a common leading axis, an index out of range, no client with
        an example, or ``max_size`` below the largest client.
      TypeError: a client's indices are not integers.

    Example:
      >>> import numpy as np
      >>> from bilevel import fed
      >>> x = np.arange(10.0)[:, None]
      >>> cd = fed.pad_clients((x, np.arange(10)), [np.array([0, 1, 2]), np.array([5])])
      >>> cd.data[0].shape, cd.sizes.tolist(), cd.data[1][1].tolist()
      ((2, 3, 1), [3, 1], [5, 0, 0])
    """
    leaves, treedef = jax.tree.flatten(data)
    if not leaves:
        raise ValueError("data is empty: pass a pytree of arrays with a leading example axis")
    leaves = [np.asarray(a) for a in leaves]
    n = leaves[0].shape[0] if leaves[0].ndim else None
    if n is None or any(a.ndim == 0 or a.shape[0] != n for a in leaves):
        raise ValueError(
            "every leaf of data needs the same leading (example) axis, got shapes "
            f"{[a.shape for a in leaves]}"
        )
    if isinstance(clients, np.ndarray | jax.Array) and np.ndim(clients) != 1:
        clients = list(clients)
    if len(clients) == 0:
        raise ValueError("clients is empty: pass one index array per client")
    index = []
    for i, c in enumerate(clients):
        c = np.asarray(c).reshape(-1)
        if c.size and not np.issubdtype(c.dtype, np.integer):
            raise TypeError(f"clients[{i}] must hold integer indices, got dtype {c.dtype}")
        c = c.astype(np.int64)
        if c.size and (c.min() < 0 or c.max() >= n):
            raise ValueError(f"clients[{i}] has indices outside [0, {n}) (the rows of data)")
        index.append(c)
    sizes = np.array([c.size for c in index], np.int32)
    if sizes.max() == 0:
        raise ValueError("every client is empty: at least one needs an example")
    width = int(sizes.max())
    if max_size is not None:
        width = checks.integer("max_size", max_size, low=width)
    out = []
    for a in leaves:
        padded = np.zeros((len(index), width, *a.shape[1:]), a.dtype)
        for i, c in enumerate(index):
            padded[i, : c.size] = a[c]
        out.append(jnp.asarray(padded))
    return ClientData(jax.tree.unflatten(treedef, out), jnp.asarray(sizes))
