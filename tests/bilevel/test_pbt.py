"""Population Based Training (``bilevel.pbt``): exploit / explore against a NumPy transcription,
lineage replay, a quadratic with a known optimal learning rate, non-finite members, sharding,
checkpoints and the argument checks.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel
import solvers
from bilevel import hparams as H
from bilevel import pbt
from tests._docs_examples import run_example

ROOT = Path(__file__).resolve().parents[2]
D = 5


def _data():
    rs = np.random.RandomState(0)
    X = jnp.asarray(rs.randn(60, D), jnp.float32)
    y = X @ jnp.linspace(-1.0, 1.0, D) + 0.3 * jnp.asarray(rs.randn(60), jnp.float32)
    return (X[:40], y[:40]), (X[40:], y[40:])


def inner(w, h, b):
    return jnp.mean((b[0] @ w - b[1]) ** 2) + h["wd"] * jnp.sum(w**2)


def outer(w, h, b):
    return jnp.mean((b[0] @ w - b[1]) ** 2)


def _bilevel_member(**kw):
    return bilevel.BilevelOptimizer(
        inner,
        outer,
        inner_optimizer=lambda h: optax.sgd(h["lr"], momentum=h["momentum"]),
        outer_optimizer=optax.adam(0.05),
        space={"wd": H.log(0.1)},
        method=solvers.Implicit(linear_solver=solvers.cg(maxiter=5)),
        inner_steps=3,
        fixed_hparams={"lr": 0.01, "momentum": 0.5},
        **kw,
    )


SPACE = {"lr": H.log(0.01, 1e-3, 0.5), "momentum": H.choice([0.0, 0.5, 0.9])}


# ----------------------------------------------------------------------------- exploit / explore

TOY_SPACE = {
    "lr": H.log(0.01, 1e-4, 1.0),  # bounded log: resampled log-uniformly
    "drop": H.unit(0.2, 0.0, 0.6),  # bounded linear
    "scale": H.log(1.0),  # unbounded: never resampled
    "shift": H.real(jnp.array([0.5, -1.0])),  # an array of hyperparameters
    "width": H.choice([16, 32, 64, 128]),
    "depth": H.integer(1, 6, init=3),
}


def _np_exploit(tuner, key, score, finite_state, coords):
    """NumPy transcription of one exploit / explore round from the same uniforms."""
    P = len(score)
    u_donor, draws = jax.tree.map(np.asarray, tuner._draws(key, P))
    n = min(math.ceil(P * tuner.fraction), P // 2)
    finite = np.isfinite(score) & finite_state
    order = np.argsort(np.where(finite, score, np.inf), kind="stable")
    rank = np.empty(P, int)
    rank[order] = np.arange(P)
    n_top = min(n, int(finite.sum()))
    parent, replaced = np.arange(P), np.zeros(P, bool)
    for i in range(P):
        if n_top > 0 and (rank[i] >= P - n or not finite[i]) and rank[i] >= n_top:
            replaced[i] = True
            parent[i] = order[min(int(np.floor(u_donor[i] * n_top)), n_top - 1)]
    factors = tuner.perturb
    new = {}
    for name, spec in tuner.space.items():
        c = np.array(np.asarray(coords[name])[parent])
        u_res, u_fac, u_new = draws[name]
        for i in np.flatnonzero(replaced):
            for j in np.ndindex(c.shape[1:]):
                ij = (i, *j)
                f = factors[min(int(np.floor(u_fac[ij] * len(factors))), len(factors) - 1)]
                c[ij] = _np_explore(spec, c[ij], f, u_res[ij], u_new[ij], tuner)
        new[name] = c
    return parent, replaced, new


def _np_explore(spec, c, f, u_res, u_new, tuner):
    if isinstance(spec, H.Discrete):
        k = spec.num_options
        if u_res < tuner.resample_probability:
            return min(int(np.floor(u_new * k)), k - 1)
        step = int(np.sign(f - 1.0))
        if spec.kind == "choice":
            return min(max(c + step, 0), k - 1)
        v = c + spec.lower
        scaled = float(np.round(np.float32(v) * np.float32(f)))
        if scaled == v:
            scaled = v + step * (-1 if v < 0 else 1)
        return int(np.clip(scaled, spec.lower, spec.upper)) - spec.lower
    bounded = spec.kind != "real" and spec.lower is not None and spec.upper is not None
    if bounded and u_res < tuner.resample_probability:
        lo, hi = spec.lower, spec.upper
        if spec.kind == "log":
            return np.exp(np.log(lo) + u_new * (np.log(hi) - np.log(lo)))
        return lo + u_new * (hi - lo)
    v = np.float32(c) * np.float32(f)
    if spec.kind != "real":
        v = np.clip(v, spec.lower, spec.upper)
    return v


_TOY: dict = {}


def _toy(**kw):
    """``(tuner, jitted exploit, initial coordinates)`` of a PBT over TOY_SPACE (cached)."""
    key = tuple(sorted(kw.items()))
    if key not in _TOY:
        loss = lambda w, h, b: jnp.sum(w**2)
        tuner = pbt.PBT(pbt.optax_member(loss, optax.sgd(0.1)), TOY_SPACE, interval=1, **kw)
        initial = jax.jit(tuner._initial, static_argnums=1)
        _TOY[key] = (tuner, jax.jit(tuner._exploit), lambda P: initial(jax.random.key(0), P))
    return _TOY[key]


@pytest.mark.parametrize(
    "fraction, nonfinite",
    [(0.25, ()), (0.25, (2,)), (0.5, (0, 5)), (0.25, (1, 3, 4, 6, 7)), (0.0, (3,))],
)
def test_exploit_and_explore_match_a_numpy_transcription(fraction, nonfinite):
    tuner, exploit, initial = _toy(fraction=fraction, resample_probability=0.3)
    P = 8
    coords = initial(P)
    for seed in range(6):
        key = jax.random.key(100 + seed)
        score = np.random.RandomState(seed).permutation(P).astype(np.float32)
        finite_state = np.ones(P, bool)
        for i in nonfinite:
            if i % 2:
                score[i] = np.nan  # a non-finite objective
            else:
                finite_state[i] = False  # or a non-finite member state
        parent, replace, new = exploit(
            key, jnp.asarray(score), jnp.asarray(np.isfinite(score) & finite_state), coords
        )
        want_parent, want_replace, want_new = _np_exploit(tuner, key, score, finite_state, coords)
        np.testing.assert_array_equal(np.asarray(parent), want_parent)
        np.testing.assert_array_equal(np.asarray(replace), want_replace)
        for name, spec in TOY_SPACE.items():
            got = np.asarray(new[name])
            if isinstance(spec, H.Discrete):
                np.testing.assert_array_equal(got, want_new[name], err_msg=name)
            else:
                np.testing.assert_allclose(got, want_new[name], rtol=2e-6, err_msg=name)
        coords = new  # the next round starts from these values


def test_truncation_selection_copies_the_top_quantile_into_the_bottom_one():
    _, exploit, initial = _toy()
    P = 8
    coords = initial(P)
    score = jnp.asarray([5.0, 0.0, 7.0, 1.0, 3.0, 6.0, 2.0, 4.0])  # best: 1, 3; worst: 2, 5
    seen = set()
    for seed in range(20):
        parent, replace, new = exploit(jax.random.key(seed), score, jnp.ones(P, bool), coords)
        assert np.flatnonzero(np.asarray(replace)).tolist() == [2, 5]
        for i in range(P):
            if i in (2, 5):
                assert int(parent[i]) in (1, 3)
                seen.add(int(parent[i]))
            else:
                assert int(parent[i]) == i
                for name in TOY_SPACE:
                    np.testing.assert_array_equal(new[name][i], coords[name][i])
        for name, spec in TOY_SPACE.items():
            if isinstance(spec, H.Discrete):
                assert np.all((np.asarray(new[name]) >= 0) & (new[name] < spec.num_options))
            elif spec.lower is not None and spec.upper is not None:
                assert np.all((np.asarray(new[name]) >= spec.lower) & (new[name] <= spec.upper))
    assert seen == {1, 3}  # the donor is drawn from the whole top quantile


def test_quantile_size_follows_ray_tune():
    from bilevel.pbt._population import _quantile_size

    # Ray Tune: ceil(P q), at most floor(P / 2).
    cases = {(8, 0.25): 2, (5, 0.25): 2, (3, 0.25): 1, (4, 0.5): 2, (5, 0.5): 2, (8, 0.0): 0}
    for (P, q), n in cases.items():
        assert _quantile_size(P, q) == n, (P, q)
    loss = lambda w, h, b: jnp.sum(w**2)
    member = pbt.optax_member(loss, optax.sgd(0.1))
    tuner = pbt.PBT(member, {"lr": H.log(0.1, 1e-3, 1.0)}, interval=1, fraction=0.5)
    score = jnp.asarray([4.0, 0.0, 3.0, 1.0, 2.0])
    coords = {"lr": jnp.full(5, 0.1)}
    _, replace, _ = jax.jit(tuner._exploit)(jax.random.key(0), score, jnp.ones(5, bool), coords)
    assert np.flatnonzero(np.asarray(replace)).tolist() == [0, 2]


def test_discrete_perturbations_move_to_a_neighbour_or_scale_an_integer():
    from bilevel.pbt._population import _perturb

    width, depth = H.choice([16, 32, 64]), H.integer(-3, 10)
    idx = jnp.asarray([0, 1, 2])
    np.testing.assert_array_equal(_perturb(width, idx, jnp.float32(1.2)), [1, 2, 2])
    np.testing.assert_array_equal(_perturb(width, idx, jnp.float32(0.8)), [0, 0, 1])
    values = jnp.asarray([-3, -1, 0, 1, 4, 10])
    up = _perturb(depth, values - depth.lower, jnp.float32(1.2)) + depth.lower
    down = _perturb(depth, values - depth.lower, jnp.float32(0.8)) + depth.lower
    np.testing.assert_array_equal(up, [-3, -2, 1, 2, 5, 10])  # at least one step, clipped
    np.testing.assert_array_equal(down, [-2, 0, -1, 0, 3, 8])


# ----------------------------------------------------------------------------- a whole run


@pytest.fixture(scope="module")
def run():
    """A population of BilevelOptimizers (wd by hypergradient; lr, momentum by PBT), fitted."""
    train, val = _data()
    tuner = pbt.PBT(_bilevel_member(), SPACE, interval=2)
    state0 = tuner.init(jax.random.key(0), 8, jnp.zeros(D), max_rounds=20)
    state, history = tuner.fit(state0, train, val, steps=12, batch_size=8, chunk=4, progress=False)
    return tuner, state0, state, history, train, val


def test_a_run_exploits_every_interval_and_records_what_it_did(run):
    _, _, state, history, _, _ = run
    assert int(state.step) == 12 and int(state.round) == 6
    np.testing.assert_array_equal(history["exploited"], np.arange(1, 13) % 2 == 0)
    assert history["score"].shape == (12, 8) and history["hparams/lr"].shape == (12, 8)
    assert int(state.replaced) == 6 * 2 and int(state.nonfinite) == 0
    # PBT wrote its values into the members' fixed_hparams; the gradient tuner moved wd.
    np.testing.assert_allclose(history["member/hparams/lr"], history["hparams/lr"])
    assert np.all(history["member/hparams/wd"][-1] != pytest.approx(0.1))
    momenta = set(np.unique(history["hparams/momentum"]).tolist())
    assert momenta <= set(np.float32([0.0, 0.5, 0.9]).tolist())
    # The parents of the replaced members were in the top quantile of that step's scores.
    for t in np.flatnonzero(history["exploited"]):
        parent, score = history["parent"][t], history["score"][t]
        top = set(np.argsort(score, kind="stable")[:2].tolist())
        for i in np.flatnonzero(parent != np.arange(8)):
            assert int(parent[i]) in top


def test_replaying_the_best_schedule_reproduces_its_trajectory(run):
    tuner, state0, state, history, train, val = run
    schedule = tuner.schedule(state)
    assert schedule.member == tuner.best(state)
    assert len(set(schedule.slots.tolist())) > 1  # the lineage did copy other members
    replayed, metrics = tuner.replay(
        tuner.member_state(state0, schedule.founder), schedule, train, val, batch_size=8
    )
    best = tuner.member_state(state, schedule.member)
    np.testing.assert_allclose(replayed.params, best.params, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(replayed.hparams["wd"], best.hparams["wd"], rtol=1e-5)
    np.testing.assert_allclose(
        metrics["outer_loss"], schedule.along(history["member/outer_loss"]), rtol=1e-5
    )
    np.testing.assert_allclose(metrics["hparams"]["lr"], schedule.per_step()["lr"], rtol=0, atol=0)
    # A member trained along another member's schedule does not reproduce it.
    other, _ = tuner.replay(
        tuner.member_state(state0, (schedule.founder + 1) % 8), schedule, train, val, batch_size=8
    )
    assert not np.allclose(other.params, best.params, rtol=1e-3)


def test_schedule_reads_values_along_the_lineage(run):
    tuner, _, state, history, _, _ = run
    s = tuner.schedule(state, member=3)
    per_step = s.per_step()
    assert per_step["lr"].shape == (12,)
    for t in range(12):
        slot = s.slots[t // 2]
        assert history["hparams/lr"][t, slot] == per_step["lr"][t] == s.at(t)["lr"]
    np.testing.assert_array_equal(s.along(history["hparams/lr"]), per_step["lr"])
    with pytest.raises(ValueError, match=r"max_rounds=1"):
        short = state._replace(lineage=jax.tree.map(lambda a: a[:, :1], state.lineage))
        tuner.schedule(short)


def test_resume_from_a_checkpoint_is_bit_identical(run, tmp_path):
    tuner, state0, state, history, train, val = run
    stop = lambda step, s, m: step >= 4
    kw = dict(batch_size=8, chunk=4, progress=False, checkpoint_dir=tmp_path)
    tuner.fit(state0, train, val, steps=12, callbacks=stop, **kw)
    resumed, resumed_history = tuner.fit(state0, train, val, steps=12, **kw)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(resumed), strict=True):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for k in history:
        np.testing.assert_array_equal(history[k], resumed_history[k], err_msg=k)
    # save_checkpoint / restore_checkpoint directly, like every tuner.
    bilevel.save_checkpoint(tmp_path / "direct", state, int(state.step))
    restored, step = bilevel.restore_checkpoint(tmp_path / "direct", like=state0)
    assert step == 12
    np.testing.assert_array_equal(restored.lineage.slots, state.lineage.slots)


def test_no_retrace_on_the_second_jitted_call(run):
    tuner, state0, _, _, train, val = run
    step = jax.jit(chex.assert_max_traces(tuner.step, n=1))
    state = state0
    for _ in range(2):
        state, _ = step(state, *tuner.sample_batches(state, train, val, 8))
    chex.clear_trace_counter()


def test_fraction_zero_runs_independent_members():
    train, val = _data()
    member = pbt.optax_member(inner, lambda h: optax.sgd(h["lr"]), outer_loss=outer)
    space = {"lr": H.log(0.01, 1e-3, 0.5), "wd": H.log(0.01, 1e-4, 1.0)}
    tuner = pbt.PBT(member, space, interval=1, fraction=0.0)
    state = tuner.init(jax.random.key(0), 4, jnp.zeros(D))
    values = tuner.hparams(state)
    for _ in range(3):
        state, metrics = tuner.step(state, *tuner.sample_batches(state, train, val, 8))
    assert int(state.replaced) == 0
    np.testing.assert_array_equal(metrics["parent"], np.arange(4))
    for k in values:
        np.testing.assert_array_equal(tuner.hparams(state)[k], values[k])


# ----------------------------------------------------------------------------- known optimum


def test_finds_the_optimal_learning_rate_of_a_quadratic_within_2x():
    # Gradient descent on f(w) = a/2 |w|^2 contracts by |1 - lr a| per step: lr* = 1/a.
    # The population starts 10-100x too small; it must climb by perturbation and resampling.
    a = 4.0
    with jax.enable_x64(True):
        loss = lambda w, h, b: 0.5 * a * jnp.sum(w**2)
        log_loss = lambda w, h, b: jnp.log(loss(w, h, b) + 1e-300)  # no underflow to -inf
        member = pbt.optax_member(loss, lambda h: optax.sgd(h["lr"]), outer_loss=log_loss)
        tuner = pbt.PBT(member, {"lr": H.log(1e-3, 1e-5, 2.0)}, interval=3)
        P = 16
        batch = jnp.zeros((P, 1, 1))
        for seed in range(3):
            start = {"lr": jnp.geomspace(0.01 / a, 0.1 / a, P)}
            state = tuner.init(jax.random.key(seed), P, jnp.ones(2), hparams=start)
            for _ in range(60):
                state, _ = tuner.step(state, batch, batch)
            lr = float(tuner.hparams(state)["lr"][tuner.best(state)])
            assert 0.5 / a <= lr <= 2.0 / a, (seed, lr)


# ----------------------------------------------------------------------------- non-finite members


def test_nonfinite_members_rank_last_and_are_replaced_and_counted():
    # A member whose learning rate exceeds 0.5 reports a NaN objective.
    loss = lambda w, h, b: jnp.sum((w - 1.0) ** 2)
    bad = lambda w, h, b: jnp.where(h["lr"] > 0.5, jnp.nan, loss(w, h, b))
    member = pbt.optax_member(loss, lambda h: optax.sgd(h["lr"]), outer_loss=bad)
    tuner = pbt.PBT(
        member, {"lr": H.log(0.1, 1e-3, 0.9)}, interval=1, perturb=(0.9,), resample_probability=0
    )
    lr = jnp.asarray([0.8, 0.1, 0.05, 0.7, 0.2, 0.02, 0.6, 0.15])  # three bad members, n = 2
    state = tuner.init(jax.random.key(0), 8, jnp.zeros(3), hparams={"lr": lr})
    batch = jnp.zeros((8, 1, 1))
    state, metrics = tuner.step(state, batch, batch)
    assert np.isnan(np.asarray(metrics["score"])[[0, 3, 6]]).all()
    replaced = np.flatnonzero(np.asarray(metrics["parent"]) != np.arange(8))
    assert set(replaced.tolist()) >= {0, 3, 6}
    assert set(np.asarray(metrics["parent"])[[0, 3, 6]].tolist()) <= {4, 7}  # the top two
    assert int(state.nonfinite) == 3 and int(state.replaced) == len(replaced)
    assert np.all(np.asarray(tuner.hparams(state)["lr"]) <= 0.5)
    assert tuner.best(state) in (4, 7)
    state, metrics = tuner.step(state, batch, batch)
    assert np.isfinite(np.asarray(metrics["score"])).all()
    assert int(state.nonfinite) == 3


# ----------------------------------------------------------------------------- members and errors


def test_an_optax_member_trains_with_pbt_values_and_discrete_switches():
    train, val = _data()
    loss = lambda w, h, b: jnp.mean((b[0] @ w - b[1]) ** 2) + 1e-3 * h["power"] * jnp.sum(w**2)
    member = pbt.optax_member(loss, lambda h: optax.sgd(h["lr"]), outer_loss=outer, inner_steps=2)
    tuner = pbt.PBT(
        member, {"lr": H.log(0.05, 1e-3, 0.2), "power": H.integer(0, 4, init=2)}, interval=2
    )
    state = tuner.init(jax.random.key(0), 4, lambda k: 0.1 * jax.random.normal(k, (D,)))
    assert not np.allclose(state.members.params[0], state.members.params[1])  # own init
    state, history = tuner.fit(state, train, val, steps=6, batch_size=8, progress=False)
    assert history["member/outer_loss"].shape == (6, 4)
    assert history["hparams/power"].dtype == np.int32
    assert set(np.unique(history["hparams/power"]).tolist()) <= set(range(5))
    assert history["member/outer_loss"][-1].min() < history["member/outer_loss"][0].max()


def test_a_hyperparameter_belongs_to_exactly_one_tuner():
    opt = bilevel.BilevelOptimizer(
        inner,
        outer,
        inner_optimizer=optax.sgd(0.1),
        outer_optimizer=optax.adam(0.05),
        space={"wd": H.log(0.1)},
        method=solvers.Implicit(),
        inner_steps=2,
        fixed_hparams={"lr": 0.1},
    )
    with pytest.raises(ValueError, match=r"\['wd'\] are in the PBT space and in the Bilevel"):
        pbt.PBT(opt, {"wd": H.log(0.1, 1e-3, 1.0)}, interval=2)
    with pytest.raises(ValueError, match=r"does not hold them: add them to its fixed_hparams"):
        pbt.PBT(opt, {"dropout": H.unit(0.1)}, interval=2)
    with pytest.raises(ValueError, match=r"has shape \(2,\).*has shape \(\)"):
        pbt.PBT(opt, {"lr": H.log(jnp.full(2, 0.1))}, interval=2)


def test_gradient_tuners_refuse_discrete_hyperparameters():
    with pytest.raises(ValueError, match="cannot be tuned by hypergradient; manage it with"):
        bilevel.BilevelOptimizer(
            inner,
            outer,
            inner_optimizer=optax.sgd(0.1),
            outer_optimizer=optax.adam(0.05),
            space={"wd": H.log(0.1), "width": H.choice([16, 32])},
            method=solvers.Implicit(),
            inner_steps=2,
        )


def test_clear_errors_on_bad_arguments():
    member = pbt.optax_member(lambda w, h, b: jnp.sum(w**2), optax.sgd(0.1))
    space = {"lr": H.log(0.1, 1e-3, 1.0)}
    with pytest.raises(ValueError, match="interval must be an integer >= 1"):
        pbt.PBT(member, space, interval=0)
    with pytest.raises(ValueError, match=r"fraction must be >= 0\.0 and <= 0\.5"):
        pbt.PBT(member, space, interval=1, fraction=0.6)
    with pytest.raises(ValueError, match="perturb must hold at least one factor"):
        pbt.PBT(member, space, interval=1, perturb=())
    with pytest.raises(ValueError, match=r"perturb\[1\] must be > 0"):
        pbt.PBT(member, space, interval=1, perturb=(0.8, -1.0))
    with pytest.raises(TypeError, match="not a hyperparameter spec"):
        pbt.PBT(member, {"lr": 0.1}, interval=1)
    with pytest.raises(TypeError, match="space must be a non-empty dict"):
        pbt.PBT(member, {}, interval=1)
    with pytest.raises(TypeError, match=r"member must be a bilevel\.BilevelOptimizer"):
        pbt.PBT(optax.sgd(0.1), space, interval=1)
    tuner = pbt.PBT(member, space, interval=1, objective="val_acc")
    state = tuner.init(jax.random.key(0), 2, jnp.zeros(2))
    with pytest.raises(ValueError, match=r"objective='val_acc' is not a metric.*'outer_loss'"):
        tuner.step(state, jnp.zeros((2, 1, 1)), jnp.zeros((2, 1)))
    with pytest.raises(ValueError, match="leading population axis of length 2"):
        tuner.step(state, jnp.zeros((3, 1, 1)), jnp.zeros((2, 1)))
    with pytest.raises(ValueError, match="population_size must be an integer >= 2"):
        tuner.init(jax.random.key(0), 1, jnp.zeros(2))
    with pytest.raises(ValueError, match=r"hparams\['lr'\] must lie within"):
        tuner.init(jax.random.key(0), 2, jnp.zeros(2), hparams={"lr": jnp.asarray([0.1, 2.0])})
    with pytest.raises(ValueError, match=r"hparams\['lr'\] has shape \(3,\)"):
        tuner.init(jax.random.key(0), 2, jnp.zeros(2), hparams={"lr": jnp.ones(3) * 0.1})
    choice = pbt.PBT(member, {"k": H.choice([1, 2, 4])}, interval=1)
    with pytest.raises(ValueError, match="not one of the choices"):
        choice.init(jax.random.key(0), 2, jnp.zeros(2), hparams={"k": jnp.asarray([1, 3])})
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("pop",))
    with pytest.raises(ValueError, match="axis_name 'x' is not an axis"):
        pbt.PBT(member, space, interval=1, mesh=mesh, axis_name="x")


def test_stn_trainer_is_refused_with_a_reason():
    from flax import nnx

    from bilevel import stn

    trainer = stn.Trainer(
        stn.StnLinear(3, 1, 1, rngs=nnx.Rngs(0)),
        lambda m, h, b, key: jnp.mean(m(b[0], h.hnet) ** 2),
        lambda m, h, b: jnp.mean(m(b[0], h.hnet) ** 2),
        space={"wd": H.log(0.1)},
        inner_optimizer=optax.sgd(0.1),
        outer_optimizer=optax.sgd(0.1),
    )
    with pytest.raises(TypeError, match=r"stn\.Trainer cannot be a PBT member yet"):
        pbt.PBT(trainer, {"lr": H.log(0.1, 1e-3, 1.0)}, interval=1)


# ----------------------------------------------------------------------------- sharding

SHARDED = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, optax
    from bilevel import hparams as H, pbt

    assert len(jax.devices()) == 4, jax.devices()
    rs = np.random.RandomState(0)
    X = jnp.asarray(rs.randn(64, 4), jnp.float32)
    data = (X, X @ jnp.ones(4))
    loss = lambda w, h, b: 0.5 * jnp.mean((b[0] @ w - b[1]) ** 2)
    member = pbt.optax_member(loss, lambda h: optax.sgd(h["lr"], momentum=h["m"]), inner_steps=2)
    space = {"lr": H.log(0.01, 1e-3, 0.3), "m": H.choice([0.0, 0.5, 0.9])}
    runs = []
    for mesh in (None, jax.make_mesh((4,), ("population",))):
        tuner = pbt.PBT(member, space, interval=2, mesh=mesh)
        state = tuner.init(jax.random.key(1), 8, jnp.zeros(4))
        state, history = tuner.fit(state, data, data, steps=8, batch_size=8, progress=False)
        runs.append((state, history))
    (one, h1), (four, h4) = runs
    sharding = four.members.params.sharding
    assert len(sharding.device_set) == 4 and sharding.spec[0] == "population", sharding
    assert int(four.replaced) > 0
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(four), strict=True):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    for k in h1:
        np.testing.assert_allclose(h1[k], h4[k], rtol=1e-6, atol=1e-7, err_msg=k)
    try:
        pbt.PBT(member, space, interval=2, mesh=jax.make_mesh((4,), ("population",))).init(
            jax.random.key(0), 6, jnp.zeros(4)
        )
        raise AssertionError("a population of 6 over 4 devices was accepted")
    except ValueError as e:
        assert "population_size=6 is not a multiple of the 4 devices" in str(e), e
    print("OK")
    """
)


def test_a_population_sharded_over_4_devices_equals_one_device():
    env = dict(
        os.environ,
        XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(ROOT),
    )
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("OK")


# ----------------------------------------------------------------------------- docs


def test_the_docs_example_runs_and_prints_its_result():
    out = run_example("pbt.md", "pbt", max_lines=29, xla_defaults=False)
    assert out.startswith("val loss ") and "members replaced" in out and "nan" not in out, out
