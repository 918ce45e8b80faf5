"""``bilevel.BOREP``: the update rules, the lower-level schedule, unbounded smoothness."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel
import solvers


def _exp_problem(method, outer_optimizer, x0=3.0):
    """Upper level f(w) = exp(3w) - 3w through w*(x) = x: (L0, L1)-smooth, minimum at x = 0."""
    inner = lambda w, h, b: 0.5 * jnp.sum((w - h["x"]) ** 2)
    outer = lambda w, h, b: jnp.sum(jnp.exp(3.0 * w) - 3.0 * w)
    opt = bilevel.BilevelOptimizer(
        inner, outer, inner_optimizer=optax.sgd(0.5), outer_optimizer=outer_optimizer,
        space={"x": bilevel.hparams.real(jnp.array([x0]))}, method=method, inner_steps=5,
    )  # fmt: skip
    return opt, opt.init(jnp.zeros(1))


def _trajectory(opt, state, steps):
    step = jax.jit(opt.step)
    xs = []
    for _ in range(steps):
        state, _ = step(state, jnp.zeros((5, 1)), jnp.zeros(1))
        xs.append(float(opt.hparams(state)["x"][0]))
    return np.asarray(xs), state


def test_converges_under_unbounded_smoothness_where_soba_stalls():
    """SOBA's first outer step is scaled by a gradient of ~2e4 and throws x to about -900, from
    where a gradient of about -3 walks it back 0.3 per step; BO-REP's normalized steps have a
    fixed length, so it reaches the minimum within the same budget."""
    borep, s0 = _exp_problem(
        bilevel.BOREP(adjoint_lr=0.5, period=2), bilevel.normalized_momentum(0.05)
    )
    xs_borep, s1 = _trajectory(borep, s0, 200)
    soba, t0 = _exp_problem(
        solvers.Implicit(linear_solver=solvers.neumann(steps=1, scale=0.5)), optax.sgd(0.1)
    )
    xs_soba, t1 = _trajectory(soba, t0, 200)
    assert np.min(np.abs(xs_borep[-50:])) < 0.1 and abs(xs_borep[-1]) < 0.5, xs_borep[-10:]
    assert abs(xs_soba[-1]) > 100.0, xs_soba[-10:]
    assert int(s1.skipped) == int(t1.skipped) == 0


def test_the_lower_level_runs_every_period_steps():
    opt, state = _exp_problem(bilevel.BOREP(period=3), bilevel.normalized_momentum(0.01))
    step = jax.jit(opt.step)
    applied, params = [], []
    for _ in range(7):
        state, metrics = step(state, jnp.zeros((5, 1)), jnp.zeros(1))
        applied.append(int(metrics["inner_applied"]))
        params.append(float(state.params[0]))
    assert applied == [5, 0, 0, 5, 0, 0, 5]
    assert params[1] == params[0] and params[2] == params[0] and params[3] != params[2]
    assert int(state.method_state.count) == 7


def test_adjoint_and_hypergradient_follow_the_formulas():
    """Quadratic inner loss with Hessian A and mixed term -B: after one step from z,
    z' = z - nu (A z - grad_w f) and g = grad_h f + B^T z'."""
    rng = np.random.RandomState(0)
    M = rng.randn(4, 4)
    A = jnp.asarray(M @ M.T / 4 + np.eye(4), jnp.float32)
    B = jnp.asarray(rng.randn(4, 2), jnp.float32)
    c = jnp.asarray(rng.randn(4), jnp.float32)
    inner = lambda w, h, b: 0.5 * w @ A @ w - w @ (B @ h["x"])
    outer = lambda w, h, b: 0.5 * jnp.sum((w - c) ** 2) + 0.1 * jnp.sum(h["x"] ** 2)
    nu = 0.2
    opt = bilevel.BilevelOptimizer(
        inner, outer, inner_optimizer=optax.sgd(0.1), outer_optimizer=optax.sgd(0.0),
        space={"x": bilevel.hparams.real(jnp.array([0.5, -1.0]))},
        method=bilevel.BOREP(adjoint_lr=nu, period=1), inner_steps=3,
    )  # fmt: skip
    state = opt.init(jnp.zeros(4))
    state, _ = opt.step(state, jnp.zeros((3, 1)), jnp.zeros(1))
    z = state.method_state.adjoint
    state2, metrics = opt.step(state, jnp.zeros((3, 1)), jnp.zeros(1))
    w, x = state2.params, jnp.array([0.5, -1.0])
    z_want = z - nu * (A @ z - (w - c))
    np.testing.assert_allclose(state2.method_state.adjoint, z_want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["hypergrad"]["x"], 0.2 * x + B.T @ z_want, rtol=1e-5)


def test_warmup_is_the_initialization_refinement():
    data = (jnp.zeros((8, 1)),)
    inner = lambda w, h, b: 0.5 * jnp.sum((w - h["x"]) ** 2)
    opt = bilevel.BilevelOptimizer(
        inner, lambda w, h, b: jnp.sum(w**2), inner_optimizer=optax.sgd(0.5),
        outer_optimizer=bilevel.normalized_momentum(0.01),
        space={"x": bilevel.hparams.real(jnp.array([3.0]))}, method=bilevel.BOREP(), inner_steps=5,
    )  # fmt: skip
    state = opt.init(jnp.zeros(1))
    warm, metrics = opt.warmup(state, jnp.zeros((5, 1)))
    assert float(warm.params[0]) > 2.9 and int(metrics["inner_applied"]) == 5
    assert float(warm.hparams["x"][0]) == 3.0 and int(warm.step) == 1
    out, history = opt.fit(state, data, data, steps=4, batch_size=2, warmup_steps=3, progress=False)
    assert history["step"].tolist() == [4, 5, 6, 7] and int(out.method_state.count) == 4


def test_bad_use_is_a_clear_error():
    with pytest.raises(ValueError, match="adjoint_lr"):
        bilevel.BOREP(adjoint_lr=0.0)
    with pytest.raises(ValueError, match="period"):
        bilevel.BOREP(period=0)
    with pytest.raises(ValueError, match="online method"):
        solvers.argmin(
            lambda w, t: jnp.sum((w - t) ** 2), jnp.zeros(2), 1.0, optimizer=optax.sgd(0.1),
            steps=5, adjoint=bilevel.BOREP(),
        )  # fmt: skip
    bilevel.BOREP(adjoint_lr=np.float32(0.1), period=np.int64(3))
