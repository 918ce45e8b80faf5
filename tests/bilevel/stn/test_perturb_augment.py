import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bilevel import stn


def test_perturb_statistics_and_shared_mask():
    u = jnp.array([0.0, 1.0, -2.0])
    scale = jnp.array([0.5, 2.0, 1.0])
    ut = stn.perturb(jax.random.key(0), u, scale, 20000)
    assert ut.shape == (20000, 3)
    np.testing.assert_allclose(ut.mean(0), u, atol=0.05)
    np.testing.assert_allclose(ut.std(0), scale, rtol=0.03)
    shared = stn.perturb(jax.random.key(1), u, scale, 64, shared=jnp.array([False, True, False]))
    assert jnp.all(shared[:, 1] == shared[0, 1]) and shared[0, 1] != u[1]
    assert jnp.std(shared[:, 0]) > 0.1
    np.testing.assert_array_equal(stn.perturb(jax.random.key(2), u, 0.0, 4), jnp.tile(u, (4, 1)))
    with pytest.raises(ValueError):
        stn.perturb(jax.random.key(0), jnp.zeros((2, 2)), 1.0, 4)
    with pytest.raises(ValueError):
        stn.perturb(jax.random.key(0), u, 1.0, 0)


def test_scale_parametrization_round_trip():
    s = jnp.array([1e-3, 0.5, 3.0])
    np.testing.assert_allclose(stn.scale_from_param(stn.scale_to_param(s)), s, rtol=1e-5)


def test_entropy_matches_monte_carlo_and_gradient():
    sigma = jnp.array([0.3, 1.5, 0.05])
    eps = jax.random.normal(jax.random.key(0), (200000, 3))
    z = sigma * eps
    log_p = jnp.sum(-0.5 * (z / sigma) ** 2 - jnp.log(sigma) - 0.5 * math.log(2 * math.pi), -1)
    # Monte Carlo standard error: sqrt(1.5 / 200000) ~ 0.003.
    np.testing.assert_allclose(stn.entropy(sigma), -jnp.mean(log_p), atol=0.012)
    np.testing.assert_allclose(jax.grad(stn.entropy)(sigma), 1.0 / sigma, rtol=1e-6)


def test_dropout_per_example_rates():
    x = jnp.ones((3, 20000))
    rate = jnp.array([0.0, 0.3, 0.8])
    y = stn.dropout(x, rate, jax.random.key(0))
    kept = y != 0
    np.testing.assert_allclose(kept.mean(1), 1 - rate, atol=0.015)
    # Kept units are scaled by 1/(1 - rate): the expectation is preserved.
    for i in range(3):
        np.testing.assert_allclose(y[i][kept[i]], 1.0 / (1.0 - rate[i]), rtol=1e-6)
    np.testing.assert_allclose(y.mean(1), 1.0, atol=0.05)
    assert jnp.all(stn.dropout(x[:2], 1.0, jax.random.key(1)) == 0)
    # Masks come from stop_gradient(rate).
    g = jax.grad(lambda r: jnp.sum(stn.dropout(x[:, :10], r, jax.random.key(2))))(rate)
    np.testing.assert_array_equal(g, 0.0)
    with pytest.raises(ValueError, match="batch"):
        stn.dropout(x, jnp.ones(2) * 0.1, jax.random.key(0))


def test_gaussian_noise_per_example_std():
    x = jnp.zeros((2, 50000))
    y = stn.gaussian_noise(x, jnp.array([0.1, 2.0]), jax.random.key(0))
    np.testing.assert_allclose(y.std(1), [0.1, 2.0], rtol=0.02)


def _images(n=64, h=10, w=10, c=2):
    return jax.random.uniform(jax.random.key(9), (n, h, w, c)) + 1.0  # strictly positive


def test_translate_is_a_bounded_integer_shift_with_zero_fill():
    x = _images()
    np.testing.assert_array_equal(stn.translate(x, 0.99, jax.random.key(0)), x)
    y = np.asarray(stn.translate(x, jnp.full(x.shape[0], 2.7), jax.random.key(1)))  # 2 pixels
    x = np.asarray(x)
    shifts = set()
    for i in range(x.shape[0]):
        found = None
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                ref = np.zeros_like(x[i])
                src = x[i]
                ys, yd = (
                    (slice(0, 10 - dy), slice(dy, 10))
                    if dy >= 0
                    else (slice(-dy, 10), slice(0, 10 + dy))
                )
                xs, xd = (
                    (slice(0, 10 - dx), slice(dx, 10))
                    if dx >= 0
                    else (slice(-dx, 10), slice(0, 10 + dx))
                )
                ref[yd, xd] = src[ys, xs]
                if np.array_equal(ref, y[i]):
                    found = (dy, dx)
        assert found is not None, f"example {i} is not a shift by at most 2 pixels"
        shifts.add(found)
    assert len(shifts) > 5  # shifts are random, both axes
    with pytest.raises(ValueError, match="images"):
        stn.translate(jnp.ones((4, 10)), 1.0, jax.random.key(0))


