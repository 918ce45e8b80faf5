r"""Population Based Training as one jitted, vmapped program.

The population is a leading axis of every leaf of the state. Each :meth:`PBT.step` steps every
member once (``jax.vmap`` of the member's own step: a gradient tuner keeps tuning its
hyperparameters inside); every ``interval`` steps, still inside ``jit``, the worst members copy a
better one and perturb its PBT-managed hyperparameters (Jaderberg et al., 2017):

- **exploit** (truncation selection): rank the members by their objective ``s_i`` (lower is
  better; a non-finite member ranks last). With :math:`n = \min(\lceil P q \rceil,
  \lfloor P / 2 \rfloor)` for the quantile ``q = fraction``, each of the bottom ``n`` members
  (and every non-finite one) copies the whole state - parameters, optimizer state,
  gradient-tuned hyperparameters, PRNG key - and the PBT values of a member drawn uniformly from
  the top ``n``.
- **explore**: each copied value is, independently, resampled from the space with probability
  ``resample_probability`` (uniform, log-uniform for ``log`` specs, between the bounds; a spec
  without both bounds is never resampled), otherwise multiplied by a factor drawn uniformly from
  ``perturb`` and clipped to the bounds. A ``choice`` moves to the neighbouring option (down for a
  factor below 1, up above 1); an ``integer`` is scaled, rounded, moved by at least one, clipped.

The defaults are Ray Tune's ``PopulationBasedTraining`` (``quantile_fraction=0.25``,
``resample_probability=0.25``, factors ``0.8`` / ``1.2``), in its synchronous form (every member
exploited at the same step).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bilevel import hparams as hp
from bilevel._bilevel import _typed_key
from bilevel.pbt._members import Member, _finite, as_member
from solvers import checks

PyTree = Any

__all__ = ["PBT", "Lineage", "PBTState", "Schedule"]


class Lineage(NamedTuple):
    """Who each member descends from, round by round (fixed capacity ``max_rounds``).

    Row ``i`` is member ``i``'s ancestry: a copy inherits its parent's row, then the new round is
    appended. Round ``r`` covers steps ``[r * interval, (r + 1) * interval)``.

    Attributes:
      slots: ``(P, max_rounds)`` int32; ``slots[i, r]`` is the population slot member ``i``'s
        ancestor occupied during round ``r`` (``slots[i, 0]`` its founder).
      hparams: the PBT values (``choice`` / ``integer`` as option indices) of that ancestor in
        round ``r``: each leaf ``(P, max_rounds, ...)``.
    """

    slots: jax.Array
    hparams: dict


class PBTState(NamedTuple):
    """State of :class:`PBT` (a pytree: jit and checkpoint it); a leading population axis ``P``.

    Attributes:
      members: the members' states stacked along axis 0 (e.g. a :class:`bilevel.BilevelState`
        whose every leaf has a leading axis ``P``).
      hparams: the PBT-managed hyperparameters, ``(P, ...)`` per name: values for continuous
        specs, the option index (``0 .. num_options - 1``) for ``choice`` and ``integer``;
        :meth:`PBT.hparams` decodes them.
      score: ``(P,)`` each member's objective at the last step; ``inf`` for a member replaced at
        the end of that step (its new hyperparameters are not measured yet).
      step: PBT steps taken (int32).
      round: exploit rounds done (int32); the current round's index.
      key: PRNG key of exploit and explore (round ``r`` uses ``fold_in(key, r)``).
      lineage: the :class:`Lineage`.
      replaced: members replaced so far, summed over rounds (int32).
      nonfinite: of those, how many were replaced because they were not finite (int32).
    """

    members: PyTree
    hparams: dict
    score: jax.Array
    step: jax.Array
    round: jax.Array
    key: jax.Array
    lineage: Lineage
    replaced: jax.Array
    nonfinite: jax.Array


class Schedule(NamedTuple):
    """The PBT hyperparameter schedule of one member's lineage (NumPy arrays; see
    :meth:`PBT.schedule`).

    Attributes:
      hparams: per name, the values of each round, ``(rounds, ...)``.
      slots: ``(rounds,)`` the population slot of the lineage's ancestor in each round.
      interval: steps per round.
      steps: steps run (the schedule covers steps ``0 .. steps - 1``).
      member: the member whose lineage this is.
    """

    hparams: dict
    slots: np.ndarray
    interval: int
    steps: int
    member: int

    @property
    def founder(self) -> int:
        """The population slot the lineage started from."""
        return int(self.slots[0])

    def round_of(self, step: int | np.ndarray) -> np.ndarray:
        """Round index of (0-based) step(s) ``step``."""
        return np.minimum(np.asarray(step) // self.interval, len(self.slots) - 1)

    def at(self, step: int) -> dict:
        """The values in force at (0-based) step ``step``."""
        r = int(self.round_of(step))
        return {k: v[r] for k, v in self.hparams.items()}

    def per_step(self, steps: int | None = None) -> dict:
        """The values of every step, ``(steps, ...)`` per name (default: the steps run)."""
        t = np.arange(self.steps if steps is None else steps)
        return {k: v[self.round_of(t)] for k, v in self.hparams.items()}

    def along(self, values: Any) -> np.ndarray:
        """A per-step, per-member record read along the lineage.

        ``values[t, i]`` is member slot ``i``'s value at step ``t`` (e.g. a column of the
        history of :meth:`PBT.fit`: ``history["member/outer_loss"]``, ``(T, P, ...)``); the result
        is ``out[t] = values[t, slots[round(t)]]``: what the lineage's ancestor had at each step.

        Args:
          values: array ``(T, P, ...)`` whose row ``t`` is step ``t`` (0-based).

        Returns:
          ``(T, ...)``.
        """
        values = np.asarray(values)
        if values.ndim < 2:
            raise ValueError(f"values must be (steps, population, ...), got shape {values.shape}")
        t = np.arange(values.shape[0])
        return values[t, self.slots[self.round_of(t)]]


# ----------------------------------------------------------------------------- exploration math


def _resamplable(spec) -> bool:
    if isinstance(spec, hp.Discrete):
        return True
    return spec.kind != "real" and spec.lower is not None and spec.upper is not None


def _sample(spec, u: jax.Array) -> jax.Array:
    """A draw from the spec's range for uniforms ``u`` in ``[0, 1)`` (coordinates)."""
    if isinstance(spec, hp.Discrete):
        return jnp.minimum(jnp.floor(u * spec.num_options), spec.num_options - 1).astype(jnp.int32)
    lo, hi = spec.lower, spec.upper
    dtype = spec.value.dtype
    if spec.kind == "log":
        return jnp.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))).astype(dtype)
    return (lo + u * (hi - lo)).astype(dtype)


