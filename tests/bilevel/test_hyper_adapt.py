"""hyper_adapt: equivalence with HD optimizers, finite-difference derivatives, constraints."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel
from tests.bilevel.test_hd import (
    assert_trees_all_close,
    jax_logloss,
    logreg_data,
    parabola,
    rosenbrock,
    run_jax,
)


@pytest.mark.parametrize(
    ("inner", "hd"),
    [
        (
            lambda: optax.inject_hyperparams(optax.sgd)(learning_rate=0.5),
            lambda: bilevel.hd_sgd(0.5, 2.0),
        ),
        (
            lambda: optax.inject_hyperparams(optax.sgd)(learning_rate=0.05, momentum=0.9),
            lambda: bilevel.hd_sgd(0.05, 0.05, momentum=0.9),
        ),
        (
            lambda: optax.inject_hyperparams(optax.sgd)(
                learning_rate=0.05, momentum=0.9, nesterov=True
            ),
            lambda: bilevel.hd_sgd(0.05, 0.05, momentum=0.9, nesterov=True),
        ),
        (
            lambda: optax.inject_hyperparams(optax.adam)(learning_rate=0.01),
            lambda: bilevel.hd_adam(0.01, 1e-3),
        ),
    ],
    ids=["sgd", "momentum", "nesterov", "adam"],
)
def test_learning_rate_adaptation_is_hypergradient_descent(inner, hd):
    with jax.enable_x64(True):
        hd_tx = hd()
        beta = {0.5: 2.0, 0.05: 0.05, 0.01: 1e-3}
        inner_tx = inner()
        lr0 = float(inner_tx.init(jnp.zeros(())).hyperparams["learning_rate"])
        tx = bilevel.hyper_adapt(inner_tx, {"learning_rate": beta[lr0]})
        lr_hd, traj_hd, _ = run_jax(hd_tx)
        lr_ha, traj_ha, state = _run_adapt(tx)
    assert np.max(np.abs(lr_hd / lr0 - 1)) > 0.1  # the rate really moves
    np.testing.assert_allclose(lr_ha, lr_hd[:, 0], rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(traj_ha, traj_hd, rtol=1e-10, atol=1e-13)
    assert state.inner_state.hyperparams["learning_rate"].dtype == jnp.float64


def _run_adapt(tx, steps=200, hyper=False):
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    x, y = (jnp.asarray(a, dtype) for a in logreg_data(0))
    xv, yv = (jnp.asarray(a, dtype) for a in logreg_data(1))
    params = {"w": jnp.zeros(x.shape[1], dtype), "b": jnp.zeros((), dtype)}

    def step(carry, _):
        params, state = carry
        grads = jax.grad(jax_logloss)(params, x, y)
        extra = {"hyper_grads": jax.grad(jax_logloss)(params, xv, yv)} if hyper else {}
        updates, state = tx.update(grads, state, params, **extra)
        params = optax.apply_updates(params, updates)
        flat = jnp.concatenate([params["w"], params["b"][None]])
        return (params, state), (state.inner_state.hyperparams, flat)

    (_, state), (hps, traj) = jax.lax.scan(step, (params, tx.init(params)), length=steps)
    return np.asarray(hps["learning_rate"]), np.asarray(traj), state


def test_validation_gradient_mode_matches_hd_sgd():
    with jax.enable_x64(True):
        inner = optax.inject_hyperparams(optax.sgd)(learning_rate=0.5)
        lr_ha, traj_ha, _ = _run_adapt(
            bilevel.hyper_adapt(inner, {"learning_rate": 2.0}), hyper=True
        )
        lr_hd, traj_hd, _ = run_jax(bilevel.hd_sgd(0.5, 2.0), validation=True)
        lr_train, _, _ = run_jax(bilevel.hd_sgd(0.5, 2.0))
    assert np.max(np.abs(lr_hd - lr_train)) > 1e-3
    np.testing.assert_allclose(lr_ha, lr_hd[:, 0], rtol=1e-10)
    np.testing.assert_allclose(traj_ha, traj_hd, rtol=1e-10, atol=1e-13)


# ----------------------------------------------------------------------------- derivative


@pytest.mark.parametrize(
    ("factory", "kwargs", "names"),
    [
        (optax.adam, {"learning_rate": 0.05, "b1": 0.8, "b2": 0.95}, ("learning_rate", "b1", "b2")),
        (optax.adam, {"learning_rate": 0.05, "eps": 1e-2}, ("eps",)),
        (optax.adamw, {"learning_rate": 0.05, "weight_decay": 0.1}, ("weight_decay", "b1")),
        (optax.sgd, {"learning_rate": 0.1, "momentum": 0.7}, ("momentum", "learning_rate")),
        (optax.rmsprop, {"learning_rate": 0.1, "decay": 0.8}, ("decay",)),
    ],
    ids=["adam3", "adam_eps", "adamw", "sgd_momentum", "rmsprop"],
)
def test_stored_derivative_and_hypergradient_step_match_finite_differences(factory, kwargs, names):
    """tangents = d u_t / d h with the state of step t-1 fixed; h_t = h_{t-1} - beta <g_t, .>."""
    betas = dict.fromkeys(names, 1e-3)
    with jax.enable_x64(True):
        inner = optax.inject_hyperparams(factory)(**kwargs)
        tx = bilevel.hyper_adapt(inner, betas)
        rng = np.random.RandomState(0)
        params = {"a": jnp.asarray(rng.randn(3, 2)), "b": jnp.asarray(rng.randn(4))}
        grads = [jax.tree.map(lambda p, k=k: jnp.sin(p * (k + 1)), params) for k in range(4)]
        state = tx.init(params)
        for g in grads[:3]:
            prev = state
            _, state = tx.update(g, state, params)
        # finite differences of the inner update at the state of the previous step
        prev_inner = prev.inner_state._replace(
            hyperparams=state.inner_state.hyperparams
        )  # h_t in effect for the step that produced the tangents
        for name in names:
            h = state.inner_state.hyperparams[name]
            step = 1e-6 * max(1.0, abs(float(h)))

            def u(value, name=name, dtype=h.dtype):
                hp = {**prev_inner.hyperparams, name: jnp.asarray(value, dtype)}
                return inner.update(grads[2], prev_inner._replace(hyperparams=hp), params)[0]

            fd = jax.tree.map(lambda a, b, s=step: (a - b) / (2 * s), u(h + step), u(h - step))
            tangent = state.tangents[names.index(name)]
            assert_trees_all_close(tangent, fd, rtol=1e-6, atol=1e-9)
            assert optax.tree.norm(fd) > 1e-6  # a derivative that can fail
        _, new_state = tx.update(grads[3], state, params)
        for i, name in enumerate(names):
            hg = float(optax.tree.vdot(grads[3], state.tangents[i]))
            expected = float(state.inner_state.hyperparams[name]) - betas[name] * hg
            np.testing.assert_allclose(
                float(new_state.inner_state.hyperparams[name]), expected, rtol=1e-12
            )


def test_three_hyperparameters_with_zero_rates_equal_one():
    with jax.enable_x64(True):
        make = lambda: optax.inject_hyperparams(optax.adam)(learning_rate=0.01)
        _, traj1, _s1 = _run_adapt(bilevel.hyper_adapt(make(), {"learning_rate": 1e-3}))
        _, traj3, s3 = _run_adapt(
            bilevel.hyper_adapt(make(), {"learning_rate": 1e-3, "b1": 0.0, "b2": 0.0})
        )
        assert float(optax.tree.norm(s3.tangents[1])) > 0
    np.testing.assert_allclose(traj3, traj1, rtol=1e-12)
    assert float(s3.inner_state.hyperparams["b1"]) == 0.9


# ----------------------------------------------------------------------------- constraints


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_probabilities_stay_strictly_inside_unit_interval(dtype):
    inner = optax.inject_hyperparams(optax.adam)(learning_rate=0.1, b1=0.5, b2=0.6)
    tx = bilevel.hyper_adapt(inner, {"b1": 1e6, "b2": 1e6})
    params = jnp.ones(4, dtype)
    state = tx.init(params)
    seen = {"b1": set(), "b2": set()}
    update = jax.jit(tx.update)
    for k in range(20):
        grads = (-1.0) ** k * jnp.linspace(-1, 2, 4).astype(dtype) * (k + 1)
        _, state = update(grads, state, params)
        for name in seen:
            value = float(state.inner_state.hyperparams[name])
            assert 0.0 < value < 1.0
            seen[name].add(value)
    assert all(len(v) > 1 for v in seen.values())  # they did move, to both clips
    assert int(state.skipped) == 0


def test_bounds_clip_other_hyperparameters():
    inner = optax.inject_hyperparams(optax.adamw)(learning_rate=0.1, weight_decay=0.1)
    # (learning_rate is not adapted: with a step of 10 it would sit at its positive floor.)
    tx = bilevel.hyper_adapt(inner, {"weight_decay": 100.0}, {"weight_decay": (0.0, 0.2)})
    params = jnp.ones(3)
    state = tx.init(params)
    values = []
    for k in range(10):
        _, state = tx.update(jnp.full(3, (-1.0) ** k), state, params)
        values.append(float(state.inner_state.hyperparams["weight_decay"]))
    hi = float(np.float32(0.2))
    assert min(values) >= 0.0 and max(values) <= hi
    assert 0.0 in values and hi in values


def test_non_finite_gradient_is_skipped():
    inner = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.5)
    tx = bilevel.hyper_adapt(inner, {"learning_rate": 0.1, "momentum": 0.01})
    params = jnp.array([1.0, 2.0])
    state = tx.init(params)
    for _ in range(2):
        _, state = tx.update(params, state, params)
    before = state.inner_state.hyperparams
    _, bad = tx.update(params.at[0].set(jnp.inf), state, params)
    assert int(bad.skipped) == 1
    for name in ("learning_rate", "momentum"):
        assert float(bad.inner_state.hyperparams[name]) == float(before[name])
    for new, old in zip(bad.tangents, state.tangents, strict=True):
        np.testing.assert_array_equal(new, old)


def test_reads_and_no_recompilation_inside_chain():
    inner = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)
    opt = optax.chain(
        optax.clip_by_global_norm(10.0), bilevel.hyper_adapt(inner, {"learning_rate": 1e-5})
    )
    initial, final, objective = parabola(jnp.float32)
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(1)
        updates, state = opt.update(jax.grad(objective)(params), state, params, extra=1)
        return optax.apply_updates(params, updates), state

    params, state = initial, opt.init(initial)
    for _ in range(3000):
        params, state = step(params, state)
    assert len(traces) == 1
    assert_trees_all_close(params, final, rtol=3e-2, atol=3e-2)
    lr = optax.tree_utils.tree_get(state, "learning_rate")
    assert float(lr) != 1e-2


@pytest.mark.parametrize("target", [parabola, rosenbrock])
@pytest.mark.parametrize(
    ("inner", "hyper_lr"),
    [
        (lambda: optax.inject_hyperparams(optax.sgd)(learning_rate=1e-3), {"learning_rate": 1e-6}),
        (
            lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1e-2),
            {"learning_rate": 1e-5, "b1": 1e-6, "b2": 1e-7},
        ),
    ],
    ids=["sgd", "adam3"],
)
def test_converges(inner, hyper_lr, target):
    opt = bilevel.hyper_adapt(inner(), hyper_lr)
    initial, final, objective = target(jnp.float32)

    def step(carry, _):
        params, state = carry
        updates, state = opt.update(jax.grad(objective)(params), state, params)
        return (optax.apply_updates(params, updates), state), None

    (params, state), _ = jax.jit(lambda c: jax.lax.scan(step, c, length=10_000))(
        (initial, opt.init(initial))
    )
    assert_trees_all_close(params, final, rtol=3e-2, atol=3e-2)
    assert int(state.skipped) == 0


@pytest.mark.parametrize(
    ("build", "error"),
    [
        (lambda: bilevel.hyper_adapt(optax.adam(1e-3), {"learning_rate": 1e-3}), TypeError),
        (lambda: bilevel.hyper_adapt(lambda g: g, {"learning_rate": 1e-3}), TypeError),
        (
            lambda: bilevel.hyper_adapt(
                optax.inject_hyperparams(optax.adam)(1e-3), {"momentum": 1e-3}
            ),
            ValueError,
        ),
        (
            lambda: bilevel.hyper_adapt(
                optax.inject_hyperparams(optax.adam)(optax.linear_schedule(1e-3, 0.0, 10)),
                {"learning_rate": 1e-3},
            ),
            ValueError,
        ),
        (
            lambda: bilevel.hyper_adapt(
                optax.inject_hyperparams(optax.adam)(1e-3, b1=1.0), {"b1": 1e-3}
            ),
            ValueError,
        ),
        (
            lambda: bilevel.hyper_adapt(
                optax.inject_hyperparams(optax.adam)(1e-3), {"learning_rate": -1.0}
            ),
            ValueError,
        ),
        (
            lambda: bilevel.hyper_adapt(
                optax.inject_hyperparams(optax.adam)(1e-3),
                {"learning_rate": 1.0},
                {"learning_rate": (1.0, 0.0)},
            ),
            ValueError,
        ),
        (
            lambda: bilevel.hyper_adapt(
                optax.inject_hyperparams(optax.adam)(1e-3), {"learning_rate": 1.0}, {"b1": (0, 1)}
            ),
            ValueError,
        ),
        (lambda: bilevel.hyper_adapt(optax.inject_hyperparams(optax.adam)(1e-3), {}), TypeError),
    ],
    ids=[
        "not_injected",
        "not_a_transform",
        "unknown_name",
        "schedule",
        "probability_out_of_range",
        "negative_hyper_lr",
        "bounds_lo_ge_hi",
        "bounds_unknown_name",
        "empty",
    ],
)
def test_bad_static_input_raises(build, error):
    with pytest.raises(error):
        build()


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e25])
@pytest.mark.parametrize("where", ["grads", "hyper_grads"])
def test_nonfinite_step_keeps_whole_state_and_gives_zero_update(where, bad):
    """A NaN gradient (or a float32 1e25 overflowing Adam's nu) must not poison the moments."""
    inner = optax.inject_hyperparams(optax.adam)(learning_rate=0.05, b1=0.8)
    tx = bilevel.hyper_adapt(inner, {"learning_rate": 1e-3, "b1": 1e-3})
    update = jax.jit(tx.update)
    params = jnp.array([1.0, -2.0, 0.5])

    def run(bad_at):
        p, state = params, tx.init(params)
        for k in range(6):
            g = 2 * (p - 1.0)
            h = g
            if k == bad_at:
                before = state
                if where == "grads" or bad == 1e25:
                    g = g.at[1].set(bad)
                else:
                    h = h.at[1].set(bad)
                u, state = update(g, state, p, hyper_grads=h)
                np.testing.assert_array_equal(u, 0)
                strip = lambda st: st._replace(count=0, skipped=0)
                assert_trees_all_close(strip(state), strip(before), rtol=0)
                continue
            u, state = update(g, state, p, hyper_grads=h)
            p = optax.apply_updates(p, u)
        return p, state

    _, s_ref = run(None)
    p_bad, s_bad = run(2)
    assert int(s_bad.skipped) == 1 and int(s_ref.skipped) == 0
    assert all(np.isfinite(x).all() for x in jax.tree.leaves((p_bad, s_bad)))
    mu = s_bad.inner_state.inner_state[0].mu
    assert np.all(np.isfinite(mu))


def test_learning_rate_stays_positive():
    # validation mode on this problem drives the raw additive rule below zero (see test_hd).
    with jax.enable_x64(True):
        inner = optax.inject_hyperparams(optax.sgd)(learning_rate=0.5)
        lr, _, state = _run_adapt(bilevel.hyper_adapt(inner, {"learning_rate": 2.0}), hyper=True)
    assert lr.min() > 0 and lr.min() == np.finfo(np.float64).tiny
    assert int(state.skipped) == 0


def test_numpy_and_jax_scalars_are_valid():
    # (optax.inject_hyperparams itself injects np.float64 but not np.float32 scalars)
    inner = optax.inject_hyperparams(optax.adam)(
        learning_rate=np.float64(1e-2), b1=jnp.asarray(0.8)
    )
    tx = bilevel.hyper_adapt(
        inner,
        {"learning_rate": np.float32(1e-3), "b1": jnp.asarray(1e-4)},
        {"learning_rate": (np.float64(1e-4), jnp.asarray(1.0))},
    )
    params = jnp.ones(3)
    state = tx.init(params)
    _, state = tx.update(params, state, params)
    assert int(state.skipped) == 0
