"""The validation-driven learning rate of ``hd_*`` through the tuner: ``inner_hyper_grads=True``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel
import solvers
from bilevel import hparams as H


def _data():
    rng = np.random.RandomState(0)
    X = jnp.asarray(rng.randn(60, 5), jnp.float32)
    y = X @ jnp.linspace(-1.0, 1.0, 5) + 0.5 * jnp.asarray(rng.randn(60), jnp.float32)
    return (X[:40], y[:40]), (X[40:], y[40:])


def inner(w, h, b):
    return jnp.mean((b[0] @ w - b[1]) ** 2) + h["wd"] * jnp.sum(w**2)


def outer(w, h, b):
    return jnp.mean((b[0] @ w - b[1]) ** 2)


def _opt(inner_optimizer, **kw):
    return bilevel.BilevelOptimizer(
        inner, outer, inner_optimizer=inner_optimizer, outer_optimizer=optax.sgd(0.0),
        space={"wd": H.log(0.05)}, method=solvers.Implicit(), inner_steps=3, **kw,
    )  # fmt: skip


@pytest.mark.parametrize("make", [lambda: bilevel.hd_adam(0.01), lambda: bilevel.hd_sgd(0.01)])
def test_every_inner_step_passes_the_validation_gradient(make):
    """One outer step equals a hand-written loop of the hd update with hyper_grads = the outer
    loss's gradient at the current weights, and differs from the training-gradient rule."""
    train, val = _data()
    batches = jax.tree.map(lambda a: jnp.stack([a[:12], a[12:24], a[24:36]]), train)
    opt = _opt(make(), inner_hyper_grads=True)
    state, _ = opt.step(opt.init(jnp.zeros(5)), batches, val)

    tx = make()
    w, s = jnp.zeros(5), tx.init(jnp.zeros(5))
    h = {"wd": jnp.asarray(0.05)}
    for t in range(3):
        b = jax.tree.map(lambda a, t=t: a[t], batches)
        g = jax.grad(inner)(w, h, b)
        u, s = tx.update(g, s, w, hyper_grads=jax.grad(outer)(w, h, val))
        w = optax.apply_updates(w, u)
    np.testing.assert_allclose(state.params, w, rtol=1e-5, atol=1e-7)
    lr = optax.tree_utils.tree_get(state.inner_state, "learning_rate")
    np.testing.assert_allclose(lr, optax.tree_utils.tree_get(s, "learning_rate"), rtol=1e-5)

    plain = _opt(make())
    other, _ = plain.step(plain.init(jnp.zeros(5)), batches, val)
    assert float(optax.tree_utils.tree_get(other.inner_state, "learning_rate")) != float(lr)


def test_the_rate_shrinks_when_training_steps_stop_helping_the_validation_loss():
    """Validation targets unrelated to the training targets: the validation gradient disagrees
    with the training direction, and the validation-driven rate falls below the training one."""
    train, val = _data()
    val = (val[0], -val[1])
    rates = {}
    for flag in (False, True):
        opt = _opt(bilevel.hd_adam(0.05), inner_hyper_grads=flag)
        state = opt.init(jnp.zeros(5))
        step = jax.jit(opt.step)
        for _ in range(10):
            state, _ = step(state, jax.tree.map(lambda a: a[None], train), val)
        rates[flag] = float(optax.tree_utils.tree_get(state.inner_state, "learning_rate"))
    assert rates[True] < 0.5 * rates[False], rates


def test_warmup_uses_the_training_gradient():
    train, _ = _data()
    opt, plain = _opt(bilevel.hd_adam(0.01), inner_hyper_grads=True), _opt(bilevel.hd_adam(0.01))
    batches = jax.tree.map(lambda a: a[None], train)
    a, _ = opt.warmup(opt.init(jnp.zeros(5)), batches)
    b, _ = plain.warmup(plain.init(jnp.zeros(5)), batches)
    np.testing.assert_array_equal(a.params, b.params)


def test_an_optimizer_without_a_hypergradient_rate_is_an_error():
    with pytest.raises(ValueError, match=r"bilevel\.hd_adam"):
        _opt(optax.adam(0.01), inner_hyper_grads=True).init(jnp.zeros(5))
    with pytest.raises(TypeError, match="inner_hyper_grads must be a bool"):
        _opt(optax.adam(0.01), inner_hyper_grads="yes")
    opt = _opt(optax.chain(optax.clip(1.0), bilevel.hd_adam(0.01)), inner_hyper_grads=True)
    opt.init(jnp.zeros(5))  # found inside a chain
