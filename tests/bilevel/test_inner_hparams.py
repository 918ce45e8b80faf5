"""Hyperparameters outside the tuned space: an inner optimizer built from ``h``, fixed values.

The learning rate's hypergradient through ``inner_optimizer=lambda h: optax.sgd(h["lr"])`` is
checked against central finite differences in float64 (Unrolled) and against Forward mode; fixed
hyperparameters reach the losses and the optimizer, are never tuned, and vmap per member.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel
import solvers
from bilevel import hparams as H

D = 5


def _data(dtype=jnp.float32):
    rs = np.random.RandomState(0)
    X = rs.randn(40, D)
    y = X @ np.linspace(-1.0, 1.0, D) + 0.3 * rs.randn(40)
    X, y = jnp.asarray(X, dtype), jnp.asarray(y, dtype)
    return (X[:24], y[:24]), (X[24:], y[24:])


def inner(w, h, b):
    return jnp.mean((b[0] @ w - b[1]) ** 2) + h["wd"] * jnp.sum(w**2)


def outer(w, h, b):
    return jnp.mean((b[0] @ w - b[1]) ** 2)


def _opt(method, **kw):
    kw.setdefault("inner_optimizer", lambda h: optax.sgd(h["lr"], momentum=0.5))
    return bilevel.BilevelOptimizer(
        inner,
        outer,
        outer_optimizer=optax.sgd(0.0),
        space={"wd": H.log(0.05), "lr": H.log(0.05)},
        method=method,
        inner_steps=4,
        **kw,
    )


def test_learning_rate_hypergradient_matches_central_differences():
    with jax.enable_x64(True):
        train, val = _data(jnp.float64)
        opt = _opt(solvers.Unrolled())
        w0 = jnp.zeros(D, jnp.float64)
        batches = jax.tree.map(lambda a: a[None], train)
        u = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), opt.init(w0).hparams)
        state = opt.init(w0, hparams=u)
        _, m = opt.step(state, batches, val)

        def loss_at(u):
            return float(opt.step(opt.init(w0, hparams=u), batches, val)[1]["outer_loss"])

        eps = 1e-5
        for name in ("lr", "wd"):
            plus = {**u, name: u[name] + eps}
            minus = {**u, name: u[name] - eps}
            fd = (loss_at(plus) - loss_at(minus)) / (2 * eps)
            np.testing.assert_allclose(float(m["hypergrad"][name]), fd, rtol=1e-6, atol=1e-10)
        assert abs(float(m["hypergrad"]["lr"])) > 1e-3  # the learning rate does matter here


def test_forward_and_truncated_agree_with_unrolled_on_the_learning_rate():
    train, val = _data()
    batches = jax.tree.map(lambda a: a[None], train)
    grads = {}
    for name, method in {
        "unrolled": solvers.Unrolled(),
        "truncated": solvers.Truncated(steps=4),
        "forward": bilevel.Forward(),
    }.items():
        opt = _opt(method)
        _, m = opt.step(opt.init(jnp.zeros(D)), batches, val)
        grads[name] = m["hypergrad"]
    for name in ("truncated", "forward"):
        for k in ("lr", "wd"):
            np.testing.assert_allclose(grads[name][k], grads["unrolled"][k], rtol=1e-4)


def test_implicit_rejects_an_optimizer_built_from_tuned_hyperparameters():
    with pytest.raises(ValueError, match=r"built from tuned hyperparameter\(s\) \['lr'\]"):
        _opt(solvers.Implicit())


def test_implicit_accepts_an_optimizer_built_from_fixed_hyperparameters_only():
    train, val = _data()
    batches = jax.tree.map(lambda a: a[None], train)
    factory = bilevel.BilevelOptimizer(
        inner,
        outer,
        inner_optimizer=lambda h: optax.sgd(h["lr"]),
        outer_optimizer=optax.adam(0.1),
        space={"wd": H.log(0.05)},
        method=solvers.Implicit(),
        inner_steps=4,
        fixed_hparams={"lr": 0.05},
    )
    plain = bilevel.BilevelOptimizer(
        inner,
        outer,
        inner_optimizer=optax.sgd(0.05),
        outer_optimizer=optax.adam(0.1),
        space={"wd": H.log(0.05)},
        method=solvers.Implicit(),
        inner_steps=4,
    )
    s1, s2 = factory.init(jnp.zeros(D)), plain.init(jnp.zeros(D))
    for _ in range(3):
        s1, m1 = factory.step(s1, batches, val)
        s2, m2 = plain.step(s2, batches, val)
    np.testing.assert_array_equal(s1.params, s2.params)
    np.testing.assert_array_equal(m1["hypergrad"]["wd"], m2["hypergrad"]["wd"])
    assert factory.hparams(s1)["lr"] == pytest.approx(0.05)


def test_fixed_hyperparameters_reach_the_losses_and_can_be_rewritten_without_retrace():
    train, val = _data()
    batches = jax.tree.map(lambda a: a[None], train)
    seen = []

    def inner_scaled(w, h, b):
        seen.append(None)  # counts traces
        return h["scale"] * inner(w, h, b)

    opt = bilevel.BilevelOptimizer(
        inner_scaled,
        outer,
        inner_optimizer=optax.sgd(0.05),
        outer_optimizer=optax.sgd(0.0),
        space={"wd": H.log(0.05)},
        method=solvers.Truncated(steps=2),
        inner_steps=4,
        fixed_hparams={"scale": 1.0},
    )
    s = opt.init(jnp.zeros(D))
    a, _ = opt.step(s, batches, val)
    traces = len(seen)
    b, _ = opt.step(s._replace(fixed_hparams={"scale": jnp.asarray(0.0)}), batches, val)
    assert len(seen) == traces  # same shapes: no retrace
    np.testing.assert_array_equal(b.params, jnp.zeros(D))  # zero loss scale: no movement
    assert not np.allclose(a.params, 0.0)
    np.testing.assert_array_equal(b.fixed_hparams["scale"], 0.0)


def test_vmap_over_fixed_learning_rates_equals_a_loop():
    train, val = _data()
    batches = jax.tree.map(lambda a: a[None], train)
    opt = _opt(solvers.Truncated(steps=2), fixed_hparams={"momentum": 0.5})
    lrs = jnp.asarray([0.01, 0.05, 0.1])
    us = jax.vmap(lambda lr: {"wd": jnp.log(0.05), "lr": jnp.log(lr)})(lrs)
    moms = jnp.asarray([0.0, 0.5, 0.9])
    opt = bilevel.BilevelOptimizer(
        inner,
        outer,
        inner_optimizer=lambda h: optax.sgd(h["lr"], momentum=h["momentum"]),
        outer_optimizer=optax.adam(0.1),
        space={"wd": H.log(0.05), "lr": H.log(0.05)},
        method=solvers.Truncated(steps=2),
        inner_steps=4,
        fixed_hparams={"momentum": 0.5},
    )

    def run(u, mom):
        s = opt.init(jnp.zeros(D), hparams=u)
        s = s._replace(fixed_hparams={"momentum": mom})
        return opt.step(s, batches, val)[0]

    pop = jax.vmap(run)(us, moms)
    for i in range(3):
        one = run({k: v[i] for k, v in us.items()}, moms[i])
        np.testing.assert_allclose(pop.params[i], one.params, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(pop.hparams["lr"][i], one.hparams["lr"], rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"fixed_hparams": {"wd": 0.1}}, ValueError, "both in space"),
        ({"fixed_hparams": [0.1]}, TypeError, "fixed_hparams must be a dict"),
        ({"fixed_hparams": {"x": "a"}}, TypeError, r"fixed_hparams\['x'\] must be a real number"),
        ({"inner_optimizer": lambda h: optax.sgd(h["nope"])}, TypeError, "'nope'"),
        ({"inner_optimizer": lambda h: 0.1}, TypeError, "must return an optax"),
        ({"inner_optimizer": 0.1}, TypeError, "inner_optimizer must be an optax"),
    ],
)
def test_bad_inner_hyperparameter_settings_raise_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        _opt(solvers.Unrolled(), **kwargs)


def test_fixed_hyperparameters_need_a_dict_space():
    with pytest.raises(TypeError, match="needs a dict space"):
        bilevel.BilevelOptimizer(
            lambda w, h, b: jnp.sum(w**2) * h,
            lambda w, h, b: jnp.sum(w**2),
            inner_optimizer=optax.sgd(0.1),
            outer_optimizer=optax.sgd(0.1),
            space=H.log(0.1),
            method=solvers.Unrolled(),
            inner_steps=2,
            fixed_hparams={"lr": 0.1},
        )
