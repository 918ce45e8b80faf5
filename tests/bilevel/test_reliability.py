"""The tuner as a careless user calls it: faults are counted skips or statuses, bad input a clear error.

Each test is named after what it protects; each failed on the code before the one-guard change.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel
import solvers
from bilevel import hparams as H

D = 4


def data(n=32, seed=0):
    rs = np.random.RandomState(seed)
    X = jnp.asarray(rs.randn(n, D), jnp.float32)
    y = X @ jnp.ones(D) + 0.1 * jnp.asarray(rs.randn(n), jnp.float32)
    return X, y


def inner(w, h, b):
    return jnp.mean((b[0] @ w - b[1]) ** 2) + h["wd"] * jnp.sum(w**2)


def outer(w, h, b):
    return jnp.mean((b[0] @ w - b[1]) ** 2)


def tuner(method=None, inner_loss=inner, outer_loss=outer, steps=3, **kw):
    kw.setdefault("inner_optimizer", optax.adam(0.05))
    kw.setdefault("outer_optimizer", optax.adam(0.05))
    kw.setdefault("space", {"wd": H.log(0.1)})
    return bilevel.BilevelOptimizer(
        inner_loss,
        outer_loss,
        method=method or solvers.Implicit(linear_solver=solvers.cg(maxiter=20)),
        inner_steps=steps,
        **kw,
    )


def stacked(X, y, n=3):
    return jnp.stack([X] * n), jnp.stack([y] * n)


def test_adam_second_moment_overflow_is_a_counted_skip_not_a_freeze():
    X, y = data()
    opt = tuner()
    state = opt.init(jnp.zeros(D))
    huge = (jnp.stack([X, X * 1e20, X]), jnp.stack([y, y, y]))  # gradient ~1e40 -> v = inf
    state, m = opt.step(state, huge, (X, y))
    assert int(m["inner_skipped"]) == 1 and int(m["inner_applied"]) == 2
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(state.inner_state))
    before = state.params
    state, m = opt.step(state, stacked(X, y), (X, y))
    assert int(m["inner_skipped"]) == 1  # the later steps are applied again
    assert not np.allclose(state.params, before)


def test_nan_validation_gradient_is_skipped_not_applied_as_zero():
    X, y = data()
    sqrt_norm = lambda w, h, b: jnp.sqrt(jnp.sum(w**2))  # NaN gradient at w = 0
    opt = tuner(outer_loss=sqrt_norm, inner_optimizer=optax.sgd(0.0))
    state = opt.init(jnp.zeros(D))
    new, m = opt.step(state, stacked(X, y), (X, y))
    assert int(m["skipped"]) == 1
    assert int(m["status"]) == solvers.Status.NONFINITE
    np.testing.assert_array_equal(new.hparams["wd"], state.hparams["wd"])
    _g, info = bilevel.hypergradient(
        inner, sqrt_norm, jnp.zeros(D), {"wd": 0.1}, (X, y), (X, y), return_info=True
    )
    assert int(info.status) == solvers.Status.NONFINITE


def test_diverged_linear_solve_is_not_applied():
    X, y = data()
    # A Neumann series with a step far beyond 2 / lambda_max diverges to inf.
    method = solvers.Implicit(linear_solver=solvers.neumann(steps=200, scale=50.0))
    opt = tuner(method, outer_optimizer=optax.sgd(1.0))
    state = opt.init(jnp.ones(D))
    new, m = opt.step(state, stacked(X, y), (X, y))
    assert not bool(jnp.isfinite(m["linear_residual"]))
    assert int(m["skipped"]) == 1 and int(m["status"]) == solvers.Status.NONFINITE
    np.testing.assert_array_equal(new.hparams["wd"], state.hparams["wd"])
    assert float(opt.hparams(new)["wd"]) > 0


def test_constrained_hyperparameters_are_checked_too():
    X, y = data()
    push = optax.GradientTransformation(
        lambda p: optax.EmptyState(),
        lambda g, s, p=None: (jax.tree.map(lambda a: jnp.full_like(a, 150.0), g), s),
    )
    opt = tuner(outer_optimizer=push)  # u = log(0.1) + 150: finite, but exp(u) = inf
    state = opt.init(jnp.zeros(D))
    new, m = opt.step(state, stacked(X, y), (X, y))
    assert int(m["skipped"]) == 1
    np.testing.assert_array_equal(new.hparams["wd"], state.hparams["wd"])
    new, m = opt.step(new, stacked(X, y), (X, y))
    assert int(m["inner_skipped"]) == 0  # training goes on at the old, finite value


def test_inner_loss_metric_averages_the_applied_steps_and_counts_them():
    X, y = data()
    opt = tuner()
    batches = (jnp.stack([X, X * jnp.nan, X]), jnp.stack([y, y, y]))
    _, m = opt.step(opt.init(jnp.zeros(D)), batches, (X, y))
    assert bool(jnp.isfinite(m["inner_loss"]))
    assert int(m["inner_applied"]) == 2 and int(m["inner_skipped"]) == 1


def test_numpy_and_jax_scalars_are_valid_numbers():
    X, y = data()
    opt = tuner(solvers.Truncated(steps=np.int64(2)), steps=np.int64(3))
    assert opt.inner_steps == 3 and isinstance(opt.inner_steps, int)
    assert bilevel.Forward(decay=np.float32(0.9)).decay == pytest.approx(0.9)
    assert solvers.Unrolled(checkpoint_every=np.int32(4)).checkpoint_every == 4
    w = solvers.argmin(
        lambda w, lam: inner(w, {"wd": lam}, (X, y)),
        jnp.zeros(D),
        0.1,
        optimizer=optax.sgd(0.05),
        steps=np.int64(20),
        tol=jnp.asarray(1e-6),
    )
    assert w.shape == (D,)


def test_has_aux_mixups_name_the_loss_and_the_fix():
    X, y = data()
    with_aux = lambda w, h, b: (inner(w, h, b), {"mse": 0.0})
    opt = tuner(inner_loss=with_aux)
    with pytest.raises(TypeError, match=r"inner_loss returned a tuple of 2.*has_aux=True"):
        opt.step(opt.init(jnp.zeros(D)), stacked(X, y), (X, y))
    opt = tuner(has_aux=True)
    with pytest.raises(TypeError, match=r"inner_loss returned an array of shape \(\).*pair"):
        opt.step(opt.init(jnp.zeros(D)), stacked(X, y), (X, y))


def test_missing_batch_key_is_the_users_error_not_a_missing_hyperparameter():
    X, y = data()
    batch_inner = lambda w, h, b: jnp.mean((b["x"] @ w - b["y"]) ** 2) + h["wd"] * jnp.sum(w**2)
    opt = tuner(inner_loss=batch_inner, outer_loss=lambda w, h, b: jnp.mean(b["x"] @ w))
    batches = {"x": jnp.stack([X] * 3), "target": jnp.stack([y] * 3)}  # "y" is missing
    with pytest.raises(KeyError) as e:
        opt.step(opt.init(jnp.zeros(D)), batches, {"x": X})
    assert "space lacks" not in str(e.value) and "'y'" in str(e.value)
    typo = lambda w, h, b: inner(w, {"wd": h["weight_decay"]}, b)
    with pytest.raises(KeyError, match=r"'weight_decay', which the space lacks.*\['wd'\]"):
        opt = tuner(inner_loss=typo)
        opt.step(opt.init(jnp.zeros(D)), stacked(X, y), (X, y))


def test_lbfgs_inner_with_reverse_methods_and_lbfgs_outer_are_clear_errors():
    X, y = data()
    opt = tuner(solvers.Truncated(steps=2), inner_optimizer=optax.lbfgs())
    with pytest.raises(ValueError, match=r"while_loop.*lbfgs"):
        opt.step(opt.init(jnp.zeros(D)), stacked(X, y), (X, y))
    # Forward mode and Implicit work through L-BFGS.
    for method in (bilevel.Forward(), solvers.Implicit()):
        opt = tuner(method, inner_optimizer=optax.lbfgs())
        _, m = opt.step(opt.init(jnp.zeros(D)), stacked(X, y), (X, y))
        assert bool(jnp.isfinite(m["hypergrad_norm"]))
    with pytest.raises(TypeError, match="outer_optimizer needs value_fn"):
        tuner(outer_optimizer=optax.lbfgs())


def test_state_of_another_method_and_none_outer_batch_are_clear_errors():
    X, y = data()
    implicit_state = tuner().init(jnp.zeros(D))
    opt = tuner(bilevel.Forward())
    with pytest.raises(ValueError, match=r"method_state.*another method"):
        opt.step(implicit_state, stacked(X, y), (X, y))
    with pytest.raises(ValueError, match="outer_batch is None"):
        opt.step(opt.init(jnp.zeros(D)), stacked(X, y), None)


def test_step_is_jitted_without_a_user_jit():
    X, y = data()
    opt = tuner()
    state = opt.init(jnp.zeros(D))
    state, _ = opt.step(state, stacked(X, y), (X, y))
    with jax.log_compiles(True):
        import logging

        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger("jax").addHandler(handler)
        try:
            opt.step(state, stacked(X, y), (X, y))
        finally:
            logging.getLogger("jax").removeHandler(handler)
    assert not [r for r in records if "Compiling" in r.getMessage()]


def test_throw_raises_instead_of_reporting():
    X, y = data()
    sqrt_norm = lambda w, h, b: jnp.sqrt(jnp.sum(w**2))
    opt = tuner(outer_loss=sqrt_norm, inner_optimizer=optax.sgd(0.0), throw=True)
    with pytest.raises(Exception, match=r"BilevelOptimizer\.step failed"):
        state, _ = opt.step(opt.init(jnp.zeros(D)), stacked(X, y), (X, y))
        jax.block_until_ready(state)
    with pytest.raises(RuntimeError, match=r"bilevel\.hypergradient failed"):
        bilevel.hypergradient(
            inner, sqrt_norm, jnp.zeros(D), {"wd": 0.1}, (X, y), (X, y), throw=True
        )
