"""``fit``'s training budget with a remainder, and early stopping on a held-out split."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel
import solvers
from bilevel._fit import EarlyStopping, fit


def _problem(inner_steps=4):
    rng = np.random.RandomState(0)
    X = jnp.asarray(rng.randn(90, 4), jnp.float32)
    y = X @ jnp.asarray([1.0, -2.0, 0.5, 0.0]) + 0.3 * jnp.asarray(rng.randn(90), jnp.float32)

    def inner(w, h, b):
        return jnp.mean((b[0] @ w - b[1]) ** 2) + h["wd"] * jnp.sum(w**2)

    def outer(w, h, b):
        return jnp.mean((b[0] @ w - b[1]) ** 2)

    opt = bilevel.BilevelOptimizer(
        inner, outer, inner_optimizer=optax.sgd(0.05), outer_optimizer=optax.adam(0.1),
        space={"wd": bilevel.hparams.log(0.3)}, method=solvers.Implicit(),
        inner_steps=inner_steps,
    )  # fmt: skip
    return opt, (X[:50], y[:50]), (X[50:70], y[50:70]), (X[70:], y[70:])


def test_train_steps_runs_whole_cycles_then_the_remainder_as_training_steps():
    """23 steps with inner_steps=4 and one warm-up cycle: 4 warm-up steps, 4 tuning steps (16
    training steps), then 3: equal to the same calls made by hand."""
    opt, train, val, _ = _problem()
    state0 = opt.init(jnp.zeros(4))
    state, history = fit(opt, state0, train, val, train_steps=23, batch_size=8,
                         warmup_steps=1, chunk=3, progress=False)  # fmt: skip
    assert len(history["step"]) == 4

    s = state0
    s = opt.warmup(s, opt.sample_batches(s, train, val, 8)[0])[0]
    for _ in range(4):
        s = opt.step(s, *opt.sample_batches(s, train, val, 8))[0]
    inner, _ = opt.sample_batches(s, train, val, 8)
    s = opt.warmup(s, jax.tree.map(lambda a: a[:3], inner), steps=3)[0]
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(s.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert int(state.step) == int(s.step) == 6
    np.testing.assert_allclose(state.hparams["wd"], s.hparams["wd"], rtol=1e-6)


def test_a_budget_that_inner_steps_divides_has_no_tail():
    opt, train, val, _ = _problem()
    state, history = fit(opt, opt.init(jnp.zeros(4)), train, val, train_steps=20, batch_size=8,
                         progress=False)  # fmt: skip
    assert len(history["step"]) == 5 and int(state.step) == 5


def test_warmup_steps_checks_the_batches_against_its_steps():
    opt, train, val, _ = _problem()
    state = opt.init(jnp.zeros(4))
    inner, _ = opt.sample_batches(state, train, val, 8)
    with pytest.raises(ValueError, match="leading axis of length steps=3"):
        opt.warmup(state, inner, steps=3)
    shared = jax.tree.map(lambda a: a[:1], inner)  # one batch reused by the 3 steps
    assert int(opt.warmup(state, shared, steps=3)[1]["inner_applied"]) == 3


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({}, TypeError, "exactly one of steps"),
        ({"steps": 3, "train_steps": 12}, TypeError, "exactly one of steps"),
        ({"train_steps": 3, "warmup_steps": 1}, ValueError, "less than the 1 warm-up"),
        ({"train_steps": -1}, ValueError, "train_steps"),
    ],
)
def test_bad_budgets_raise(kwargs, error, match):
    opt, train, val, _ = _problem()
    with pytest.raises(error, match=match):
        fit(opt, opt.init(jnp.zeros(4)), train, val, batch_size=8, progress=False, **kwargs)


def test_a_remainder_needs_a_tuner_whose_warmup_takes_steps():
    opt, train, val, _ = _problem()

    class NoSteps:
        inner_steps = 4
        sample_batches = staticmethod(opt.sample_batches)
        step = staticmethod(opt.step)

        def warmup(self, state, inner_batches):
            return opt.warmup(state, inner_batches)

    with pytest.raises(TypeError, match="takes no steps="):
        fit(NoSteps(), opt.init(jnp.zeros(4)), train, val, train_steps=10, batch_size=8,
            progress=False)  # fmt: skip


def test_early_stopping_keeps_the_best_held_out_state_and_stops():
    """Scores that fall then rise: the run stops `patience` chunks after the minimum and fit
    returns the state of the minimum."""
    opt, train, val, _ = _problem()
    scores = iter([5.0, 3.0, 2.0, 2.5, 2.6, 2.7, 1.0, 0.5])
    stop = EarlyStopping(lambda s: 0.0, patience=3)
    stop.score = lambda state, metrics: next(scores)  # a scripted held-out curve
    kept = {}
    state, history = fit(
        opt, opt.init(jnp.zeros(4)), train, val, steps=40, batch_size=8, chunk=2,
        callbacks=[stop, lambda step, s, m: kept.setdefault(step, s)], progress=False,
    )  # fmt: skip
    assert stop.values == [5.0, 3.0, 2.0, 2.5, 2.6, 2.7]
    assert stop.steps == [2, 4, 6, 8, 10, 12] and stop.stopped_step == 12
    assert len(history["step"]) == 12
    assert stop.best_step == 6 and stop.best_value == 2.0
    assert int(state.step) == 6 and state is kept[6]


def test_early_stopping_on_a_held_out_loss_and_on_a_metric():
    opt, train, val, test = _problem()
    held_out = lambda s: jnp.mean((test[0] @ s.params - test[1]) ** 2)
    stop = EarlyStopping(held_out, patience=2, restore_best=False)
    state, history = fit(opt, opt.init(jnp.zeros(4)), train, val, steps=30, batch_size=8,
                         chunk=5, callbacks=stop, progress=False)  # fmt: skip
    assert int(state.step) == history["step"][-1]  # restore_best=False: the last state
    want = [float(held_out(stop.best_state))]
    np.testing.assert_allclose(stop.best_value, want[0], rtol=1e-6)
    assert stop.best_value == min(stop.values)
    by_metric = EarlyStopping("outer_loss", patience=100)
    fit(opt, opt.init(jnp.zeros(4)), train, val, steps=6, batch_size=8, chunk=3,
        callbacks=by_metric, progress=False)  # fmt: skip
    assert len(by_metric.values) == 2 and by_metric.stopped_step is None
    with pytest.raises(KeyError, match="no metric 'nope'"):
        fit(opt, opt.init(jnp.zeros(4)), train, val, steps=3, batch_size=8,
            callbacks=EarlyStopping("nope"), progress=False)  # fmt: skip


def test_early_stopping_never_keeps_a_nonfinite_score():
    stop = EarlyStopping(lambda s: 0.0, patience=2)
    values = iter([float("nan"), float("inf"), 1.0, float("nan"), float("nan")])
    stop.score = lambda state, metrics: next(values)
    assert [stop(i, f"s{i}", {}) for i in range(5)] == [False, True, False, False, True]
    assert stop.best_state == "s2" and stop.best_value == 1.0


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"evaluate": 3}, TypeError, "evaluate must be"),
        ({"evaluate": "outer_loss", "patience": 0}, ValueError, "patience"),
        ({"evaluate": "outer_loss", "min_delta": -1.0}, ValueError, "min_delta"),
        ({"evaluate": "outer_loss", "restore_best": "yes"}, TypeError, "restore_best"),
    ],
)
def test_early_stopping_rejects_bad_settings(kwargs, error, match):
    with pytest.raises(error, match=match):
        EarlyStopping(**kwargs)
