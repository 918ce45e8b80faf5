r"""Federated training rounds in pure JAX: local training vmapped over clients, FedOpt server.

One round (:meth:`Federated.step`): sample :math:`m` of the :math:`N` clients, train each from the
global model for ``local_epochs`` epochs of its own data (one ``jax.vmap`` over the sampled
clients, the client axis optionally sharded over a device mesh), average their updates weighted
by client size (FedAvg), and apply a server optimizer, an Optax transformation of the
pseudo-gradient (FedOpt, Reddi et al., ICLR 2021), possibly under a FedHyper scheduler.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import solvers
from bilevel._bilevel import _typed_key
from bilevel._hd import _lr_dtype
from bilevel.fed._data import ClientData
from bilevel.fed._schedulers import ClientLocalLR, RoundSignals
from solvers import checks
from solvers import tree as T

__all__ = ["Federated", "FederatedState"]

PyTree = Any

_SAMPLE, _ORDER = 0, 1


class FederatedState(NamedTuple):
    r"""State of :class:`Federated` (a pytree of arrays: jit, vmap and checkpoint it).

    Attributes:
      params: the global model :math:`x_t`.
      server_state: the state of ``server_optimizer``.
      schedule_state: one state per scheduler (a tuple; a server-side scheduler's is a
        :class:`bilevel.fed.FedHyperState`, a client-side one's ``None``).
      prev_update: :math:`\Delta_{t-1}`, the averaged client update of the last applied round
        (zeros before the first), used by the FedHyper schedulers.
      learning_rate: the clients' local learning rate for the next round (float32).
      initial_learning_rate: :math:`\alpha_0`, the clients' initial local learning rate.
      step: rounds run so far, skipped ones included (int32); with ``key`` it fixes the clients
        sampled and the local data order of the next round.
      skipped: rounds not applied (no client with a finite update, or a non-finite server
        step), int32, saturating.
      clients_dropped: sampled clients whose update was not finite, left out of their round's
        average, int32, saturating.
      key: the run's PRNG key.
    """

    params: PyTree
    server_state: optax.OptState
    schedule_state: tuple
    prev_update: PyTree
    learning_rate: jax.Array
    initial_learning_rate: jax.Array
    step: jax.Array
    skipped: jax.Array
    clients_dropped: jax.Array
    key: jax.Array


class _Client(NamedTuple):
    params: PyTree
    opt_state: optax.OptState
    factor: jax.Array  # FedHyper-CL's multiplier of the local rate (1 without it)
    prev: PyTree  # FedHyper-CL's previous local update (None without it)
    loss_sum: jax.Array


def _is_transformation(tx: Any) -> bool:
    return callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))


def _schedulers(scheduler: Any) -> tuple:
    if scheduler is None:
        return ()
    items = tuple(scheduler) if isinstance(scheduler, list | tuple) else (scheduler,)
    sides = []
    for s in items:
        side = getattr(type(s), "side", None)
        if side not in ("server", "client"):
            raise TypeError(
                "scheduler must be None, a FedHyper scheduler (fed.global_lr(), "
                "fed.global_momentum_lr(), fed.server_local_lr(), fed.client_local_lr()) or a "
                f"tuple of a server-side and a client-side one, got {s!r}"
            )
        sides.append(side)
    if sides.count("server") > 1 or sides.count("client") > 1:
        raise ValueError(
            "scheduler takes at most one server-side scheduler (global_lr, global_momentum_lr, "
            "server_local_lr) and one client-side scheduler (client_local_lr), got "
            f"{[type(s).__name__ for s in items]}"
        )
    return items


class Federated:
    r"""Federated averaging with a server optimizer and FedHyper learning-rate schedulers.

    Round :math:`t` samples :math:`m` = ``clients_per_round`` of the :math:`N` clients uniformly
    without replacement. Client :math:`i` (with :math:`n_i` examples) starts from the global
    model :math:`x_t` and a fresh state of ``client_direction``, and runs
    :math:`E \lceil n_i / B \rceil` local steps (:math:`E` = ``local_epochs``, :math:`B` =
    ``batch_size``; each epoch a new permutation of its examples, the last batch of an epoch
    completed from the start of that permutation, so that every batch has :math:`B` rows)

    .. math::

      w \leftarrow w - \alpha_t b_k d_k, \qquad
      d_k = \text{client\_direction}\big(\nabla f(w; \text{batch}_k)\big),

    with :math:`\alpha_t` the local rate (``state.learning_rate``) and :math:`b_k = 1` unless
    FedHyper-CL adapts it. The server averages the updates :math:`\Delta^i_t = w^i - x_t`
    weighted by size (``weighted=False``: uniformly), :math:`\Delta_t = \sum_i n_i \Delta^i_t /
    \sum_i n_i`, computes :math:`s_t` = ``server_optimizer.update(-Delta_t, ...)`` and sets
    :math:`x_{t+1} = x_t + u_t` with :math:`u_t = s_t` (or the scheduler's :math:`u_t`). So
    ``server_optimizer=optax.sgd(1.0)`` (the default) is FedAvg, ``optax.adam(lr, eps=1e-3)``
    FedAdam and ``optax.adagrad(lr)`` FedAdagrad.

    Schedulers (FedHyper, Wang et al., ICLR 2024): ``scheduler=fed.global_lr()`` (FedHyper-G),
    ``fed.global_momentum_lr()`` (-GM), ``fed.server_local_lr()`` (-SL),
    ``fed.client_local_lr()`` (-CL), or a server-side and a client-side one as a tuple.

    Clients of unequal size are padded to one array (:func:`bilevel.fed.pad_clients`): the
    local steps run as one ``lax.while_loop`` over the largest step count among the sampled
    clients, vmapped over clients; a client's steps past its own count are masked, and padding
    rows are never read. With ``mesh`` the sampled clients' data and models are sharded along
    ``mesh_axis``, so each device trains ``m / devices`` clients and the average is a
    cross-device reduction (the same result as one device, up to summation order).

    Reliability: a client whose update (or local loss) is not finite, e.g. after diverging, is
    left out of the round's average (:func:`solvers.guard` per client) and counted in
    ``state.clients_dropped``. A round where no sampled client has a finite update, or whose
    server step is not finite, is skipped: everything but ``step`` and the counters is kept,
    ``state.skipped`` increments and ``metrics["status"]`` is ``NONFINITE``. The state is a
    pytree of arrays: :func:`bilevel.save_checkpoint` / :func:`bilevel.restore_checkpoint` (or
    :meth:`fit` with ``checkpoint_dir``) resume a run bit-identically.

    Args:
      loss: ``loss(params, batch) -> scalar``, the mean loss of a batch (a pytree slice of the
        client data with a leading axis of ``batch_size``).
      learning_rate: the clients' initial local learning rate :math:`\alpha_0 > 0`
        (:meth:`init` can override it, e.g. under ``jax.vmap``).
      clients_per_round: :math:`m`, clients sampled per round.
      local_epochs: :math:`E`, epochs of local training per round.
      batch_size: :math:`B`, examples per local step.
      client_direction: the local optimizer without its learning rate, an Optax transformation
        mapping a gradient to the direction :math:`d_k`: ``optax.identity()`` (SGD, the
        default), ``optax.trace(0.5)`` (heavy ball, the reference code's local SGD with momentum
        0.5), ``optax.scale_by_adam()``. Its state restarts every round.
      server_optimizer: an Optax transformation of the pseudo-gradient :math:`-\Delta_t`.
      scheduler: ``None`` (no adaptation), a FedHyper scheduler, or a tuple of a server-side
        and a client-side one.
      weighted: weight the average by client size (FedAvg); ``False``: uniform (the reference
        code's ``average_weights``).
      mesh: an optional ``jax.sharding.Mesh`` to shard the client axis over.
      mesh_axis: the mesh axis for clients (default: the mesh's first axis); its size must
        divide ``clients_per_round``.

    Raises:
      TypeError / ValueError: an argument of the wrong type or value, naming it.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, optax
      >>> from bilevel import fed
      >>> rs = np.random.RandomState(0)
      >>> x = rs.randn(200, 3).astype(np.float32); y = x @ np.ones(3, np.float32)
      >>> clients = fed.pad_clients((x, y), np.array_split(np.arange(200), 10))
      >>> loss = lambda w, b: jnp.mean((b[0] @ w - b[1]) ** 2)
      >>> fl = fed.Federated(loss, learning_rate=0.05, clients_per_round=5, local_epochs=2,
      ...                    batch_size=8, scheduler=fed.global_lr())
      >>> state = fl.init(jnp.zeros(3), key=jax.random.key(0))
      >>> state, history = fl.fit(state, clients, steps=10, progress=False)
      >>> bool(history["loss"][-1] < 0.01 * history["loss"][0]), int(history["status"].max())
      (True, 0)
    """

    def __init__(
        self,
        loss: Callable[[PyTree, PyTree], jax.Array],
        *,
        learning_rate: float,
        clients_per_round: int,
        local_epochs: int = 1,
        batch_size: int = 32,
        client_direction: optax.GradientTransformation | None = None,
        server_optimizer: optax.GradientTransformation | None = None,
        scheduler: Any = None,
        weighted: bool = True,
        mesh: jax.sharding.Mesh | None = None,
        mesh_axis: str | None = None,
    ):
        if not callable(loss):
            raise TypeError(f"loss must be a callable loss(params, batch) -> scalar, got {loss!r}")
        self.loss = loss
        self.learning_rate = checks.number("learning_rate", learning_rate, low=0.0, low_open=True)
        self.clients_per_round = checks.integer("clients_per_round", clients_per_round)
        self.local_epochs = checks.integer("local_epochs", local_epochs)
        self.batch_size = checks.integer("batch_size", batch_size)
        self.client_direction = optax.identity() if client_direction is None else client_direction
        self.server_optimizer = optax.sgd(1.0) if server_optimizer is None else server_optimizer
        for name, tx in (
            ("client_direction", self.client_direction),
            ("server_optimizer", self.server_optimizer),
        ):
            if not _is_transformation(tx):
                raise TypeError(
                    f"{name} must be an optax.GradientTransformation (with init and update), "
                    f"got {tx!r}"
                )
        self.schedulers = _schedulers(scheduler)
        self._server = next((s for s in self.schedulers if s.side == "server"), None)
        self._client = next((s for s in self.schedulers if s.side == "client"), None)
        if self._client is not None and not isinstance(self._client, ClientLocalLR):
            raise TypeError(f"unknown client-side scheduler {self._client!r}")
        if not isinstance(weighted, bool | np.bool_):
            raise TypeError(f"weighted must be True or False, got {weighted!r}")
        self.weighted = bool(weighted)
        if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
            raise TypeError(f"mesh must be a jax.sharding.Mesh or None, got {mesh!r}")
        if mesh is None and mesh_axis is not None:
            raise ValueError("mesh_axis needs a mesh")
        self.mesh = mesh
        self.mesh_axis = None
        if mesh is not None:
            axis = mesh.axis_names[0] if mesh_axis is None else mesh_axis
            if axis not in mesh.axis_names:
                raise ValueError(f"mesh_axis {axis!r} is not an axis of the mesh {mesh.axis_names}")
            devices = mesh.shape[axis]
            if self.clients_per_round % devices:
                raise ValueError(
                    f"clients_per_round={self.clients_per_round} must be a multiple of the "
                    f"{devices} devices of mesh axis {axis!r}; pick clients_per_round = k * "
                    f"{devices}"
                )
            self.mesh_axis = axis
            # Sharding constraints need Auto axes; an Explicit mesh (jax.make_mesh's default)
            # is used through its Auto twin (same devices and names).
            auto = (jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
            self.mesh = jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=auto)
        self._fit_adapter = _FitAdapter(self)

    # ------------------------------------------------------------------ public

    def init(
        self,
        params: PyTree,
        key: jax.Array | None = None,
        *,
        learning_rate: jax.typing.ArrayLike | None = None,
    ) -> FederatedState:
        """The state before the first round.

        Args:
          params: the initial global model (a pytree of floating arrays).
          key: PRNG key of the run (client sampling, local data order); default
            ``jax.random.key(0)``; a legacy ``uint32`` key is wrapped.
          learning_rate: the clients' initial local rate :math:`\\alpha_0` (default: the
            constructor's); may be traced, e.g. ``jax.vmap`` over several initial rates.

        Returns:
          A :class:`FederatedState`.
        """
        params = jax.tree.map(jnp.asarray, params)
        leaves = jax.tree.leaves(params)
        if not leaves or not all(jnp.issubdtype(jnp.result_type(a), jnp.inexact) for a in leaves):
            raise TypeError(f"params must be a non-empty pytree of floating arrays, got {params!r}")
        lr = self.learning_rate if learning_rate is None else learning_rate
        if not isinstance(lr, jax.core.Tracer):
            value = np.asarray(lr)
            if value.shape != () or not np.isfinite(value) or not value > 0:
                raise ValueError(f"learning_rate must be a positive finite scalar, got {lr!r}")
        lr = jnp.asarray(lr, jnp.float32)
        zero = jnp.zeros((), jnp.int32)
        return FederatedState(
            params=params,
            server_state=self.server_optimizer.init(params),
            schedule_state=tuple(s.init(params) for s in self.schedulers),
            prev_update=T.tree_zeros_like(params),
            learning_rate=lr,
            initial_learning_rate=lr,
            step=zero,
            skipped=zero,
            clients_dropped=zero,
            key=_typed_key(key),
        )

    def step(self, state: FederatedState, data: ClientData) -> tuple[FederatedState, dict]:
        r"""One round: sample clients, train them locally, average, apply the server step.

        A pure function of ``(state, data)`` (the clients and the data order come from
        ``state.key`` and ``state.step``): jit it, vmap it over states (e.g. initial learning
        rates or seeds), checkpoint between rounds.

        Args:
          state: the current state.
          data: every client's padded data, from :func:`bilevel.fed.pad_clients`.

        Returns:
          ``(state, metrics)``; ``metrics`` holds ``loss`` (the sampled clients' mean local
          training loss, weighted like the average), ``learning_rate`` (the local rate
          :math:`\alpha_t` of this round), ``global_learning_rate`` (the server's effective rate,
          1 without a global scheduler), ``hypergrad`` (the server-side scheduler's
          :math:`h_t`, 0 without one), ``local_lr_factor`` (the mean final FedHyper-CL factor,
          1 without it), ``update_norm`` (:math:`\|\Delta_t\|`), ``clients`` (clients averaged
          this round), ``clients_dropped`` and ``skipped`` (the state's counters) and
          ``status`` (:class:`solvers.Status`: ``SUCCESS``, or ``NONFINITE`` for a skipped
          round).
        """
        if not isinstance(data, ClientData):
            raise TypeError(
                f"data must be a fed.ClientData (from fed.pad_clients), got {type(data).__name__}"
            )
        num_clients = jnp.shape(data.sizes)[0]
        m = self.clients_per_round
        if m > num_clients:
            raise ValueError(
                f"clients_per_round={m} exceeds the {num_clients} clients of data; lower it"
            )
        round_key = jax.random.fold_in(state.key, state.step)
        chosen = jax.random.choice(
            jax.random.fold_in(round_key, _SAMPLE), num_clients, (m,), replace=False
        )
        local = jax.tree.map(lambda a: a[chosen], data.data)
        sizes = data.sizes[chosen].astype(jnp.int32)
        order_key = jax.random.fold_in(round_key, _ORDER)
        local, sizes = self._shard((local, sizes))
        lr = state.learning_rate
        clients = self._train(state.params, local, sizes, order_key, lr, state.prev_update)

        # Per client: its update, kept only if it and its loss are finite.
        steps = self.local_epochs * ((sizes + self.batch_size - 1) // self.batch_size)
        deltas = jax.tree.map(lambda w, x: w - x[None], clients.params, state.params)
        losses = clients.loss_sum / jnp.maximum(steps, 1).astype(clients.loss_sum.dtype)
        zero = jnp.zeros((), jnp.int32)
        guarded = jax.vmap(lambda d, loss: solvers.guard(T.tree_zeros_like(d), d, zero, also=loss))(
            deltas, losses
        )
        ok = guarded.applied
        weights = jnp.where(ok, sizes if self.weighted else (sizes > 0), 0)
        dtype = _lr_dtype(state.params)
        weights = weights.astype(dtype)
        total = jnp.sum(weights)
        any_ok = total > 0
        norm = weights / jnp.where(any_ok, total, 1)
        delta = jax.tree.map(lambda d: jnp.tensordot(norm.astype(d.dtype), d, 1), guarded.value)
        loss = jnp.sum(norm * jnp.where(ok, losses, 0).astype(dtype))
        factor = jnp.sum(norm * jnp.where(ok, clients.factor, 0).astype(dtype))
        local_factor = jnp.where(any_ok, factor, 1).astype(dtype)
        dropped = jnp.sum(~ok).astype(jnp.int32)

        # Server: FedOpt step on the pseudo-gradient, then the server-side scheduler.
        update, server_state = self.server_optimizer.update(
            T.tree_neg(delta), state.server_state, state.params
        )
        schedule_state = list(state.schedule_state)
        new_lr = lr
        signals = RoundSignals(jnp.zeros((), dtype), jnp.ones((), dtype))
        if self._server is not None:
            i = self.schedulers.index(self._server)
            update, schedule_state[i], new_lr, signals = self._server.server(
                state.schedule_state[i],
                delta,
                state.prev_update,
                update,
                lr,
                state.initial_learning_rate,
            )
        params = optax.apply_updates(state.params, update)
        old = (state.params, state.server_state, state.schedule_state, state.prev_update, lr)
        new = (params, server_state, tuple(schedule_state), delta, new_lr)
        result = solvers.guard(
            old, new, state.skipped, finite=any_ok & T.tree_all_finite((new, signals))
        )
        params, server_state, schedule_state, prev_update, new_lr = result.value
        state = FederatedState(
            params=params,
            server_state=server_state,
            schedule_state=schedule_state,
            prev_update=prev_update,
            learning_rate=new_lr,
            initial_learning_rate=state.initial_learning_rate,
            step=optax.safe_increment(state.step),
            skipped=result.skipped,
            clients_dropped=_saturating_add(state.clients_dropped, dropped),
            key=state.key,
        )
        status = jnp.where(result.applied, solvers.Status.SUCCESS, solvers.Status.NONFINITE)
        metrics = {
            "loss": loss,
            "learning_rate": lr,
            "global_learning_rate": signals.global_learning_rate,
            "hypergrad": signals.hypergrad,
            "local_lr_factor": jnp.ones((), dtype) if self._client is None else local_factor,
            "update_norm": T.tree_norm(delta),
            "clients": jnp.sum(weights > 0).astype(jnp.int32),
            "clients_dropped": state.clients_dropped,
            "skipped": state.skipped,
            "status": status.astype(jnp.int32),
        }
        return state, metrics

    def fit(
        self,
        state: FederatedState,
        data: ClientData,
        *,
        steps: int,
        chunk: int = 10,
        callbacks: Any = (),
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
        resume: bool = True,
        progress: bool = True,
        desc: str | None = None,
        log_dir: str | os.PathLike | None = None,
        tensorboard: bool = False,
    ) -> tuple[FederatedState, dict[str, np.ndarray]]:
        """Run ``steps`` rounds with :func:`bilevel.fit`: history, callbacks, checkpoints, resume.

        ``chunk`` rounds run per jitted call (compiled once per ``chunk``); the other keywords
        are :func:`bilevel.fit`'s: ``callbacks`` (``cb(step, state, metrics)`` after each chunk,
        returning ``True`` stops), ``checkpoint_dir`` / ``checkpoint_every`` / ``resume``
        (bit-identical resume), ``progress`` (one bar, in rounds), ``desc``, ``log_dir``
        (``metrics.jsonl``) and ``tensorboard``.

        Args:
          state: the state to start from (also the template of a resumed checkpoint).
          data: every client's padded data (:func:`bilevel.fed.pad_clients`).
          steps: rounds to run.
          chunk: rounds per jitted call.
          callbacks: ``cb(step, state, metrics)`` (or a sequence of them) after each chunk.
          checkpoint_dir: folder for checkpoints and the history (``None``: none).
          checkpoint_every: also checkpoint every this many rounds.
          resume: continue from the latest checkpoint of ``checkpoint_dir``.
          progress: show a progress bar.
          desc: the bar's label (default ``"Federated"``).
          log_dir: folder for ``metrics.jsonl``.
          tensorboard: also write TensorBoard scalars into ``log_dir``.

        Returns:
          ``(state, history)``: ``history`` maps ``"step"`` and every metric of :meth:`step`
          to NumPy arrays with one row per round.
        """
        from bilevel._fit import fit

        if not isinstance(data, ClientData):
            raise TypeError(
                f"data must be a fed.ClientData (from fed.pad_clients), got {type(data).__name__}"
            )
        return fit(
            self._fit_adapter,
            state,
            data,
            None,
            steps=steps,
            batch_size=self.batch_size,
            chunk=chunk,
            callbacks=callbacks,
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=checkpoint_every,
            resume=resume,
            progress=progress,
            desc=desc or type(self).__name__,
            log_dir=log_dir,
            tensorboard=tensorboard,
        )

    # ------------------------------------------------------------------ internals

    def _shard(self, tree: PyTree) -> PyTree:
        """Constrain the leading (client) axis of every leaf to the mesh axis, if any."""
        if self.mesh is None:
            return tree
        spec = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(self.mesh_axis))
        return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, spec), tree)

    def _train(self, params, data, sizes, key, lr, global_update) -> _Client:
        """Local training of the sampled clients (vmapped), as one while loop over local steps."""
        m = sizes.shape[0]
        max_n = jnp.shape(jax.tree.leaves(data)[0])[1]
        B, E = self.batch_size, self.local_epochs
        per_epoch = (sizes + B - 1) // B
        total = E * per_epoch
        cl = self._client

        # Each client's example order in each epoch: its own rows first, shuffled. One flat draw
        # (a multi-dimensional one compiles about 3x slower on XLA:CPU).
        u = jax.random.uniform(key, (m * E * max_n,)).reshape(m, E, max_n)
        own = jnp.arange(max_n) < sizes[:, None, None]
        perms = jnp.argsort(jnp.where(own, u, 2.0), axis=-1).astype(jnp.int32)
        broadcast = lambda t: jax.tree.map(lambda a: jnp.broadcast_to(a, (m, *a.shape)), t)
        start = broadcast(params)
        dtype = _lr_dtype(params)
        clients = _Client(
            params=start,
            opt_state=jax.vmap(self.client_direction.init)(start),
            factor=jnp.ones((m,), dtype),
            prev=None if cl is None else broadcast(global_update),
            loss_sum=jnp.zeros((m,), dtype),
        )
        clients = self._shard(clients)

        def client_step(c: _Client, k, data_i, n_i, per_epoch_i, total_i, perm_i):
            s = jnp.maximum(per_epoch_i, 1)
            epoch, j = jnp.minimum(k // s, E - 1), k % s
            pos = (j * B + jnp.arange(B)) % jnp.maximum(n_i, 1)
            idx = perm_i[epoch, pos]
            batch = jax.tree.map(lambda a: a[idx], data_i)
            value, grads = jax.value_and_grad(self.loss)(c.params, batch)
            direction, opt_state = self.client_direction.update(grads, c.opt_state, c.params)
            rate = lr * c.factor
            move = jax.tree.map(lambda d, p: (-rate * d).astype(p.dtype), direction, c.params)
            new_params = jax.tree.map(jnp.add, c.params, move)
            factor, prev = c.factor, c.prev
            if cl is not None:
                adapted = cl.local(factor, prev, move, global_update, self.clients_per_round)
                adapt = j != 0
                factor, prev = optax.tree.where(adapt, adapted, (factor, prev))
            new = _Client(
                new_params, opt_state, factor, prev, c.loss_sum + value.astype(c.loss_sum.dtype)
            )
            return optax.tree.where(k < total_i, new, c)

        step_all = jax.vmap(client_step, in_axes=(0, None, 0, 0, 0, 0, 0))
        last = jnp.max(total)

        def body(carry):
            k, c = carry
            return k + 1, step_all(c, k, data, sizes, per_epoch, total, perms)

        _, clients = jax.lax.while_loop(
            lambda carry: carry[0] < last, body, (jnp.int32(0), clients)
        )
        return clients


def _saturating_add(counter: jax.Array, n: jax.Array) -> jax.Array:
    """``counter + n`` for int32 counters, saturating at the largest int32."""
    top = jnp.iinfo(jnp.int32).max
    return jnp.where(counter > top - n, top, counter + n).astype(jnp.int32)


class _FitAdapter:
    """The :func:`bilevel.fit` tuner shape of :class:`Federated` (clients sampled in ``step``)."""

    def __init__(self, tuner: Federated):
        self.tuner = tuner

    def sample_batches(self, state, inner_data, outer_data, batch_size, outer_batch_size):
        del state, batch_size, outer_batch_size
        return inner_data, outer_data

    def step(self, state, data, outer):
        del outer
        return self.tuner.step(state, data)
