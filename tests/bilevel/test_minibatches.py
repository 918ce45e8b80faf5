"""bilevel.minibatches and bilevel.epoch_minibatches: the rows a training loop draws."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bilevel
from bilevel import hparams, stn
from bilevel.stn._trainer import _INNER_DATA


def _rows(n, batch_size, num, calls, key=1):
    data = jnp.arange(n)
    draw = jax.jit(
        jax.vmap(lambda s: bilevel.epoch_minibatches(data, jax.random.key(key), s, batch_size, num))
    )
    out = np.asarray(draw(jnp.arange(calls)))
    assert out.shape == (calls, num, batch_size)
    return out.ravel()


@pytest.mark.parametrize(
    ("n", "batch_size", "num"),
    [(1, 1, 1), (2, 1, 3), (7, 3, 2), (8, 8, 1), (100, 7, 5), (1797, 128, 5), (5, 5, 3)],
)
def test_epoch_minibatches_takes_every_row_once_per_epoch(n, batch_size, num):
    calls = 3 * n // (batch_size * num) + 3
    rows = _rows(n, batch_size, num, calls)
    epochs = len(rows) // n
    assert epochs >= 3
    for e in range(epochs):
        assert sorted(rows[e * n : (e + 1) * n].tolist()) == list(range(n))
    # consecutive epochs are different orders (for n > 2 a repeat is a bug, not luck)
    if n > 5:
        assert not np.array_equal(rows[:n], rows[n : 2 * n])


def test_epoch_minibatches_is_a_pure_function_of_key_and_step():
    data = {"x": jnp.arange(50.0), "y": jnp.arange(50) * 2}
    a = bilevel.epoch_minibatches(data, jax.random.key(3), 7, 4, 2)
    b = bilevel.epoch_minibatches(data, jax.random.key(3), jnp.int32(7), 4, 2)
    c = bilevel.epoch_minibatches(data, jax.random.key(4), 7, 4, 2)
    np.testing.assert_array_equal(a["x"], b["x"])
    np.testing.assert_array_equal(a["y"], 2 * a["x"].astype(int))  # rows stay aligned
    assert not np.array_equal(a["x"], c["x"])
    assert a["x"].shape == (2, 4)


def test_epoch_minibatches_orders_look_uniform():
    # the first row of an epoch over 10 rows, 4000 epochs: each row about 400 times
    rows = _rows(10, 10, 1, 4000, key=0).reshape(4000, 10)
    counts = np.bincount(rows[:, 0], minlength=10)
    chi2 = float(np.sum((counts - 400.0) ** 2 / 400.0))
    assert chi2 < 30.0, counts  # 9 degrees of freedom: p ~ 4e-4
    # position pairs are not correlated across epochs
    rows = _rows(1000, 1000, 1, 2000, key=0).reshape(2000, 1000)
    assert abs(np.corrcoef(rows[:, 0], rows[:, 1])[0, 1]) < 0.1


def test_epoch_minibatches_bad_input_is_a_clear_error():
    data = jnp.arange(10.0)
    with pytest.raises(ValueError, match="exceeds"):
        bilevel.epoch_minibatches(data, jax.random.key(0), 0, 11, 1)
    with pytest.raises(ValueError, match="same leading axis"):
        bilevel.epoch_minibatches((data, jnp.arange(3.0)), jax.random.key(0), 0, 2, 1)
    with pytest.raises(ValueError, match="2\\*\\*31"):
        bilevel.epoch_minibatches(jnp.zeros((70_000, 1)), jax.random.key(0), 0, 40_000, 1)


def _trainer(sampler):
    def inner_loss(m, h, batch, key):
        del key
        x, y = batch
        return jnp.mean((m(x, h.hnet) - y) ** 2) + jnp.mean(h["wd"]) * jnp.sum(m.kernel[...] ** 2)

    def outer_loss(m, h, batch):
        x, y = batch
        return jnp.mean((m(x, h.hnet) - y) ** 2)

    model = stn.StnLinear(4, 1, num_hparams=1, rngs=nnx.Rngs(0))
    return stn.Trainer(
        model,
        inner_loss,
        outer_loss,
        space={"wd": hparams.log(1e-2)},
        inner_optimizer=optax.sgd(1e-2),
        outer_optimizer=optax.sgd(1e-2),
        inner_steps=2,
        sampler=sampler,
    )


def test_stn_trainer_draws_its_batches_with_the_sampler():
    x = jnp.arange(40.0).reshape(10, 4)
    y = jnp.arange(10.0)[:, None]
    trainer = _trainer(bilevel.epoch_minibatches)
    state = trainer.init(key=jax.random.key(0))
    inner, outer = trainer.sample_batches(state, (x, y), (x, y), 5)
    data_key = jax.random.fold_in(state.key, _INNER_DATA)
    expect = bilevel.epoch_minibatches((x, y), data_key, state.step, 5, 2)
    # the inner batches are the sampler's (under the trainer's data key), a full epoch of rows
    np.testing.assert_array_equal(inner[0], expect[0])
    np.testing.assert_array_equal(inner[1], expect[1])
    assert sorted(np.asarray(inner[1]).ravel().tolist()) == list(range(10))
    assert outer[0].shape == (1, 5, 4)
    state, _ = trainer.fit(state, (x, y), (x, y), steps=3, batch_size=5, progress=False)
    assert int(state.step) == 3
    with pytest.raises(TypeError, match="sampler"):
        _trainer("epoch")
