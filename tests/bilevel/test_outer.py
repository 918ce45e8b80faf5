"""``bilevel.normalized_momentum``: the rule, its scale-freeness, and its use as outer optimizer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel


def test_matches_a_numpy_transcription_with_a_schedule():
    rng = np.random.RandomState(0)
    grads = [{"a": rng.randn(3), "b": rng.randn(2, 2)} for _ in range(6)]
    schedule = optax.linear_schedule(0.1, 0.01, 6)
    tx = bilevel.normalized_momentum(schedule, beta=0.8)
    state = tx.init(jax.tree.map(jnp.zeros_like, grads[0]))
    m = {"a": np.zeros(3), "b": np.zeros((2, 2))}
    for t, g in enumerate(grads):
        m = {k: 0.8 * m[k] + 0.2 * g[k] for k in m}
        norm = np.sqrt(sum(np.sum(v**2) for v in m.values()))
        want = {k: -float(schedule(t)) * m[k] / norm for k in m}
        got, state = tx.update(jax.tree.map(jnp.asarray, g), state)
        for k in m:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7)


def test_step_length_is_scale_free_and_keeps_relative_sizes():
    """The update has length lr whatever the gradient scale; coordinates keep their ratio
    (Adam moves both by about lr: the lockstep of per-layer hyperparameters)."""
    g = jnp.array([1.0, 0.1])
    for scale in (1e-6, 1.0, 1e6):
        tx = bilevel.normalized_momentum(0.05, beta=0.9)
        u, _ = tx.update(scale * g, tx.init(g))
        np.testing.assert_allclose(jnp.linalg.norm(u), 0.05, rtol=1e-5)
        np.testing.assert_allclose(u[0] / u[1], 10.0, rtol=1e-4)
    adam = optax.adam(0.05)
    u, _ = adam.update(g, adam.init(g))
    np.testing.assert_allclose(u[0] / u[1], 1.0, rtol=1e-3)


def test_zero_momentum_is_a_zero_update_and_bad_input_is_an_error():
    tx = bilevel.normalized_momentum(0.1)
    u, _ = tx.update(jnp.zeros(3), tx.init(jnp.zeros(3)))
    assert bool(jnp.all(u == 0)) and bool(jnp.all(jnp.isfinite(u)))
    with pytest.raises(ValueError, match="beta"):
        bilevel.normalized_momentum(0.1, beta=1.0)
    with pytest.raises(ValueError, match="learning_rate"):
        bilevel.normalized_momentum(0.0)
    bilevel.normalized_momentum(np.float32(0.1), beta=np.float64(0.5))  # NumPy scalars are numbers


def _two_decay_moves(**outer_optimizer):
    """``|log wd - log 0.1|`` of two decays after 20 Forward-mode outer steps on a quadratic
    whose decays get hypergradients of very different sizes (``outer_optimizer=`` omitted: the
    default); the final state is the second output."""
    rng = np.random.RandomState(1)
    X = jnp.asarray(rng.randn(64, 6), jnp.float32)
    y = X @ jnp.asarray([3.0, 3.0, 3.0, 0.0, 0.0, 0.0]) + 0.5 * jnp.asarray(rng.randn(64))
    Xv = jnp.asarray(rng.randn(64, 6), jnp.float32)
    yv = Xv @ jnp.asarray([3.0, 3.0, 3.0, 0.0, 0.0, 0.0])

    def inner(w, h, b):
        fit = jnp.mean((b[0] @ w - b[1]) ** 2)
        return fit + h["wd"][0] * jnp.sum(w[:3] ** 2) + h["wd"][1] * jnp.sum(w[3:] ** 2)

    def outer(w, h, b):
        return jnp.mean((b[0] @ w - b[1]) ** 2)

    opt = bilevel.BilevelOptimizer(
        inner, outer, inner_optimizer=optax.sgd(0.05),
        space={"wd": bilevel.hparams.log(jnp.full(2, 0.1))},
        method=bilevel.Forward(), inner_steps=5, **outer_optimizer,
    )  # fmt: skip
    state = opt.init(jnp.zeros(6))
    step = jax.jit(opt.step)
    for _ in range(20):
        state, _ = step(state, (X[None], y[None]), (Xv, yv))
    return np.abs(np.log(np.asarray(opt.hparams(state)["wd"])) - np.log(0.1)), state


def test_as_the_outer_optimizer_per_layer_decays_separate():
    """Two decays with hypergradients of very different sizes: normalized momentum moves them
    by different amounts, Adam by about the same."""
    moves = {
        name: _two_decay_moves(outer_optimizer=tx)[0]
        for name, tx in (("nm", bilevel.normalized_momentum(0.05)), ("adam", optax.adam(0.05)))
    }
    ratio = lambda m: max(m) / max(min(m), 1e-12)
    assert ratio(moves["nm"]) > 3.0 * ratio(moves["adam"]), moves


# ----------------------------------------------------------------------------- group_adam


def _group_adam_numpy(grads, lr, b1, b2, eps, max_step):
    """A NumPy transcription of group_adam over a dict of arrays (one group per key)."""
    m = {k: np.zeros_like(v) for k, v in grads[0].items()}
    s = dict.fromkeys(grads[0], 0.0)
    out = []
    for t, g in enumerate(grads, start=1):
        step = {}
        for k in g:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            s[k] = b2 * s[k] + (1 - b2) * np.mean(g[k] ** 2)
            r = (m[k] / (1 - b1**t)) / (np.sqrt(s[k] / (1 - b2**t)) + eps)
            step[k] = -lr * np.clip(r, -max_step, max_step)
        out.append(step)
    return out


def test_group_adam_matches_a_numpy_transcription():
    from bilevel import group_adam

    rng = np.random.RandomState(0)
    grads = [{"wd": rng.randn(3), "lr": rng.randn(), "w": 30 * rng.randn(2, 2)} for _ in range(7)]
    want = _group_adam_numpy(grads, 0.1, 0.8, 0.9, 1e-8, 1.5)
    tx = group_adam(0.1, b1=0.8, b2=0.9, eps=1e-8, max_step=1.5)
    state = tx.init(jax.tree.map(lambda a: jnp.zeros_like(jnp.asarray(a)), grads[0]))
    for g, w in zip(grads, want, strict=True):
        got, state = tx.update(jax.tree.map(jnp.asarray, g), state)
        for k in w:
            np.testing.assert_allclose(got[k], w[k], rtol=2e-5, atol=1e-7)


def test_group_adam_separates_a_group_by_size_and_is_scale_free_across_groups():
    """Within a group the steps keep the hypergradients' ratios (Adam: all equal); a group with
    hypergradients 1e6 times smaller moves as far as the others."""
    from bilevel import group_adam

    g = {"wd": jnp.array([1.0, 0.3, 0.1]), "drop": 1e-6 * jnp.array([1.0, 0.3, 0.1])}
    tx = group_adam(0.1, max_step=None)
    state = tx.init(g)
    for _ in range(5):
        u, state = tx.update(g, state)
    np.testing.assert_allclose(u["wd"] / u["wd"][0], [1.0, 0.3, 0.1], rtol=1e-5)
    np.testing.assert_allclose(u["drop"], u["wd"], rtol=1e-5)
    adam = optax.adam(0.1)
    ua, _ = adam.update(g["wd"], adam.init(g["wd"]))
    np.testing.assert_allclose(ua / ua[0], [1.0, 1.0, 1.0], rtol=1e-4)


def test_group_adam_trust_region_and_zero_gradient():
    from bilevel import group_adam

    big = jnp.zeros(100).at[0].set(1.0)  # one coordinate carries the group's norm: ratio 10
    u, _ = group_adam(0.1, b1=0.0, b2=0.0, max_step=3.0).update(big, group_adam().init(big))
    np.testing.assert_allclose(u[0], -0.3, rtol=1e-6)
    assert bool(jnp.all(u[1:] == 0))
    u, _ = group_adam(0.1, b1=0.0, b2=0.0, max_step=None).update(big, group_adam().init(big))
    np.testing.assert_allclose(u[0], -1.0, rtol=1e-5)
    z, _ = group_adam().update(jnp.zeros(3), group_adam().init(jnp.zeros(3)))
    assert bool(jnp.all(z == 0)) and bool(jnp.all(jnp.isfinite(z)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"b1": 1.0}, "b1"),
        ({"b2": -0.1}, "b2"),
        ({"max_step": 0.0}, "max_step"),
        ({"eps": -1.0}, "eps"),
    ],
)
def test_group_adam_rejects_bad_settings(kwargs, match):
    from bilevel import group_adam

    with pytest.raises(ValueError, match=match):
        group_adam(**kwargs)


def test_group_adam_is_the_default_outer_optimizer_and_separates_per_layer_decays():
    """The quadratic problem above: the default outer step (group_adam) moves the two decays by
    different amounts, as normalized momentum does and Adam does not."""
    from bilevel import GroupAdamState

    moves, state = _two_decay_moves()
    assert isinstance(state.outer_state, GroupAdamState)
    assert max(moves) > 3.0 * min(moves), moves