def test_cutout_floors_the_length():
    x = _images(n=200, h=16, w=16, c=1)
    cutout = jax.jit(stn.cutout)
    y = cutout(x, 3.7, jax.random.key(0))  # a 3x3 hole, clipped at the borders
    holes = np.asarray((y == 0).sum(axis=(1, 2, 3)))
    assert holes.max() == 9 and holes.min() >= 1 and np.mean(holes == 9) > 0.6
    np.testing.assert_array_equal(cutout(x, 0.99, jax.random.key(1)), x)
    per = cutout(x[:2], jnp.array([0.0, 4.2]), jax.random.key(2))
    np.testing.assert_array_equal(per[0], x[0])
    assert int((per[1] == 0).sum()) <= 16
    # Zeroed pixels form one square: rows and columns of the hole are contiguous.
    hole = np.asarray(y[0, :, :, 0] == 0)
    r, c = np.nonzero(hole)
    assert hole[r.min() : r.max() + 1, c.min() : c.max() + 1].all()


def test_brightness_and_contrast_ranges():
    x = _images(n=500, h=4, w=4, c=1)
    m = 0.2
    y = stn.brightness(x, m, jax.random.key(0))
    delta = np.asarray(y - x).reshape(500, -1)
    np.testing.assert_allclose(delta, delta[:, :1] * np.ones_like(delta), atol=1e-6)
    assert np.abs(delta).max() <= m + 1e-6 and np.abs(delta).max() > 0.8 * m
    z = stn.contrast(x, jnp.full(500, 0.5), jax.random.key(1))
    np.testing.assert_allclose(z.mean(axis=(1, 2, 3)), x.mean(axis=(1, 2, 3)), rtol=1e-5)
    cx = np.asarray(x - x.mean(axis=(1, 2, 3), keepdims=True)).reshape(500, -1)
    cz = np.asarray(z - z.mean(axis=(1, 2, 3), keepdims=True)).reshape(500, -1)
    factor = (cz * cx).sum(1) / (cx * cx).sum(1)
    assert factor.min() >= 0.5 - 1e-4 and factor.max() <= 1.5 + 1e-4
    assert factor.max() - factor.min() > 0.8
    np.testing.assert_array_equal(stn.brightness(x, 0.0, jax.random.key(0)), x)


def test_augmentations_jit_and_vmap_over_magnitudes():
    x = _images(n=8, h=6, w=6, c=1)
    f = jax.jit(lambda mags, key: stn.cutout(stn.translate(x, mags, key), mags, key))
    assert f(jnp.full(8, 2.0), jax.random.key(0)).shape == x.shape
    batched = jax.vmap(lambda m: stn.gaussian_noise(x, m, jax.random.key(0)))(jnp.array([0.0, 1.0]))
    np.testing.assert_array_equal(batched[0], x)


@pytest.mark.parametrize(
    ("fn", "magnitude", "shape"),
    [
        (stn.dropout, 0.5, (2, 3)),
        (stn.gaussian_noise, 0.1, (2, 3)),
        (stn.translate, 1.0, (2, 4, 4, 1)),
        (stn.cutout, 2.0, (2, 4, 4, 1)),
        (stn.brightness, 0.1, (2, 4, 4, 1)),
        (stn.contrast, 0.1, (2, 4, 4, 1)),
    ],
)
def test_swapped_key_argument_is_a_clear_type_error(fn, magnitude, shape):
    key, x = jax.random.key(0), jnp.ones(shape)
    name = fn.__name__
    # jax.random's order (key first): a TypeError naming the right order, not an IndexError.
    with pytest.raises(TypeError, match=rf"{name} takes \(x, \w+, key\) with the PRNG key last"):
        fn(key, x, magnitude)
    with pytest.raises(TypeError, match="PRNG key last"):
        fn(x, key, magnitude)
    assert fn(x, magnitude, key).shape == shape
    assert fn(x, magnitude, jax.random.PRNGKey(0)).shape == shape  # legacy keys still work
