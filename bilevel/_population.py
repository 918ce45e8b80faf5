r"""A vmapped population of online tuners with restarts: use the whole budget, not one run.

One :class:`bilevel.BilevelOptimizer` run tunes its hyperparameters during *one* training run; a
wall-clock budget of many training runs is then mostly left unused. :class:`Population` runs
``size`` tuners at once (``jax.vmap``: one compiled program, batched matrix products) from
different initial hyperparameters and seeds, scores each final model, and restarts: every member
trains a fresh model (new weights, new data order) from hyperparameters carried over from the
best members of the previous round, so the next round starts where the gradient steps left off.
With ``size=1`` it is a single tuner with warm restarts.

Not population-based training (PBT): no weights are copied between members and nothing changes
in the middle of a run; the hypergradient steps move the hyperparameters within a run, the
restart only chooses where each member's next run starts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bilevel import hparams as hp
from solvers import checks

__all__ = ["Population", "PopulationState", "RoundResult"]

PyTree = Any


class PopulationState(NamedTuple):
    """State of :class:`Population` (a pytree; the members carry a leading axis ``size``).

    Attributes:
      members: the members' :class:`bilevel.BilevelState`, stacked.
      start: the unconstrained hyperparameters each member started its current run from.
      round: completed rounds (restarts), int32.
      key: the PRNG key the restarts draw from.
      explore: the unconstrained values of the explored ``fixed_hparams`` each member started
        its run with (``{}`` without ``explore``).
    """

    members: Any
    start: PyTree
    round: jax.Array
    key: jax.Array
    explore: PyTree = None


class RoundResult(NamedTuple):
    """What one round (one training run per member) produced, as NumPy arrays.

    Attributes:
      scores: ``score(params)`` of each member's final model, shape ``(size,)`` (``inf`` where
        not finite).
      start: the constrained hyperparameters each member started from (leading axis ``size``).
      final: the constrained hyperparameters at the end of the run.
      schedule: the constrained hyperparameters after every outer step, leading axes
        ``(size, steps)``: the schedule each model was trained with.
      records: ``record(state)`` after every outer step (``(size, steps, ...)``), or ``None``.
      outer_loss: the outer loss of every outer step, shape ``(size, steps)``.
    """

    scores: np.ndarray
    start: PyTree
    final: PyTree
    schedule: PyTree
    records: PyTree
    outer_loss: np.ndarray


class Population:
    r"""``size`` online tuners in one vmapped program, restarted from the best hyperparameters.

    A round trains every member for a budget of ``train_steps`` inner steps (``n`` outer steps of
    ``opt`` and a tail of training steps, as ``bilevel.fit(train_steps=...)``), scores the final
    models, :math:`s_i = \text{score}(w_i)`, and :meth:`restart` starts the next round: with
    members ranked by score and :math:`k = \max(1, \mathrm{round}(\text{keep} \cdot
    \text{size}))`,

    .. math:: u^{next}_{(j)} = u^{final}_{(j)} \ (j < k), \qquad
       u^{next}_{(j)} = u^{final}_{(j \bmod k)} + \sigma \varepsilon_j,\
       \varepsilon_j \sim \mathcal N(0, I) \ (j \ge k),

    in the unconstrained space (``sigma = jitter``: a factor :math:`e^{\sigma}` for log-scale
    hyperparameters), and fresh weights, optimizer states and data orders for everyone. The
    first round starts member 0 at the space's initial values (or ``hparams``) and the others at
    :math:`u_0 + \text{spread}\,\varepsilon_i`.

    Costs ``size`` times one tuner's run per round (vmapped: no speed-up on a saturated CPU,
    better use of wide hardware); ``python -m experiments.hpo_benchmark`` measures both.

    Args:
      opt: the tuner (:class:`bilevel.BilevelOptimizer`, or a subclass with its own
        ``sample_batches``, e.g. one that adds dropout keys to the batches).
      size: members (``>= 1``).
      init_params: ``init_params(key) -> params``: a fresh model for a member's run.
      score: ``score(params) -> scalar`` (lower is better), e.g. the validation loss of the final
        model on the whole validation set.
      spread: standard deviation of the first round's initial hyperparameters around ``u_0``
        (unconstrained units).
      keep: fraction of members whose hyperparameters survive a restart unchanged.
      jitter: standard deviation added to the copied hyperparameters of the others.
      record: optional ``record(state) -> pytree`` logged after every outer step (e.g. the
        learning rate of an ``hd_*`` inner optimizer).
      explore: optional ``{name: spec}`` (:mod:`bilevel.hparams` specs) for some of
        ``opt.fixed_hparams``: hyperparameters no hypergradient reaches (e.g. the initial rate
        of ``inner_optimizer=lambda h: bilevel.hd_adam(h["lr"])`` under an implicit method)
        that the population explores instead. Each member starts its run from its own value
        (``spread`` around the spec's initial value in the first round) and a restart carries
        the values like the tuned ones (kept, or copied from the best half with ``jitter``).

    Example:
      >>> import jax, jax.numpy as jnp, optax, solvers, bilevel
      >>> from bilevel._population import Population
      >>> X = jax.random.normal(jax.random.key(0), (90, 3)); y = X @ jnp.ones(3)
      >>> inner = lambda w, h, b: jnp.mean((b[0] @ w - b[1]) ** 2) + h["wd"] * w @ w
      >>> outer = lambda w, h, b: jnp.mean((b[0] @ w - b[1]) ** 2)
      >>> opt = bilevel.BilevelOptimizer(inner, outer, inner_optimizer=optax.sgd(0.1),
      ...     space={"wd": bilevel.hparams.log(0.1)}, method=solvers.Implicit(), inner_steps=4)
      >>> pop = Population(opt, 3, init_params=lambda k: jnp.zeros(3),
      ...                  score=lambda w: outer(w, None, (X[60:], y[60:])))
      >>> state = pop.init(jax.random.key(1))
      >>> state, result = pop.run(state, (X[:60], y[:60]), (X[60:], y[60:]), train_steps=18,
      ...                         batch_size=16)
      >>> result.scores.shape, result.schedule["wd"].shape    # 4 outer steps and a tail of 2
      ((3,), (3, 4))
      >>> state = pop.restart(state, result.scores)
    """

    def __init__(
        self,
        opt: Any,
        size: int,
        *,
        init_params: Callable[[jax.Array], PyTree],
        score: Callable[[PyTree], Any],
        spread: float = 1.0,
        keep: float = 0.5,
        jitter: float = 0.5,
        record: Callable[[Any], PyTree] | None = None,
        explore: dict | None = None,
    ):
        for name in ("init", "step", "warmup", "sample_batches", "hparams"):
            if not callable(getattr(opt, name, None)):
                raise TypeError(
                    f"opt must be a bilevel.BilevelOptimizer (it needs {name}), got "
                    f"{type(opt).__name__}"
                )
        for name, fn in (("init_params", init_params), ("score", score), ("record", record)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be a function, got {fn!r}")
        self.opt = opt
        self.size = checks.integer("size", size)
        self.init_params = init_params
        self.score = score
        self.spread = checks.number("spread", spread, low=0.0)
        self.keep = checks.number("keep", keep, low=0.0, high=1.0, low_open=True)
        self.jitter = checks.number("jitter", jitter, low=0.0)
        self.record = record
        self.explore = _check_explore(explore, opt)
        self._compiled: dict = {}
        self._fresh_jit = None

    # ------------------------------------------------------------------ public API

    def init(
        self,
        key: jax.Array,
        hparams: PyTree | None = None,
        spread: float | None = None,
        explore: PyTree | None = None,
    ) -> PopulationState:
        """The first round's state: member 0 at ``hparams`` (unconstrained; default the space's
        initial values), the others spread around it, each with fresh weights.

        Args:
          key: a PRNG key (``jax.random.key(seed)``).
          hparams: optional unconstrained hyperparameters of member 0 (one set, no member axis).
          spread: overrides the constructor's ``spread`` (``0``: every member starts at
            ``hparams``, with its own weights and data order: a check over seeds).
          explore: optional unconstrained values of the explored ``fixed_hparams`` for member 0
            (default the specs' initial values), e.g. ``state.explore`` of a member to replay.

        Returns:
          A :class:`PopulationState`.
        """
        key = _typed(key)
        u0 = _start(self.opt.space, hparams)
        if self.explore:
            e0 = _start(self.explore, explore)
        elif explore:
            raise ValueError("explore= values need a Population built with explore= specs")
        else:
            e0 = {}
        k_spread, k_next = jax.random.split(jax.random.fold_in(key, 1))
        noise = _normal_like(k_spread, (u0, e0), self.size)
        spread = self.spread if spread is None else checks.number("spread", spread, low=0.0)
        u, e = jax.tree.map(lambda a, n: a[None] + spread * n.at[0].set(0.0), (u0, e0), noise)
        return self._fresh(u, e, k_next, jnp.asarray(0, jnp.int32))

    def run(
        self,
        state: PopulationState,
        inner_data: PyTree,
        outer_data: PyTree,
        *,
        train_steps: int,
        batch_size: int,
        outer_batch_size: int | None = None,
    ) -> tuple[PopulationState, RoundResult]:
        """One round: every member trains ``train_steps`` inner steps while tuning (jitted).

        Args:
          state: the round's state (from :meth:`init` or :meth:`restart`).
          inner_data, outer_data: the training and validation sets (leading example axis).
          train_steps: the training budget of one run, in inner steps (``inner_steps`` need
            not divide it: the remainder runs as training steps without a hypergradient step).
          batch_size, outer_batch_size: as for :meth:`bilevel.BilevelOptimizer.sample_batches`.

        Returns:
          ``(state, result)``: the trained members and a :class:`RoundResult`.
        """
        run = self.compile(
            state,
            inner_data,
            outer_data,
            train_steps=train_steps,
            batch_size=batch_size,
            outer_batch_size=outer_batch_size,
        )
        members, scores, schedule, records, losses = run(state.members, inner_data, outer_data)
        scores = np.asarray(scores, np.float64)
        result = RoundResult(
            scores=np.where(np.isfinite(scores), scores, np.inf),
            start=jax.device_get(self._values(members, state.start)),
            final=jax.device_get(self._values(members, members.hparams)),
            schedule=jax.device_get(schedule),
            records=None if self.record is None else jax.device_get(records),
            outer_loss=np.asarray(losses),
        )
        return state._replace(members=members), result

    def compile(
        self,
        state: PopulationState,
        inner_data: PyTree,
        outer_data: PyTree,
        *,
        train_steps: int,
        batch_size: int,
        outer_batch_size: int | None = None,
        compiler_options: dict | None = None,
    ):
        """Compile (once per sizes and shapes) and return the round function :meth:`run` calls.

        Call it before timing a run to keep compilation out of the measurement; the arguments
        are those of :meth:`run`, and ``compiler_options`` are passed to XLA.
        """
        train_steps = checks.integer("train_steps", train_steps)
        batch_size = checks.integer("batch_size", batch_size)
        outer_batch_size = checks.optional_integer("outer_batch_size", outer_batch_size)
        k = self.opt.inner_steps
        steps, tail = divmod(train_steps, k)
        if steps < 1:
            raise ValueError(
                f"train_steps={train_steps} is less than one outer step of inner_steps={k}"
            )
        shapes = jax.tree.map(
            lambda a: (jnp.shape(a), jnp.result_type(a)), (inner_data, outer_data)
        )
        cache_key = (steps, tail, batch_size, outer_batch_size, str(shapes))
        if cache_key not in self._compiled:
            # The arrays score closes over (a validation set) become arguments of the compiled
            # program, not constants folded into it.
            like = jax.tree.map(lambda a: a[0], state.members.params)
            self._score_fn, consts = jax.closure_convert(self.score, like)
            fn = jax.jit(jax.vmap(self._member_run(steps, tail, batch_size, outer_batch_size),
                                  in_axes=(0, None, None, None)))  # fmt: skip
            lowered = fn.lower(state.members, inner_data, outer_data, consts)
            compiled = lowered.compile(compiler_options or None)
            self._compiled[cache_key] = lambda m, i, o, c=consts, f=compiled: f(m, i, o, c)
        return self._compiled[cache_key]

    def restart(self, state: PopulationState, scores: Any) -> PopulationState:
        """The next round: hyperparameters carried from the best members, fresh models.

        Args:
          state: the state after :meth:`run`.
          scores: the round's scores (lower is better; non-finite ranks last).

        Returns:
          A :class:`PopulationState` for the next round.
        """
        scores = np.asarray(scores, np.float64).reshape(-1)
        if scores.shape != (self.size,):
            raise ValueError(f"scores must have shape ({self.size},), got {scores.shape}")
        scores = np.where(np.isfinite(scores), scores, np.inf)
        order = np.argsort(scores, kind="stable")
        n_keep = max(1, round(self.keep * self.size))
        parents = np.asarray([order[j % n_keep] for j in range(self.size)])
        parents[order[:n_keep]] = order[:n_keep]  # the kept members continue from themselves
        kept = np.zeros(self.size, bool)
        kept[order[:n_keep]] = True
        k_noise, k_next = jax.random.split(state.key)
        carried = (state.members.hparams, state.explore)
        noise = _normal_like(k_noise, jax.tree.map(lambda a: a[0], carried), self.size)
        u, e = jax.tree.map(
            lambda a, n: a[parents] + self.jitter * jnp.where(
                jnp.asarray(kept).reshape((-1,) + (1,) * (a.ndim - 1)), 0.0, n
            ),
            carried,
            noise,
        )  # fmt: skip
        return self._fresh(u, e, k_next, state.round + 1)

    # ------------------------------------------------------------------ internals

    def _values(self, members, u):
        return jax.vmap(self.opt.hparams)(members._replace(hparams=u))

    def _fresh(self, u, e, key, round_):
        if self._fresh_jit is None:
            self._fresh_jit = jax.jit(self._fresh_impl)
        return self._fresh_jit(u, e, key, jnp.asarray(round_, jnp.int32))

    def _fresh_impl(self, u, e, key, round_):
        """Fresh members (weights, optimizer and method states, keys) at hyperparameters ``u``
        and explored values ``e`` (unconstrained)."""
        k_params, k_runs, k_next = jax.random.split(key, 3)
        params = jax.vmap(self.init_params)(jax.random.split(k_params, self.size))

        def init(p, uu, ee, kk):
            if not self.explore:
                return self.opt.init(p, hparams=uu, key=kk)
            return self.opt.init(p, hparams=uu, key=kk,
                                 fixed_hparams=hp.constrain(self.explore, ee))  # fmt: skip

        members = jax.vmap(init)(params, u, e, jax.random.split(k_runs, self.size))
        return PopulationState(members, u, round_, k_next, e)

    def _member_run(self, steps, tail, batch_size, outer_batch_size):
        opt = self.opt

        def run(state, inner_data, outer_data, consts):
            def body(s, _):
                inner, outer = opt.sample_batches(
                    s, inner_data, outer_data, batch_size, outer_batch_size
                )
                s, metrics = opt.step(s, inner, outer)
                rec = None if self.record is None else self.record(s)
                return s, (opt.hparams(s), rec, metrics["outer_loss"])

            state, (schedule, records, losses) = jax.lax.scan(body, state, None, length=steps)
            if tail:
                inner, _ = opt.sample_batches(
                    state, inner_data, outer_data, batch_size, outer_batch_size
                )
                inner = jax.tree.map(lambda a: a[:tail] if a.shape[0] > 1 else a, inner)
                state = opt.warmup(state, inner, steps=tail)[0]
            score = jnp.asarray(self._score_fn(state.params, *consts), jnp.float32)
            return state, score, schedule, records, losses

        return run


def _start(space, values) -> PyTree:
    """Unconstrained start values: the space's initial values, or ``values`` checked against it."""
    if values is None:
        return hp.init(space)
    hp.constrain(space, values)  # structure and shape check, names the entry
    return jax.tree.map(jnp.asarray, values)


def _check_explore(explore, opt) -> dict:
    """``explore`` as a dict of continuous specs, each naming one of ``opt.fixed_hparams``."""
    if explore is None:
        return {}
    if not isinstance(explore, dict):
        raise TypeError(
            f"explore must be a dict {{name: bilevel.hparams spec}}, got {type(explore).__name__}"
        )
    fixed = getattr(opt, "fixed_hparams", {}) or {}
    unknown = sorted(map(str, set(explore) - set(fixed)))
    if unknown:
        raise ValueError(
            f"explore names {unknown}, which are not fixed_hparams of the tuner "
            f"({sorted(map(str, fixed))}): pass them to BilevelOptimizer(fixed_hparams=...) "
            "with their default values"
        )
    for name, spec in explore.items():
        if not isinstance(spec, hp.Hyperparameter):
            raise TypeError(
                f"explore[{name!r}] must be a continuous bilevel.hparams spec (log, unit, "
                f"bounded, real), got {spec!r}"
            )
        if spec.shape != np.shape(fixed[name]):
            raise ValueError(
                f"explore[{name!r}] has shape {spec.shape}, fixed_hparams[{name!r}] "
                f"{np.shape(fixed[name])}: they must match"
            )
    return dict(explore)


def _typed(key):
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    if key.dtype == jnp.uint32 and key.shape == (2,):
        return jax.random.wrap_key_data(key)
    raise TypeError(f"key must be a PRNG key (jax.random.key(seed)), got {key!r}")


def _normal_like(key, tree, size):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, max(len(leaves), 1))
    return jax.tree.unflatten(
        treedef,
        [
            jax.random.normal(k, (size, *jnp.shape(a)), jnp.result_type(a))
            for k, a in zip(keys, leaves, strict=False)
        ],
    )
