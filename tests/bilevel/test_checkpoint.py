import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bilevel._checkpoint import latest_step, restore_checkpoint, save_checkpoint


def test_round_trip_is_bit_identical_including_keys(tmp_path):
    state = {
        "params": {"w": jax.random.normal(jax.random.key(0), (4, 3))},
        "key": jax.random.key(1),
        "raw_key": jax.random.PRNGKey(2),
        "step": jnp.int32(5),
        "half": jnp.ones((2,), jnp.bfloat16),
    }
    assert latest_step(tmp_path / "ckpt") is None
    save_checkpoint(tmp_path / "ckpt", state, 3)
    save_checkpoint(tmp_path / "ckpt", jax.tree.map(lambda x: x, state), 8)
    assert latest_step(tmp_path / "ckpt") == 8
    restored, step = restore_checkpoint(tmp_path / "ckpt", state)
    assert step == 8
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _restored3, step3 = restore_checkpoint(tmp_path / "ckpt", state, step=3)
    assert step3 == 3


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        restore_checkpoint(tmp_path / "none", {"a": jnp.zeros(2)})
    save_checkpoint(tmp_path / "c", {"a": jnp.zeros(2)}, 0)
    with pytest.raises(ValueError):
        restore_checkpoint(tmp_path / "c", {"a": jnp.zeros(3)})
    with pytest.raises(ValueError):
        save_checkpoint(tmp_path / "c", {"a": jnp.zeros(2)}, -1)
