"""bilevel.MAID: closed-form optima, cheaper than fixed accuracy, jit / vmap, guards, errors.

Problems (float64):

- ridge regression with a log-scale weight decay, whose optimum is found by a dense float64
  solve of the exact outer objective;
- the paper's quadratic problem (Salehi et al., Section 5.1) with a real vector hyperparameter and
  a closed-form optimum, on which the a-posteriori error bound is checked against the exact
  hypergradient.

MAID instances are built once per configuration (``functools.cache``) so that every test reuses
the same compiled step.
"""

from __future__ import annotations

import doctest
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.optimize import minimize_scalar

import bilevel
import solvers
from bilevel import _maid
from bilevel import hparams as H

# ----------------------------------------------------------------------------- ridge problem

NT, D = 20, 10
_rs = np.random.RandomState(1)
_X = _rs.randn(2 * NT, D) * np.linspace(0.2, 1.5, D)
_Y = _X @ _rs.randn(D) + 2.0 * _rs.randn(2 * NT)
TRAIN, VAL = (_X[:NT], _Y[:NT]), (_X[NT:], _Y[NT:])
TRACES = {"inner": 0}


def ridge_inner(w, h, b):
    TRACES["inner"] += 1  # Python side effect: runs at trace time only
    return 0.5 * jnp.mean((b[0] @ w - b[1]) ** 2) + 0.5 * h["wd"] * w @ w


def ridge_outer(w, h, b):
    return 0.5 * jnp.mean((b[0] @ w - b[1]) ** 2)


def ridge_value(u):
    """The exact outer objective F(u) by a dense float64 solve."""
    X, y = TRAIN
    w = np.linalg.solve(X.T @ X / NT + np.exp(u) * np.eye(D), X.T @ y / NT)
    return 0.5 * np.mean((VAL[0] @ w - VAL[1]) ** 2)


def _ridge_optimum():
    grid = np.linspace(-8.0, 4.0, 1201)
    i = int(np.argmin([ridge_value(u) for u in grid]))
    assert 0 < i < len(grid) - 1, "the optimum must be interior"
    res = minimize_scalar(ridge_value, bracket=(grid[i - 1], grid[i], grid[i + 1]), tol=1e-12)
    return float(res.x), float(res.fun)


U_STAR, F_STAR = _ridge_optimum()
_L = float(np.linalg.eigvalsh(TRAIN[0].T @ TRAIN[0] / NT)[-1])


@functools.cache
def ridge_maid(adaptive: bool = True) -> bilevel.MAID:
    kw = {} if adaptive else {"adaptive": False, "eps": 1e-6, "delta": 1e-6}
    return bilevel.MAID(
        ridge_inner,
        ridge_outer,
        space={"wd": H.log(1.0)},
        inner_optimizer=optax.sgd(1.0 / (_L + 1.0)),  # 1 / L for wd <= 1
        step_size=1.0,
        **kw,
    )


def data():
    return jax.tree.map(jnp.asarray, TRAIN), jax.tree.map(jnp.asarray, VAL)


def run(maid, state, steps, inner=None, outer=None):
    inner_default, outer_default = data()
    inner = inner_default if inner is None else inner
    outer = outer_default if outer is None else outer
    rows = []
    for _ in range(steps):
        state, metrics = maid.step(state, inner, outer)
        rows.append(jax.device_get(metrics))
    return state, rows


def assert_finite(tree):
    for leaf in jax.tree.leaves(tree):
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            assert bool(jnp.all(jnp.isfinite(leaf)))


# ----------------------------------------------------------------------------- (1) convergence


def test_converges_to_the_closed_form_ridge_optimum():
    with jax.enable_x64(True):
        maid = ridge_maid()
        state = maid.init(jnp.zeros(D))
        assert state.params.dtype == jnp.float64 and state.hparams["wd"].dtype == jnp.float64
        state, rows = run(maid, state, 18)
    u = float(state.hparams["wd"])
    assert abs(u - U_STAR) < 1e-4, (u, U_STAR)
    assert ridge_value(u) - F_STAR < 1e-9 * F_STAR
    # The parameters are the lower-level solution at the final hyperparameters.
    X, y = TRAIN
    w = np.linalg.solve(X.T @ X / NT + np.exp(u) * np.eye(D), X.T @ y / NT)
    np.testing.assert_allclose(np.asarray(state.params), w, atol=1e-6)
    costs = [int(r["cumulative_cost"]) for r in rows]
    assert costs == sorted(costs) and costs[-1] == int(state.cumulative_cost)
    assert all(int(r["status"]) == solvers.Status.SUCCESS for r in rows)
    assert sum(bool(r["accepted"]) for r in rows) >= 6
    # The accuracies adapt: they shrink as the hypergradient does.
    assert float(rows[-1]["eps"]) < 1e-3 * float(rows[0]["eps"])