def _perturb(spec, c: jax.Array, factor: jax.Array) -> jax.Array:
    """The coordinates ``c`` moved by ``factor`` and clipped to the range."""
    direction = jnp.sign(factor - 1.0)
    if isinstance(spec, hp.Discrete):
        if spec.kind == "choice":
            moved = c + direction.astype(jnp.int32)
        else:
            v = (c + spec.lower).astype(jnp.float32)
            scaled = jnp.round(v * factor)
            away = jnp.where(v < 0, -1.0, 1.0)
            moved_v = jnp.where(scaled == v, v + direction * away, scaled)
            moved = jnp.clip(moved_v, spec.lower, spec.upper).astype(jnp.int32) - spec.lower
        return jnp.clip(moved, 0, spec.num_options - 1).astype(jnp.int32)
    new = c * factor.astype(c.dtype)
    if spec.kind != "real" and (spec.lower is not None or spec.upper is not None):
        new = jnp.clip(new, spec.lower, spec.upper)
    return new.astype(c.dtype)


def _quantile_size(population: int, fraction: float) -> int:
    """Members per quantile: ``min(ceil(P q), floor(P / 2))`` (Ray Tune's rule)."""
    n = math.ceil(population * fraction)
    return min(n, population // 2)


# ----------------------------------------------------------------------------- PBT


class PBT:
    r"""Population Based Training of any tuner, as one jitted program over a population axis.

    Every member is a whole training run: a :class:`bilevel.BilevelOptimizer` (which keeps tuning
    its own ``space`` by hypergradient; PBT owns some of its ``fixed_hparams``), a plain Optax
    training step (:func:`bilevel.pbt.optax_member`) or any :class:`bilevel.pbt.Member`. PBT
    manages the hyperparameters of ``space`` - continuous or discrete, ones no gradient reaches
    (learning rate, dropout, a batch size, a switch) - with exploit / explore every ``interval``
    steps (see the module): with quantile :math:`q` and :math:`n = \min(\lceil P q\rceil,
    \lfloor P/2 \rfloor)`,

    .. math:: \text{parent}_i = \begin{cases} \text{uniform}(\text{top}_n) & i \in
       \text{bottom}_n \text{ or } s_i \text{ not finite} \\ i & \text{otherwise} \end{cases}
       \qquad h_i \leftarrow \begin{cases} \text{sample}(\text{space}) & \text{w.p. } p \\
       \mathrm{clip}(f\, h_{\text{parent}_i}),\ f \sim \text{perturb} & \text{otherwise}
       \end{cases}

    Defaults are Ray Tune's (``quantile_fraction=0.25``, ``resample_probability=0.25``, factors
    ``0.8`` / ``1.2``). A copy inherits its parent's PRNG key, so parent and copy then see the same
    batches: a paired comparison of their hyperparameters, and a lineage whose data stream is its
    founder's (what :meth:`replay` relies on).

    With ``mesh``, the population axis is sharded over the mesh axis ``axis_name`` (the members
    run on their devices; exploit gathers across them). Under ``jax.distributed`` the same code
    runs on every host of a multi-host mesh.

    Args:
      member: a ``BilevelOptimizer``, an :func:`~bilevel.pbt.optax_member` or a
        :class:`~bilevel.pbt.Member`.
      space: a flat dict ``{name: spec}`` of :mod:`bilevel.hparams` specs (``log``, ``unit``,
        ``bounded``, ``real``, ``choice``, ``integer``): the hyperparameters PBT owns. For a
        ``BilevelOptimizer`` each name must be in its ``fixed_hparams`` and none in its ``space``.
      interval: steps between exploit rounds (``>= 1``).
      fraction: the quantile ``q`` in ``[0, 0.5]``; ``0`` turns exploitation off (independent
        runs).
      resample_probability: per value, the probability of resampling instead of perturbing.
      perturb: the perturbation factors (each ``> 0``), drawn uniformly.
      objective: the key of the member's step metrics to minimize (a scalar per member).
      mesh: a ``jax.sharding.Mesh`` to shard the population over, or ``None``.
      axis_name: the mesh axis of the population (default: the mesh's first axis).
      sample_batches: optional ``f(member_state, inner_data, outer_data, batch_size,
        outer_batch_size) -> (inner_batches, outer_batch)`` replacing the member's own
        (e.g. to add a dropout key to each batch); used by :meth:`sample_batches` and
        :meth:`replay`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from bilevel import hparams, pbt
      >>> loss = lambda w, h, b: jnp.sum((w - 1.0) ** 2)
      >>> member = pbt.optax_member(loss, lambda h: optax.sgd(h["lr"]))
      >>> tuner = pbt.PBT(member, {"lr": hparams.log(0.01, 1e-3, 0.5)}, interval=2)
      >>> state = tuner.init(jax.random.key(0), 8, jnp.zeros(2))
      >>> batches = jnp.zeros((8, 1, 1))          # (population, inner_steps, ...): unused here
      >>> for _ in range(10):
      ...     state, metrics = tuner.step(state, batches, jnp.zeros((8, 1)))
      >>> int(state.round), metrics["score"].shape
      (5, (8,))
    """

    def __init__(
        self,
        member: Any,
        space: dict[str, Any],
        *,
        interval: int,
        fraction: float = 0.25,
        resample_probability: float = 0.25,
        perturb: tuple[float, ...] = (0.8, 1.2),
        objective: str = "outer_loss",
        mesh: jax.sharding.Mesh | None = None,
        axis_name: str | None = None,
        sample_batches: Callable | None = None,
    ):
        self.member: Member = as_member(member)
        if not isinstance(space, dict) or not space:
            raise TypeError(
                "space must be a non-empty dict {name: spec} of bilevel.hparams specs, got "
                f"{space!r}"
            )
        for name, spec in space.items():
            if not isinstance(name, str):
                raise TypeError(f"space keys must be hyperparameter names (str), got {name!r}")
            if not isinstance(spec, hp.Hyperparameter | hp.Discrete):
                raise TypeError(
                    f"space[{name!r}] is {spec!r}, not a hyperparameter spec: use "
                    "bilevel.hparams.log/unit/bounded/real/choice/integer (a flat dict: one "
                    "spec per name)"
                )
        self.space = dict(space)
        self.names = tuple(sorted(self.space))
        self.member.check_space(self.space)
        self.interval = checks.integer("interval", interval)
        self.fraction = checks.number("fraction", fraction, low=0.0, high=0.5)
        self.resample_probability = checks.number(
            "resample_probability", resample_probability, low=0.0, high=1.0
        )
        try:
            factors = tuple(perturb)
        except TypeError:
            raise TypeError(f"perturb must be a tuple of factors, got {perturb!r}") from None
        if not factors:
            raise ValueError("perturb must hold at least one factor, e.g. (0.8, 1.2)")
        self.perturb = tuple(
            checks.number(f"perturb[{i}]", f, low=0.0, low_open=True) for i, f in enumerate(factors)
        )
        if not isinstance(objective, str):
            raise TypeError(f"objective must be the name of a step metric, got {objective!r}")
        self.objective = objective
        if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
            raise TypeError(f"mesh must be a jax.sharding.Mesh or None, got {mesh!r}")
        if mesh is None and axis_name is not None:
            raise ValueError("axis_name needs a mesh")
        if mesh is not None:
            axis_name = mesh.axis_names[0] if axis_name is None else axis_name
            if axis_name not in mesh.axis_names:
                raise ValueError(
                    f"axis_name {axis_name!r} is not an axis of the mesh {mesh.axis_names}"
                )
            # Auto axes: XLA propagates the population sharding through the members' own code
            # (an Explicit axis would ask every gather of replicated data for an out_sharding).
            mesh = jax.sharding.Mesh(
                mesh.devices,
                mesh.axis_names,
                axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names),
            )
        self.mesh, self.axis_name = mesh, axis_name
        if sample_batches is not None and not callable(sample_batches):
            raise TypeError(f"sample_batches must be callable or None, got {sample_batches!r}")
        self._sample_fn = sample_batches or self.member.sample_batches
        self._step = jax.jit(self._step_impl)
        self._replay_cache: dict = {}

    # ------------------------------------------------------------------ public API

    def init(
        self,
        key: jax.Array,
        population_size: int,
        params: PyTree | Callable,
        *,
        hparams: dict[str, Any] | None = None,
        max_rounds: int = 1000,
    ) -> PBTState:
        """The initial population.

        Args:
          key: PRNG key; split into the members' keys (data order, dropout), their parameter
            initializations, the initial hyperparameter draws and PBT's own key.
          population_size: ``P >= 2`` (a multiple of the mesh axis size with ``mesh``).
          params: initial parameters shared by every member, or a function ``key -> params``
            initializing each member its own way.
          hparams: initial PBT values, ``{name: (P, ...)}`` (``choice`` / ``integer`` as their
            values); default: drawn from the space (uniform / log-uniform between the bounds,
            uniform over discrete options), a spec without both bounds at its ``init``.
          max_rounds: capacity of the lineage in exploit rounds (rounds beyond it are not
            recorded; :meth:`schedule` then raises).

        Returns:
          A :class:`PBTState`.
        """
        P = checks.integer("population_size", population_size, low=2)
        max_rounds = checks.integer("max_rounds", max_rounds)
        if self.mesh is not None:
            devices = self.mesh.shape[self.axis_name]
            if P % devices:
                raise ValueError(
                    f"population_size={P} is not a multiple of the {devices} devices of mesh "
                    f"axis {self.axis_name!r}: use a population of {devices * max(1, P // devices)} "
                    f"or {devices * (P // devices + 1)}"
                )
        key = _typed_key(key)
        given = None if hparams is None else self._coords_of(hparams, P)
        init_fn = params if callable(params) else None
        shared = None if callable(params) else jax.tree.map(jnp.asarray, params)

        # One jitted program builds the population (eagerly, every small op would compile alone).
        def build(key, shared, given):
            k_members, k_params, k_hparams, k_pbt = jax.random.split(key, 4)
            member_keys = jax.random.split(k_members, P)
            coords = self._initial(k_hparams, P) if given is None else given
            values = self._decode(coords)
            if init_fn is not None:
                pop_params = jax.vmap(init_fn)(jax.random.split(k_params, P))
                members = jax.vmap(self.member.init)(pop_params, values, member_keys)
            else:
                members = jax.vmap(self.member.init, in_axes=(None, 0, 0))(
                    shared, values, member_keys
                )
            slots = jnp.zeros((P, max_rounds), jnp.int32)
            slots = slots.at[:, 0].set(jnp.arange(P, dtype=jnp.int32))
            lineage_hp = {
                k: jnp.zeros((P, max_rounds, *c.shape[1:]), c.dtype).at[:, 0].set(c)
                for k, c in coords.items()
            }
            zero = jnp.asarray(0, jnp.int32)
            return PBTState(
                members=members,
                hparams=coords,
                score=jnp.full((P,), jnp.inf, jnp.float32),
                step=zero,
                round=zero,
                key=k_pbt,
                lineage=Lineage(slots, lineage_hp),
                replaced=zero,
                nonfinite=zero,
            )

        state = jax.jit(build)(key, shared, given)
        return self._place(state)

    def step(
        self, state: PBTState, inner_batches: PyTree, outer_batch: PyTree
    ) -> tuple[PBTState, dict[str, Any]]:
        """Step every member once; exploit and explore when ``interval`` steps are complete (jitted).

        Args:
          state: current state.
          inner_batches: the members' inner batches, a leading population axis on every leaf
            (then what the member's step takes), e.g. from :meth:`sample_batches`.
          outer_batch: the members' outer (validation) batches, likewise.

        Returns:
          ``(state, metrics)``: ``score`` ``(P,)`` the objective of this step; ``member`` the
          members' own metrics ``(P, ...)``; ``hparams`` the PBT values used in this step
          ``(P, ...)``; ``parent`` ``(P,)`` whom each slot copied at the end of this step
          (itself when not replaced); ``exploited`` whether a round ended; ``best`` the member
          with the lowest score; ``replaced`` and ``nonfinite`` the running counts.
        """
        P = int(jnp.shape(state.score)[0])
        for name, tree in (("inner_batches", inner_batches), ("outer_batch", outer_batch)):
            leaves = jax.tree.leaves(tree)
            if not leaves or any(jnp.ndim(a) == 0 or jnp.shape(a)[0] != P for a in leaves):
                raise ValueError(
                    f"every leaf of {name} needs a leading population axis of length {P} (one "
                    f"entry per member; PBT.sample_batches makes them); got shapes "
                    f"{jax.tree.map(jnp.shape, tree)}"
                )
        return self._step(state, inner_batches, outer_batch)

    def sample_batches(
        self,
        state: PBTState,
        inner_data: PyTree,
        outer_data: PyTree,
        batch_size: int,
        outer_batch_size: int | None = None,
    ) -> tuple[PyTree, PyTree]:
        """Every member's next batches (the member's ``sample_batches``, vmapped).

        Each member draws from its own PRNG key and step, so a resumed run replays the same data.

        Args:
          state: current state.
          inner_data, outer_data: full datasets (pytrees with a leading example axis).
          batch_size: rows per inner batch.
          outer_batch_size: rows of the outer batch (default: all of ``outer_data``).

        Returns:
          ``(inner_batches, outer_batch)`` with a leading population axis, for :meth:`step`.
        """
        fn = lambda m: self._sample_fn(m, inner_data, outer_data, batch_size, outer_batch_size)
        return jax.vmap(fn)(state.members)

    def fit(
        self, state: PBTState, inner_data: PyTree, outer_data: PyTree, **kwargs: Any
    ) -> tuple[PBTState, dict[str, np.ndarray]]:
        """:func:`bilevel.fit` on this population: ``fit(self, state, inner_data, outer_data, **kw)``.

        Jitted chunks of :meth:`sample_batches` + :meth:`step`, one progress bar, a history with
        one row per step (``"score"`` and ``"hparams/<name>"`` of shape ``(T, P)``,
        ``"member/<metric>"``, ``"parent"``, ...), callbacks, checkpoints and bit-identical resume.
        Keyword arguments: ``steps``, ``batch_size``, ``outer_batch_size``, ``chunk``,
        ``callbacks``, ``checkpoint_dir``, ``checkpoint_every``, ``resume``, ``progress``,
        ``desc``, ``log_dir``, ``tensorboard``.

        Returns:
          ``(state, history)``.
        """
        from bilevel._fit import fit

        return fit(self, state, inner_data, outer_data, **kwargs)

    def hparams(self, state: PBTState) -> dict[str, jax.Array]:
        """The PBT-managed values of every member, ``(P, ...)`` per name (options decoded)."""
        return self._decode(state.hparams)

    def best(self, state: PBTState) -> int:
        """The member with the lowest score (non-finite scores last; ties: the lowest index)."""
        score = np.asarray(state.score, np.float64)
        return int(np.argmin(np.where(np.isfinite(score), score, np.inf)))

    def member_state(self, state: PBTState, i: int) -> PyTree:
        """Member ``i``'s state, without the population axis (e.g. to :meth:`replay` from)."""
        i = checks.integer("i", i, low=0, high=int(jnp.shape(state.score)[0]) - 1)
        return jax.tree.map(lambda a: a[i], state.members)

    def schedule(self, state: PBTState, member: int | None = None) -> Schedule:
        """The hyperparameter schedule of ``member``'s lineage, round by round.

        Args:
          state: a state after some steps.
          member: which member (default: :meth:`best`).

        Returns:
          A :class:`Schedule`; ``schedule.founder`` is the slot the lineage started from.
        """
        P = int(jnp.shape(state.score)[0])
        member = self.best(state) if member is None else checks.integer("member", member, 0, P - 1)
        rounds = int(state.round) + 1
        capacity = int(jnp.shape(state.lineage.slots)[1])
        if rounds > capacity:
            raise ValueError(
                f"the run has {rounds} rounds but the lineage records only max_rounds={capacity}: "
                f"pass init(..., max_rounds={rounds}) (or more) to replay this run"
            )
        lineage = jax.device_get(state.lineage)  # small; indexed in NumPy, nothing to compile
        values = {}
        for k, v in lineage.hparams.items():
            spec, c = self.space[k], np.asarray(v)[member, :rounds]
            values[k] = spec.decode_numpy(c) if isinstance(spec, hp.Discrete) else np.asarray(c)
        return Schedule(
            hparams=values,
            slots=np.asarray(lineage.slots)[member, :rounds],
            interval=self.interval,
            steps=int(state.step),
            member=member,
        )

    def replay(
        self,
        member_state: PyTree,
        schedule: Schedule,
        inner_data: PyTree,
        outer_data: PyTree,
        *,
        batch_size: int,
        outer_batch_size: int | None = None,
        steps: int | None = None,
    ) -> tuple[PyTree, dict[str, np.ndarray]]:
        """Train one member along a recorded schedule: step ``t`` uses round ``t // interval``'s values.

        From the founder's initial state (``member_state(initial_state, schedule.founder)``) this
        reproduces the lineage's trajectory: the same values, the same data (a copy inherits its
        parent's key), the same steps; from a freshly initialized member it re-trains the
        schedule with a new seed.

        Args:
          member_state: one member's state (no population axis).
          schedule: from :meth:`schedule`.
          inner_data, outer_data, batch_size, outer_batch_size: as for :meth:`sample_batches`.
          steps: steps to run (default ``schedule.steps``; the last round's values continue).

        Returns:
          ``(member_state, metrics)``, ``metrics`` the member's step metrics stacked over steps.
        """
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a bilevel.pbt.Schedule, got {schedule!r}")
        steps = schedule.steps if steps is None else checks.integer("steps", steps, low=0)
        batch_size = checks.integer("batch_size", batch_size)
        values = {
            k: jnp.asarray(v, self.space[k].value.dtype)
            for k, v in schedule.per_step(steps).items()
        }
        cache_key = (batch_size, outer_batch_size)
        if cache_key not in self._replay_cache:

            def run(state, values, inner_data, outer_data):
                def body(state, h):
                    state = self.member.with_hparams(state, h)
                    inner, outer = self._sample_fn(
                        state, inner_data, outer_data, batch_size, outer_batch_size
                    )
                    return self.member.step(state, inner, outer)

                return jax.lax.scan(body, state, values)

            self._replay_cache[cache_key] = jax.jit(run)
        state, metrics = self._replay_cache[cache_key](member_state, values, inner_data, outer_data)
        return state, jax.device_get(metrics)

    # ------------------------------------------------------------------ internals

    def _decode(self, coords: dict) -> dict:
        out = {}
        for k in self.names:
            spec = self.space[k]
            c = jnp.asarray(coords[k])
            out[k] = spec.decode(c) if isinstance(spec, hp.Discrete) else c
        return out

    def _uniforms(self, key, P: int, copies: int) -> dict:
        """``copies`` uniform arrays ``(P, *shape)`` per name, from one draw (one call site
        compiles much faster than one per name on XLA:CPU)."""
        sizes = [P * math.prod(self.space[k].shape) for k in self.names]
        flat = jax.random.uniform(key, (copies * sum(sizes),))
        out, offset = {}, 0
        for k, n in zip(self.names, sizes, strict=True):
            shape = (P, *self.space[k].shape)
            out[k] = tuple(
                flat[offset + i * n : offset + (i + 1) * n].reshape(shape) for i in range(copies)
            )
            offset += copies * n
        return out

    def _initial(self, key, P) -> dict:
        coords = {}
        uniforms = self._uniforms(key, P, 1)
        for k in self.names:
            spec = self.space[k]
            if _resamplable(spec):
                coords[k] = _sample(spec, uniforms[k][0])
            else:
                coords[k] = jnp.broadcast_to(jnp.asarray(spec.value), (P, *spec.shape))
        return coords

    def _coords_of(self, values: Any, P: int) -> dict:
        if not isinstance(values, dict) or set(values) != set(self.names):
            got = sorted(values) if isinstance(values, dict) else type(values).__name__
            raise ValueError(
                f"hparams must be a dict with exactly the space's names {list(self.names)}, "
                f"got {got}"
            )
        coords = {}
        for k in self.names:
            spec = self.space[k]
            v = np.asarray(values[k])
            if v.shape != (P, *spec.shape):
                raise ValueError(
                    f"hparams[{k!r}] has shape {v.shape}; a population of {P} needs "
                    f"{(P, *spec.shape)}"
                )
            if isinstance(spec, hp.Discrete):
                try:
                    coords[k] = jnp.asarray(spec.index(v))
                except ValueError as e:
                    raise ValueError(f"hparams[{k!r}]: {e}") from None
                continue
            if not np.all(np.isfinite(v)):
                raise ValueError(f"hparams[{k!r}] must be finite")
            lo, hi = spec.lower, spec.upper
            if (lo is not None and np.any(v < lo)) or (hi is not None and np.any(v > hi)):
                raise ValueError(f"hparams[{k!r}] must lie within [{lo}, {hi}] ({spec!r})")
            if spec.kind == "log" and np.any(v <= 0):
                raise ValueError(f"hparams[{k!r}] must be > 0 ({spec!r})")
            coords[k] = jnp.asarray(v, spec.value.dtype)
        return coords

    def _draws(self, key: jax.Array, P: int):
        """The uniforms of one exploit round: ``(u_donor (P,), {name: (u_resample, u_factor,
        u_sample)})``, each ``(P, *shape)``, from ``key`` alone."""
        k_donor, k_explore = jax.random.split(key)
        return jax.random.uniform(k_donor, (P,)), self._uniforms(k_explore, P, 3)

    def _exploit(self, key, score, finite, coords):
        """``(parent, replace, new_coords)`` of one round: truncation selection, then explore."""
        P = score.shape[0]
        n = _quantile_size(P, self.fraction)
        u_donor, draws = self._draws(key, P)
        s = jnp.where(finite, score, jnp.inf)
        order = jnp.argsort(s, stable=True).astype(jnp.int32)  # best first
        rank = jnp.zeros(P, jnp.int32).at[order].set(jnp.arange(P, dtype=jnp.int32))
        n_top = jnp.minimum(n, jnp.sum(finite)).astype(jnp.int32)
        top = rank < n_top
        bottom = (rank >= P - n) | ~finite
        replace = bottom & ~top & (n_top > 0)
        pick = jnp.minimum(jnp.floor(u_donor * n_top).astype(jnp.int32), jnp.maximum(n_top - 1, 0))
        parent = jnp.where(replace, order[pick], jnp.arange(P, dtype=jnp.int32))
        factors = jnp.asarray(self.perturb, jnp.float32)
        new = {}
        for k in self.names:
            spec = self.space[k]
            c = coords[k][parent]
            u_res, u_fac, u_new = draws[k]
            f = factors[
                jnp.minimum(jnp.floor(u_fac * len(self.perturb)), len(self.perturb) - 1).astype(
                    jnp.int32
                )
            ]
            explored = _perturb(spec, c, f)
            if _resamplable(spec):
                explored = jnp.where(
                    u_res < self.resample_probability, _sample(spec, u_new), explored
                )
            mask = replace.reshape((P,) + (1,) * (c.ndim - 1))
            new[k] = jnp.where(mask, explored, c)
        return parent, replace, new

    def _sharding(self, population: bool):
        from jax.sharding import NamedSharding, PartitionSpec

        spec = PartitionSpec(self.axis_name) if population else PartitionSpec()
        return NamedSharding(self.mesh, spec)

    def _layout(self, state: PBTState) -> PBTState:
        pop, rep = self._sharding(True), self._sharding(False)
        return PBTState(
            members=jax.tree.map(lambda _: pop, state.members),
            hparams=jax.tree.map(lambda _: pop, state.hparams),
            score=pop,
            step=rep,
            round=rep,
            key=rep,
            lineage=jax.tree.map(lambda _: pop, state.lineage),
            replaced=rep,
            nonfinite=rep,
        )

    def _place(self, state: PBTState) -> PBTState:
        """``state`` on the mesh (outside jit); unchanged without one."""
        if self.mesh is None:
            return state
        return jax.device_put(state, self._layout(state))

    def _constrain(self, tree: PyTree, layout: PyTree | None = None) -> PyTree:
        if self.mesh is None:
            return tree
        if layout is None:
            layout = jax.tree.map(lambda _: self._sharding(True), tree)
        return jax.lax.with_sharding_constraint(tree, layout)

    def _objective(self, metrics) -> jax.Array:
        if not isinstance(metrics, dict) or self.objective not in metrics:
            have = sorted(metrics) if isinstance(metrics, dict) else type(metrics).__name__
            raise ValueError(
                f"objective={self.objective!r} is not a metric of the member's step (it returns "
                f"{have}); pass PBT(..., objective=<one of them>)"
            )
        score = metrics[self.objective]
        if jnp.ndim(score) != 1:
            raise ValueError(
                f"the objective {self.objective!r} must be one scalar per member, got shape "
                f"{jnp.shape(score)[1:]} per member"
            )
        return score.astype(jnp.float32)

    def _step_impl(self, state: PBTState, inner_batches, outer_batch):
        if self.mesh is not None:
            state = self._constrain(state, self._layout(state))
            inner_batches, outer_batch = self._constrain((inner_batches, outer_batch))
        P = state.score.shape[0]
        values = self._decode(state.hparams)
        members = jax.vmap(self.member.with_hparams)(state.members, values)
        members, metrics = jax.vmap(self.member.step)(members, inner_batches, outer_batch)
        score = self._objective(metrics)
        finite = jnp.isfinite(score) & jax.vmap(_finite)(members)
        step = state.step + 1
        due = step % self.interval == 0
        identity = jnp.arange(P, dtype=jnp.int32)

        def exploit(operands):
            members, coords, lineage, score = operands
            key = jax.random.fold_in(state.key, state.round)
            parent, replace, new = self._exploit(key, score, finite, coords)
            members = jax.tree.map(lambda a: a[parent], members)
            members = jax.vmap(self.member.with_hparams)(members, self._decode(new))
            r = state.round + 1
            slots = lineage.slots[parent].at[:, r].set(identity, mode="drop")
            lineage_hp = {
                k: lineage.hparams[k][parent].at[:, r].set(new[k], mode="drop") for k in self.names
            }
            out = (members, new, Lineage(slots, lineage_hp), jnp.where(replace, jnp.inf, score))
            return out, parent, replace

        def keep(operands):
            return operands, identity, jnp.zeros(P, bool)

        (members, coords, lineage, new_score), parent, replace = jax.lax.cond(
            due, exploit, keep, (members, state.hparams, state.lineage, score)
        )
        new_state = PBTState(
            members=members,
            hparams=coords,
            score=new_score,
            step=step,
            round=state.round + due.astype(jnp.int32),
            key=state.key,
            lineage=lineage,
            replaced=state.replaced + jnp.sum(replace).astype(jnp.int32),
            nonfinite=state.nonfinite + jnp.sum(replace & ~finite).astype(jnp.int32),
        )
        if self.mesh is not None:
            new_state = self._constrain(new_state, self._layout(new_state))
        best = jnp.argmin(jnp.where(jnp.isfinite(score), score, jnp.inf)).astype(jnp.int32)
        return new_state, {
            "score": score,
            "member": metrics,
            "hparams": values,
            "parent": parent,
            "exploited": due,
            "best": best,
            "replaced": new_state.replaced,
            "nonfinite": new_state.nonfinite,
        }
