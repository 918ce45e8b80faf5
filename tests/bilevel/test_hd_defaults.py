"""The default rule of hd_adam / hd_sgd: multiplicative, scale-free, rescues bad rates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel
from tests.bilevel.test_hd import run_jax

# ----------------------------------------------------------------------------- rule selection


@pytest.mark.parametrize(
    ("default", "explicit"),
    [
        (
            lambda: bilevel.hd_adam(0.01),
            lambda: bilevel.hd_adam(0.01, bilevel.DEFAULT_HYPER_LR, multiplicative=True),
        ),
        (
            lambda: bilevel.hd_sgd(0.05, momentum=0.9),
            lambda: bilevel.hd_sgd(
                0.05, bilevel.DEFAULT_HYPER_LR, momentum=0.9, multiplicative=True
            ),
        ),
        (
            lambda: bilevel.hd_sgd(0.5),
            lambda: bilevel.hd_sgd(0.5, bilevel.DEFAULT_HYPER_LR, multiplicative=True),
        ),
    ],
    ids=["adam", "momentum", "sgd"],
)
def test_default_is_the_multiplicative_rule_with_the_default_beta(default, explicit):
    with jax.enable_x64(True):
        lr_d, traj_d, _ = run_jax(default(), steps=60)
        lr_e, traj_e, _ = run_jax(explicit(), steps=60)
    np.testing.assert_array_equal(lr_d, lr_e)
    np.testing.assert_array_equal(traj_d, traj_e)
    assert np.max(np.abs(lr_d / lr_d[0] - 1)) > 0.1  # the default moves the rate


@pytest.mark.parametrize("factory", [bilevel.hd_adam, bilevel.hd_sgd])
def test_hyper_lr_alone_keeps_the_additive_rule(factory):
    with jax.enable_x64(True):
        lr_a, traj_a, _ = run_jax(factory(0.01, 1e-3), steps=60)
        lr_e, traj_e, _ = run_jax(factory(0.01, 1e-3, multiplicative=False), steps=60)
        lr_m, _, _ = run_jax(factory(0.01, 1e-3, multiplicative=True), steps=60)
    np.testing.assert_array_equal(lr_a, lr_e)
    np.testing.assert_array_equal(traj_a, traj_e)
    assert not np.allclose(lr_a, lr_m)


@pytest.mark.parametrize("factory", [bilevel.hd_adam, bilevel.hd_sgd])
def test_additive_rule_without_hyper_lr_raises(factory):
    with pytest.raises(ValueError, match="hyper_lr"):
        factory(1e-3, multiplicative=False)


def test_default_beta_is_documented_and_exported():
    assert bilevel.DEFAULT_HYPER_LR == pytest.approx(0.1)
    for fn in (bilevel.hd_adam, bilevel.hd_sgd):
        assert "DEFAULT_HYPER_LR" in fn.__doc__ and "multiplicative=True" in fn.__doc__


def test_multiplicative_rule_is_scale_free():
    """The loss scaled by c and the rate by 1/c: the same SGD run, the same rate ratios.

    The default rule's signal is a cosine, which no rescaling of the loss changes; the additive
    rule's signal scales with c^2, so its hyper_lr would have to be retuned.
    """
    c = 1e3
    with jax.enable_x64(True):
        x, y = _digits(pixels=False)
        loss = lambda p: _xent(p, x, y)
        scaled = lambda p: c * _xent(p, x, y)
        for make in (lambda lr: bilevel.hd_sgd(lr), lambda lr: bilevel.hd_sgd(lr, momentum=0.9)):
            (f1, lr1), (f2, lr2) = _train(make(1e-3), loss, 60), _train(make(1e-3 / c), scaled, 60)
            np.testing.assert_allclose(lr2 * c, lr1, rtol=1e-9)
            np.testing.assert_allclose(f2 / c, f1, rtol=1e-9)
            assert lr1[-1] > 10 * lr1[0]
        # Adam's direction does not scale with the loss (up to eps): the same rates
        (_, lr1), (_, lr2) = (
            _train(bilevel.hd_adam(1e-3), loss, 60),
            _train(bilevel.hd_adam(1e-3), scaled, 60),
        )
        np.testing.assert_allclose(lr2, lr1, rtol=1e-4)
        # the additive rule is not scale free
        (_, lr1), (_, lr2) = (
            _train(bilevel.hd_sgd(1e-3, 1e-2), loss, 60),
            _train(bilevel.hd_sgd(1e-3 / c, 1e-2), scaled, 60),
        )
        assert not np.allclose(lr2 * c, lr1, rtol=0.1)


# ----------------------------------------------------------------------------- yardstick


def _digits(pixels):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = data.data.astype(np.float64)
    if pixels:
        x = x / 16.0
    else:
        std = x.std(0)
        x = (x - x.mean(0)) / np.where(std > 0, std, 1.0)
    return jnp.asarray(x, jnp.float32), jnp.asarray(data.target)


def _xent(p, x, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(x @ p["w"] + p["b"], y))


def _trainer(tx, loss, steps, dim=64):
    """Full-batch training from zero as one jitted program of the data: ``run(*data)`` returns
    (final loss, learning rate per step) of ``loss(params, *data)``."""
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32

    @jax.jit
    def run(*data):
        params = {"w": jnp.zeros((dim, 10), dtype), "b": jnp.zeros(10, dtype)}

        def step(carry, _):
            p, s = carry
            updates, s = tx.update(jax.grad(loss)(p, *data), s, p)
            lr = optax.tree_utils.tree_get(s, "learning_rate", jnp.zeros((), dtype))
            return (optax.apply_updates(p, updates), s), lr

        (p, _), lrs = jax.lax.scan(step, (params, tx.init(params)), length=steps)
        return loss(p, *data), lrs

    return run


def _train(tx, loss, steps, dim=64):
    """Full-batch training from zero; returns (final loss, learning rates per step)."""
    final, lrs = _trainer(tx, loss, steps, dim)()
    return float(final), np.asarray(lrs)


@pytest.fixture(scope="module")
def digits_runs():
    """Final loss after 300 full-batch steps, for both feature scalings.

    One program per optimizer, run on both scalings (the data are arguments, not constants
    of the program: one compile each instead of two)."""
    runs = {
        "adam(1e-4)": optax.adam(1e-4),
        "hd_adam(1e-4)": bilevel.hd_adam(1e-4),
        "sgd(1e-3)": optax.sgd(1e-3),
        "hd_sgd(1e-3)": bilevel.hd_sgd(1e-3),
        "adam(1e-3)": optax.adam(1e-3),
        "hd_adam(1e-3)": bilevel.hd_adam(1e-3),
        "adam(1e-2)": optax.adam(1e-2),
        "hd_adam(1e-2)": bilevel.hd_adam(1e-2),
        "hd_adam(1e-3, lagged)": bilevel.hd_adam(1e-3, lagged=True),
    }
    data = {pixels: _digits(pixels) for pixels in (False, True)}
    out = {pixels: {} for pixels in data}
    for name, tx in runs.items():
        run = _trainer(tx, _xent, 300)
        for pixels, (x, y) in data.items():
            out[pixels][name] = float(run(x, y)[0])
    return out


@pytest.mark.parametrize("pixels", [False, True], ids=["standardized", "pixels_over_16"])
def test_defaults_rescue_bad_rates_on_digits(digits_runs, pixels):
    """Softmax regression on all 1797 digits, zero init, 300 full-batch steps.

    Standardized features: adam(1e-4) 1.64, sgd(1e-3) 1.82; pixels / 16: 2.08 and 2.24. The
    defaults reach < 0.5 and < 1.0 from the same rates.
    """
    r = digits_runs[pixels]
    assert r["adam(1e-4)"] > 1.5 and r["sgd(1e-3)"] > 1.7  # the fixed rates stay stuck
    assert r["hd_adam(1e-4)"] < 0.5
    assert r["hd_sgd(1e-3)"] < 1.0


@pytest.mark.parametrize("pixels", [False, True], ids=["standardized", "pixels_over_16"])
def test_defaults_do_not_hurt_a_good_rate(digits_runs, pixels):
    r = digits_runs[pixels]
    for lr in ("1e-3", "1e-2"):
        assert r[f"hd_adam({lr})"] <= 1.05 * r[f"adam({lr})"] + 0.01
    assert r["hd_adam(1e-3, lagged)"] <= 1.05 * r["adam(1e-3)"] + 0.01


def test_sgd_default_needs_a_bound_where_curvature_rises():
    """A documented limit: Rosenbrock from (0, 0) with SGD directions (not normalized).

    Along the valley the directions agree and the rule grows the rate past the stability
    limit (2 (1 + mu) / 1000 near the minimum) before the curvature rises; the iterate blows
    up, its gradient overflows and every later step is skipped: plain SGD, and heavy ball
    without the safeguards (with them, the overshoot cut brings heavy ball back in time). An
    upper bound on the rate (``lr_bounds``) prevents it; Adam's normalized direction does not
    need one.
    """

    def run(tx):
        objective = lambda p: (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2

        def step(carry, _):
            p, s = carry
            updates, s = tx.update(jax.grad(objective)(p), s, p)
            return (optax.apply_updates(p, updates), s), None

        (p, s), _ = jax.jit(lambda c: jax.lax.scan(step, c, length=10_000))(
            (jnp.zeros(2), tx.init(jnp.zeros(2)))
        )
        return float(objective(p)), int(s.skipped)

    assert run(bilevel.hd_sgd(1e-3))[1] > 0  # diverged, then stuck
    assert run(bilevel.hd_sgd(1e-3, momentum=0.9, safeguards=False))[1] > 0
    # heavy ball: the overshoot safeguard catches it in time
    loss, skipped = run(bilevel.hd_sgd(1e-3, momentum=0.9))
    assert loss < 1e-6 and skipped == 0
    loss, skipped = run(bilevel.hd_sgd(1e-3, momentum=0.9, lr_bounds=(None, 2e-3)))
    assert loss < 1e-6 and skipped == 0
    loss, skipped = run(bilevel.hd_adam(1e-2))
    assert loss < 1e-6 and skipped == 0


# ----------------------------------------------------------------------------- safeguards


@pytest.mark.parametrize("factory", [bilevel.hd_adam, bilevel.hd_sgd])
def test_a_rate_too_small_to_move_the_parameters_still_grows(factory):
    """Parameters at 1e4 in float32 (spacing 1e-3), a constant gradient, steps of 1e-6: nothing
    moves, g_t repeats and the cosine is 1. The rate must grow until the steps count (a rule
    that ignored steps below float resolution would freeze it here for ever)."""
    params = jnp.full(3, 1e4, jnp.float32)
    grads = jnp.ones(3, jnp.float32)
    state, p = (tx := factory(1e-6)).init(params), params
    for _ in range(30):
        updates, state = tx.update(grads, state, p)
        p = optax.apply_updates(p, updates)
    assert float(optax.tree_utils.tree_get(state, "learning_rate")) > 10 * 1e-6


def test_overshoot_cuts_the_rate_by_up_to_half():
    """On w^2 / 2 a rate of 3 (SGD) reverses every step: cos = -1, factor 1/2 (0.9 without).

    (Adam's smoothed direction is covered by the NumPy transcription in test_hd.py.)
    """
    loss = lambda w: 0.5 * jnp.sum(w**2)
    factory, lr0 = bilevel.hd_sgd, 3.0

    def rates(tx):
        w, state, out = jnp.array([1.0, -2.0]), tx.init(jnp.array([1.0, -2.0])), []
        for _ in range(3):
            updates, state = tx.update(jax.grad(loss)(w), state, w)
            w = optax.apply_updates(w, updates)
            out.append(float(optax.tree_utils.tree_get(state, "learning_rate")))
        return np.array(out)

    guarded, paper = rates(factory(lr0)), rates(factory(lr0, safeguards=False))
    np.testing.assert_allclose(paper[1:] / paper[:-1], 0.9, rtol=1e-5)
    np.testing.assert_allclose(guarded[1:] / guarded[:-1], 0.5, rtol=1e-5)