# The paper's quadratic problem: g(x, t) = |A2 x + A3 t - b2|^2 / 2, f(x) = |A1 x - b1|^2 / 2.
N, M = 40, 5
_rs = np.random.RandomState(0)
A1, A2 = (_rs.randn(N, M) / np.sqrt(N) for _ in range(2))
A3 = A2 @ (np.eye(M) + 0.3 * _rs.randn(M, M) / np.sqrt(M))
B2 = A2 @ _rs.randn(M) + 0.1 * _rs.randn(N)
_G = A2.T @ A2
_SLOPE = np.linalg.solve(_G, A2.T @ A3)  # x*(t) = _OFFSET - _SLOPE t
_OFFSET = np.linalg.solve(_G, A2.T @ B2)
B1 = A1 @ (_OFFSET - _SLOPE @ _rs.randn(M)) + 0.01 * _rs.randn(N)
THETA_STAR = np.linalg.lstsq(A1 @ _SLOPE, A1 @ _OFFSET - B1, rcond=None)[0]


def quadratic_hypergradient(theta):
    x = _OFFSET - _SLOPE @ theta
    return -(A1 @ _SLOPE).T @ (A1 @ x - B1)


def test_converges_to_the_closed_form_optimum_of_a_vector_hyperparameter_within_its_bound():
    eig = np.linalg.eigvalsh(_G)
    with jax.enable_x64(True):
        maid = bilevel.MAID(
            lambda x, h, b: 0.5 * jnp.sum((b[0] @ x + b[1] @ h["theta"] - b[2]) ** 2),
            lambda x, h, b: 0.5 * jnp.sum((b[0] @ x - b[1]) ** 2),
            space={"theta": H.real(np.zeros(M))},
            inner_optimizer=optax.sgd(1.0 / eig[-1]),
            mu=float(eig[0]),  # the exact strong convexity: the bound is a guarantee
            step_size=1.0,
        )
        inner, outer = (jnp.asarray(A2), jnp.asarray(A3), jnp.asarray(B2)), (A1, B1)
        state = maid.init(jnp.zeros(M))
        errors, bounds = [], []
        for _ in range(60):
            theta = np.asarray(state.hparams["theta"])
            state, metrics = maid.step(state, inner, outer)
            p = np.asarray(metrics["hypergrad"]["theta"])
            errors.append(np.linalg.norm(p - quadratic_hypergradient(theta)))
            bounds.append(float(metrics["error_bound"]))
    assert np.linalg.norm(np.asarray(state.hparams["theta"]) - THETA_STAR) < 1e-3
    errors, bounds = np.asarray(errors), np.asarray(bounds)
    assert np.all(errors <= bounds), np.max(errors / bounds)
    assert np.median(bounds / np.maximum(errors, 1e-300)) < 100  # and not vacuous
    assert float(state.estimates.hessian) == 0.0  # a quadratic inner loss has L_A = 0
    assert float(state.estimates.mixed) == 0.0  # and B independent of x: L_B = 0


# ----------------------------------------------------------------------------- (2) cost


def cost_to_reach(rows, us, target):
    for r, u in zip(rows, us, strict=True):
        if (ridge_value(u) - F_STAR) / F_STAR <= target:
            return int(r["cumulative_cost"])
    return None


