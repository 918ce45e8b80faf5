"""Low-rank response kernels of ``stn.StnLinear`` (``response_rank=r``): ``W_r = P Q``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bilevel import hparams, stn


def _pair(rank=3, use_bias=True):
    low = stn.StnLinear(
        6, 5, 2, response_rank=rank, use_bias=use_bias,
        hnet_init=nnx.initializers.normal(1.0), rngs=nnx.Rngs(0),
    )  # fmt: skip
    full = stn.StnLinear(
        6, 5, 2, use_bias=use_bias, hnet_init=nnx.initializers.normal(1.0), rngs=nnx.Rngs(1)
    )
    full.kernel[...] = low.kernel[...]
    full.response_kernel[...] = low.response_left[...] @ low.response_right[...]
    full.hnet_kernel[...] = low.hnet_kernel[...]
    if use_bias:
        full.bias[...] = jnp.arange(5.0) / 10
        low.bias[...] = jnp.arange(5.0) / 10
        full.response_bias[...] = low.response_bias[...] = jnp.ones(5)
    return low, full


@pytest.mark.parametrize("use_bias", [True, False])
def test_equals_the_full_layer_with_the_product_kernel(use_bias):
    low, full = _pair(use_bias=use_bias)
    x = jax.random.normal(jax.random.key(0), (7, 6))
    for hnet in (jax.random.normal(jax.random.key(1), (7, 2)), jnp.array([0.3, -0.2])):
        np.testing.assert_allclose(low(x, hnet), full(x, hnet), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(low.effective_l2(hnet), full.effective_l2(hnet), rtol=1e-5)
        np.testing.assert_allclose(
            low.effective_kernel(hnet), full.effective_kernel(hnet), rtol=1e-5, atol=1e-6
        )


def test_fewer_response_parameters_and_a_clear_error():
    low, full = _pair(rank=2)
    count = lambda m: sum(a.size for a in jax.tree.leaves(nnx.state(m, stn.ResponseParam)))
    assert count(low) == 6 * 2 + 2 * 5 + 2 * 10 + 5 < count(full) == 6 * 5 + 2 * 10 + 5
    with pytest.raises(ValueError, match="response_rank"):
        stn.StnLinear(6, 5, 2, response_rank=0, rngs=nnx.Rngs(0))


def test_a_trainer_tunes_weight_decay_with_low_rank_layers():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = stn.StnLinear(4, 16, 1, response_rank=2, rngs=rngs)
            self.b = stn.StnLinear(16, 1, 1, response_rank=1, rngs=rngs)

        def __call__(self, x, hnet):
            return self.b(jax.nn.relu(self.a(x, hnet)), hnet)[:, 0]

    X = jax.random.normal(jax.random.key(0), (64, 4))
    y = X @ jnp.arange(1.0, 5.0)
    loss = lambda m, h, b: jnp.mean((m(b[0], h.hnet) - b[1]) ** 2)
    trainer = stn.Trainer(
        Net(nnx.Rngs(0)),
        lambda m, h, b, key: loss(m, h, b) + jnp.mean(h["wd"]) * stn.effective_l2(m, h.hnet).mean(),
        loss, space={"wd": hparams.log(1e-2)}, inner_optimizer=optax.adam(1e-2),
        outer_optimizer=optax.adam(1e-2),
    )  # fmt: skip
    state, history = trainer.fit(trainer.init(), (X, y), (X, y), steps=40, batch_size=16,
                                 progress=False)  # fmt: skip
    assert history["outer_loss"][-1] < 0.5 * history["outer_loss"][0]
    assert np.all(np.isfinite(history["hparams/wd"])) and int(state.skipped) == 0
