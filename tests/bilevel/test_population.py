"""``bilevel.Population``: vmapped tuners with restarts; one member equals ``fit``'s run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel
import solvers
from bilevel import Population, RoundResult
from bilevel import hparams as H
from bilevel._fit import fit


def _problem():
    rng = np.random.RandomState(0)
    X = jnp.asarray(rng.randn(90, 4), jnp.float32)
    y = X @ jnp.asarray([1.0, -2.0, 0.5, 0.0]) + 0.5 * jnp.asarray(rng.randn(90), jnp.float32)
    train, val = (X[:50], y[:50]), (X[50:], y[50:])

    def inner(w, h, b):
        return jnp.mean((b[0] @ w - b[1]) ** 2) + jnp.sum(h["wd"] * w**2)

    def outer(w, h, b):
        return jnp.mean((b[0] @ w - b[1]) ** 2)

    opt = bilevel.BilevelOptimizer(
        inner, outer, inner_optimizer=optax.sgd(0.05),
        space={"wd": H.log(jnp.full(4, 0.3))}, method=solvers.Implicit(), inner_steps=4,
    )  # fmt: skip
    init_params = lambda key: 0.1 * jax.random.normal(key, (4,))
    score = lambda w: outer(w, None, val)
    return opt, init_params, score, train, val


def test_one_member_equals_fit_with_the_same_budget():
    opt, init_params, score, train, val = _problem()
    pop = Population(opt, 1, init_params=init_params, score=score)
    state = pop.init(jax.random.key(3))
    member = jax.tree.map(lambda a: a[0], state.members)
    state, result = pop.run(state, train, val, train_steps=18, batch_size=8)
    ref, history = fit(opt, member, train, val, train_steps=18, batch_size=8, progress=False)
    got = jax.tree.map(lambda a: a[0], state.members)
    np.testing.assert_allclose(got.params, ref.params, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got.hparams["wd"], ref.hparams["wd"], rtol=1e-5)
    np.testing.assert_allclose(result.schedule["wd"][0], history["hparams/wd"], rtol=1e-5)
    np.testing.assert_allclose(result.outer_loss[0], history["outer_loss"], rtol=1e-5)
    np.testing.assert_allclose(result.scores[0], score(ref.params), rtol=1e-5)
    assert isinstance(result, RoundResult) and result.records is None


def test_first_round_spreads_members_around_the_initial_values():
    opt, init_params, score, *_ = _problem()
    pop = Population(opt, 5, init_params=init_params, score=score, spread=0.5)
    state = pop.init(jax.random.key(0))
    u = np.asarray(state.members.hparams["wd"])
    np.testing.assert_allclose(u[0], np.log(0.3), rtol=1e-6)  # member 0 at the initial values
    assert np.all(np.abs(u[1:] - np.log(0.3)) > 0) and 0.1 < np.std(u[1:] - np.log(0.3)) < 1.5
    params = np.asarray(state.members.params)
    assert len({tuple(p) for p in params.round(6)}) == 5  # each member its own weights
    same = pop.init(jax.random.key(0), hparams={"wd": jnp.full(4, -1.0)}, spread=0.0)
    np.testing.assert_allclose(same.members.hparams["wd"], -1.0)


def test_restart_carries_the_best_hyperparameters_and_jitters_the_rest():
    opt, init_params, score, train, val = _problem()
    pop = Population(opt, 4, init_params=init_params, score=score, keep=0.5, jitter=0.2)
    state, _ = pop.run(pop.init(jax.random.key(1)), train, val, train_steps=8,
                       batch_size=8)  # fmt: skip
    final = np.asarray(state.members.hparams["wd"])
    scores = np.array([3.0, 1.0, np.nan, 2.0])  # best: members 1 and 3; a NaN ranks last
    nxt = pop.restart(state, scores)
    u = np.asarray(nxt.members.hparams["wd"])
    np.testing.assert_allclose(u[1], final[1], rtol=1e-6)
    np.testing.assert_allclose(u[3], final[3], rtol=1e-6)
    for j in (0, 2):  # copies of a kept member, jittered
        gaps = [np.abs(u[j] - final[k]).max() for k in (1, 3)]
        assert 0 < min(gaps) < 1.5
    np.testing.assert_allclose(nxt.start["wd"], u)
    assert int(nxt.round) == 1 and int(nxt.members.step[0]) == 0  # fresh runs
    assert not np.allclose(np.asarray(nxt.members.params), np.asarray(state.members.params))


def test_size_one_carries_its_hyperparameters_into_a_fresh_run():
    opt, init_params, score, train, val = _problem()
    pop = Population(opt, 1, init_params=init_params, score=score)
    state, result = pop.run(pop.init(jax.random.key(2)), train, val, train_steps=8,
                            batch_size=8)  # fmt: skip
    nxt = pop.restart(state, result.scores)
    np.testing.assert_allclose(nxt.members.hparams["wd"], state.members.hparams["wd"])
    np.testing.assert_allclose(result.final["wd"], np.exp(state.members.hparams["wd"]), rtol=1e-5)


def test_records_and_validation():
    opt, init_params, score, train, val = _problem()
    pop = Population(opt, 2, init_params=init_params, score=score,
                     record=lambda s: jnp.sum(s.params))  # fmt: skip
    _, result = pop.run(pop.init(jax.random.key(0)), train, val, train_steps=9, batch_size=8)
    assert result.records.shape == (2, 2) and result.schedule["wd"].shape == (2, 2, 4)
    with pytest.raises(ValueError, match="less than one outer step"):
        pop.run(pop.init(jax.random.key(0)), train, val, train_steps=3, batch_size=8)
    with pytest.raises(ValueError, match=r"scores must have shape \(2,\)"):
        pop.restart(pop.init(jax.random.key(0)), [1.0])
    with pytest.raises(TypeError, match="BilevelOptimizer"):
        Population(object(), 2, init_params=init_params, score=score)
    with pytest.raises(ValueError, match="size"):
        Population(opt, 0, init_params=init_params, score=score)
    with pytest.raises(ValueError, match="keep"):
        Population(opt, 2, init_params=init_params, score=score, keep=0.0)


def _hd_problem():
    """The ridge problem with ``hd_adam``, whose initial rate is a fixed hyperparameter."""
    _, init_params, score, train, val = _problem()
    inner = lambda w, h, b: jnp.mean((b[0] @ w - b[1]) ** 2) + jnp.sum(h["wd"] * w**2)
    outer = lambda w, h, b: jnp.mean((b[0] @ w - b[1]) ** 2)
    opt = bilevel.BilevelOptimizer(
        inner, outer, inner_optimizer=lambda h: bilevel.hd_adam(h["lr"]),
        space={"wd": H.log(jnp.full(4, 0.3))}, method=solvers.Implicit(), inner_steps=4,
        fixed_hparams={"lr": 0.01}, inner_hyper_grads=True,
    )  # fmt: skip
    return opt, init_params, score, train, val


def _rate(inner_state):
    return np.asarray(optax.tree_utils.tree_get(inner_state, "learning_rate"))


def test_init_builds_the_inner_optimizer_from_per_state_fixed_values():
    opt, init_params, *_ = _hd_problem()
    p = init_params(jax.random.key(0))
    assert _rate(opt.init(p).inner_state) == pytest.approx(0.01)
    state = opt.init(p, fixed_hparams={"lr": np.float32(0.003)})  # a NumPy scalar is a number
    assert _rate(state.inner_state) == pytest.approx(0.003)
    assert float(state.fixed_hparams["lr"]) == pytest.approx(0.003)
    rates = jnp.asarray([0.001, 0.02])
    states = jax.vmap(lambda r: opt.init(p, fixed_hparams={"lr": r}))(rates)
    np.testing.assert_allclose(_rate(states.inner_state), rates, rtol=1e-6)
    with pytest.raises(ValueError, match=r"\['momentum'\] are not among the constructor"):
        opt.init(p, fixed_hparams={"momentum": 0.9})
    with pytest.raises(ValueError, match=r"fixed_hparams\['lr'\] must have the shape \(\)"):
        opt.init(p, fixed_hparams={"lr": jnp.ones(2)})
    with pytest.raises(TypeError, match="fixed_hparams must be a dict"):
        opt.init(p, fixed_hparams=[0.1])
    with pytest.raises(ValueError, match=r"fixed_hparams\['lr'\] must be finite"):
        opt.init(p, fixed_hparams={"lr": np.nan})


def test_explored_fixed_hyperparameters_start_each_member_and_are_carried_by_restarts():
    opt, init_params, score, train, val = _hd_problem()
    spec = H.log(0.01, 1e-4, 1.0)
    pop = Population(opt, 4, init_params=init_params, score=score, spread=0.5, jitter=0.2,
                     explore={"lr": spec})  # fmt: skip
    state = pop.init(jax.random.key(0))
    e = np.asarray(state.explore["lr"])
    values = jax.vmap(lambda x: H.constrain({"lr": spec}, {"lr": x})["lr"])
    rates = np.asarray(values(jnp.asarray(e)))
    assert rates[0] == pytest.approx(0.01, rel=1e-5) and len(set(rates.round(8))) == 4
    # Each member's optimizer starts at its own rate, and its tuner sees it as a hyperparameter.
    np.testing.assert_allclose(_rate(state.members.inner_state), rates, rtol=1e-5)
    np.testing.assert_allclose(state.members.fixed_hparams["lr"], rates, rtol=1e-5)

    state, result = pop.run(state, train, val, train_steps=8, batch_size=8)
    np.testing.assert_allclose(result.start["lr"], rates, rtol=1e-5)  # reported with the rest
    scores = np.array([3.0, 1.0, np.nan, 2.0])  # kept: members 1 and 3
    nxt = pop.restart(state, scores)
    e_next = np.asarray(nxt.explore["lr"])
    np.testing.assert_allclose(e_next[[1, 3]], e[[1, 3]], rtol=1e-6)
    for j in (0, 2):  # copies of a kept member's value, jittered
        assert 0 < min(abs(e_next[j] - e[k]) for k in (1, 3)) < 1.5
    np.testing.assert_allclose(_rate(nxt.members.inner_state), values(e_next), rtol=1e-5)

    # One member replayed from its start: the same rate, hyperparameters and run as fit's.
    one = Population(opt, 1, init_params=init_params, score=score, explore={"lr": spec})
    start = one.init(jax.random.key(5), explore={"lr": jnp.asarray(e[2])})
    assert _rate(start.members.inner_state)[0] == pytest.approx(rates[2], rel=1e-5)
    member = jax.tree.map(lambda a: a[0], start.members)
    got, _ = one.run(start, train, val, train_steps=8, batch_size=8)
    ref, _ = fit(opt, member, train, val, train_steps=8, batch_size=8, progress=False)
    np.testing.assert_allclose(got.members.params[0], ref.params, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(_rate(got.members.inner_state)[0], _rate(ref.inner_state), rtol=1e-5)


def test_explore_validation():
    opt, init_params, score, *_ = _hd_problem()
    kw = {"init_params": init_params, "score": score}
    with pytest.raises(ValueError, match=r"explore names \['momentum'\]"):
        Population(opt, 2, explore={"momentum": H.unit(0.9)}, **kw)
    with pytest.raises(TypeError, match=r"explore\['lr'\] must be a continuous"):
        Population(opt, 2, explore={"lr": 0.01}, **kw)
    with pytest.raises(ValueError, match=r"explore\['lr'\] has shape \(2,\)"):
        Population(opt, 2, explore={"lr": H.log(jnp.full(2, 0.01))}, **kw)
    with pytest.raises(TypeError, match="explore must be a dict"):
        Population(opt, 2, explore=[H.log(0.01)], **kw)
    with pytest.raises(ValueError, match="explore= values need"):
        Population(opt, 2, **kw).init(jax.random.key(0), explore={"lr": jnp.zeros(())})