def test_adaptive_accuracy_costs_less_than_fixed_accuracy(capsys):
    results = {}
    with jax.enable_x64(True):
        for adaptive in (True, False):
            maid = ridge_maid(adaptive)
            state = maid.init(jnp.zeros(D))
            us = []
            rows = []
            for _ in range(30):
                state, r = run(maid, state, 1)
                rows += r
                us.append(float(state.hparams["wd"]))
            results[adaptive] = {t: cost_to_reach(rows, us, t) for t in (1e-3, 1e-4, 1e-5)}
            if not adaptive:
                assert all(float(r["eps"]) == 1e-6 for r in rows)  # no adaptation
    with capsys.disabled():
        print(
            "\nMAID cost (lower-level + CG iterations) to reach (F - F*) / F* <= target: "
            f"adaptive {results[True]}, fixed eps = delta = 1e-6 {results[False]}"
        )
    assert results[True][1e-3] is not None and results[False][1e-3] is not None
    assert results[True][1e-3] < results[False][1e-3]


# ----------------------------------------------------------------------------- (3) jit / vmap


def test_second_step_does_not_retrace():
    with jax.enable_x64(True):
        maid = ridge_maid()
        inner, outer = data()
        state = maid.init(jnp.zeros(D))
        state, _ = maid.step(state, inner, outer)
        traced = TRACES["inner"]
        state, _ = maid.step(state, inner, outer)
        state, _ = maid.step(state, (inner[0] + 0.0, inner[1]), outer)  # new values, same shapes
        assert TRACES["inner"] == traced


def test_vmap_over_a_population_of_initial_hparams_equals_a_loop():
    with jax.enable_x64(True):
        maid = ridge_maid()
        inner, outer = data()
        population = {"wd": jnp.log(jnp.asarray([0.05, 1.0, 4.0]))}
        states = jax.vmap(lambda u: maid.init(jnp.zeros(D), u))(population)
        vstep = jax.jit(jax.vmap(maid.step, in_axes=(0, None, None)))
        for _ in range(3):
            states, vmetrics = vstep(states, inner, outer)
        for i in range(3):
            member = maid.init(jnp.zeros(D), jax.tree.map(lambda a, i=i: a[i], population))
            member, rows = run(maid, member, 3)
            np.testing.assert_allclose(
                float(member.hparams["wd"]), float(states.hparams["wd"][i]), rtol=1e-9
            )
            np.testing.assert_allclose(
                np.asarray(member.params), np.asarray(states.params[i]), rtol=1e-8, atol=1e-12
            )
            assert int(member.cumulative_cost) == int(states.cumulative_cost[i])
            assert int(rows[-1]["backtracks"]) == int(vmetrics["backtracks"][i])


# ----------------------------------------------------------------------------- (4) guards


@pytest.mark.parametrize("where", ["inner", "outer"])
def test_nonfinite_data_is_a_counted_skip_and_the_state_stays_finite(where):
    with jax.enable_x64(True):
        maid = ridge_maid()
        inner, outer = data()
        state, _ = run(maid, maid.init(jnp.zeros(D)), 2)
        if where == "inner":
            inner = (inner[0].at[3, 1].set(jnp.nan), inner[1])
        else:
            outer = (outer[0], outer[1].at[0].set(jnp.inf))
        new, metrics = maid.step(state, inner, outer)
        assert int(metrics["skipped"]) == 1 and int(new.skipped) == 1
        assert int(metrics["status"]) == solvers.Status.NONFINITE
        assert not bool(metrics["accepted"])
        assert_finite(new)
        for name in ("params", "hparams", "adjoint", "eps", "delta", "step_size", "estimates"):
            old, kept = jax.tree.leaves(getattr(state, name)), jax.tree.leaves(getattr(new, name))
            for a, b in zip(old, kept, strict=True):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
        assert int(new.step) == int(state.step) + 1
        new, metrics = maid.step(new, *data())  # clean data: back to normal
        assert int(metrics["skipped"]) == 1 and int(metrics["status"]) == solvers.Status.SUCCESS


def test_an_overflowing_trial_step_is_rejected_not_applied():
    with jax.enable_x64(True):
        maid = ridge_maid()
        below = {"wd": jnp.log(jnp.asarray(1e-3))}  # u < u*: p < 0, u - alpha p -> +inf
        state, rows = run(maid, maid.init(jnp.zeros(D), below), 1)
        assert float(rows[0]["hypergrad"]["wd"]) < 0
        state = state._replace(step_size=jnp.full_like(state.step_size, 1e300))  # exp overflows
        new, metrics = maid.step(state, *data())
        assert not bool(metrics["accepted"]) and int(metrics["skipped"]) == 0
        assert int(metrics["backtracks"]) >= 10
        assert float(new.hparams["wd"]) == float(state.hparams["wd"])
        assert float(new.step_size) < 1e300
        assert_finite(new)


# ----------------------------------------------------------------------------- (5) errors


def configured(**kw):
    args = {"space": {"wd": H.log(1.0)}}
    args.update(kw)
    return bilevel.MAID(ridge_inner, ridge_outer, **args)


@pytest.mark.parametrize(
    ("kw", "error", "name"),
    [
        ({"eps": 0.0}, ValueError, "eps"),
        ({"delta": -1.0}, ValueError, "delta"),
        ({"step_size": float("nan")}, ValueError, "step_size"),
        ({"eta": 1.0}, ValueError, "eta"),
        ({"rho": 0.0}, ValueError, "rho"),
        ({"tau": 1.5}, ValueError, "tau"),
        ({"nu": 0.5}, ValueError, "nu"),
        ({"loops": 0}, ValueError, "loops"),
        ({"backtracks": 2.5}, TypeError, "backtracks"),
        ({"adaptive": "yes"}, TypeError, "adaptive"),
        ({"throw": 1}, TypeError, "throw"),
        ({"mu": -1.0}, ValueError, "mu"),
        ({"mu": "big"}, TypeError, "mu"),
        ({"min_accuracy": 0.0}, ValueError, "min_accuracy"),
        ({"inner_maxiter": 0}, ValueError, "inner_maxiter"),
        ({"linear_maxiter": 0}, ValueError, "linear_maxiter"),
        ({"inner_optimizer": "sgd"}, TypeError, "inner_optimizer"),
        ({"space": {"wd": 0.1}}, TypeError, "hparams.log"),
    ],
)
def test_bad_configuration_raises_naming_the_argument(kw, error, name):
    with pytest.raises(error, match=name):
        configured(**kw)


def test_bad_calls_raise_naming_the_argument():
    with pytest.raises(TypeError, match="inner_loss"):
        bilevel.MAID(None, ridge_outer, space={"wd": H.log(1.0)})
    maid = configured()
    with pytest.raises(TypeError, match="params"):
        maid.init(jnp.zeros(D, jnp.int32))
    with pytest.raises(ValueError, match="does not match the space"):
        maid.init(jnp.zeros(D), {"lr": jnp.zeros(())})
    with pytest.raises(ValueError, match="non-finite"):
        maid.init(jnp.zeros(D), {"wd": jnp.asarray(jnp.nan)})
    state = maid.init(jnp.zeros(D))
    with pytest.raises(TypeError, match="MAIDState"):
        maid.step(dict(state._asdict()), *data())
    with pytest.raises(ValueError, match="outer_data"):
        maid.step(state, data()[0], None)
    with pytest.raises(TypeError, match="batch_size"):
        maid.fit(state, *data(), steps=1, batch_size=8)
    vector = bilevel.MAID(
        lambda w, h, b: (b[0] @ w - b[1]) ** 2, ridge_outer, space={"wd": H.log(1.0)}
    )
    with pytest.raises(TypeError, match="inner_loss must return a real scalar"):
        vector.step(vector.init(jnp.zeros(D)), *data())


# ----------------------------------------------------------------------------- fit, docs


def test_fit_records_history_and_resumes_bit_identically(tmp_path):
    with jax.enable_x64(True):
        maid = ridge_maid()
        state = maid.init(jnp.zeros(D))
        straight, history = maid.fit(state, *data(), steps=4, chunk=2, progress=False)
        assert history["step"].tolist() == [1, 2, 3, 4]
        assert history["hparams/wd"].shape == (4,) and history["eps"].shape == (4,)
        assert np.all(np.diff(history["cumulative_cost"]) >= 0)
        ckpt = tmp_path / "ckpt"
        maid.fit(state, *data(), steps=2, chunk=2, progress=False, checkpoint_dir=ckpt)
        resumed, h2 = maid.fit(
            state, *data(), steps=4, chunk=2, progress=False, checkpoint_dir=ckpt
        )
    np.testing.assert_array_equal(h2["cumulative_cost"], history["cumulative_cost"])
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_docstring_examples():
    result = doctest.testmod(_maid, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
