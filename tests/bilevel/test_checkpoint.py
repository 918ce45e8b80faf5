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


def _state(x=1.0):
    return {"w": jnp.full((2,), x), "key": jax.random.key(0)}


def _w(directory, step):
    restored, _ = restore_checkpoint(directory, _state(), step=step)
    return float(restored["w"][0])


def test_saving_an_older_step_is_refused_and_keeps_the_newer_checkpoints(tmp_path):
    d = tmp_path / "run"
    for s in (10, 11, 12):
        save_checkpoint(d, _state(s), s)
    for s in (3, 12):  # older and equal steps
        with pytest.raises(
            ValueError, match=rf"(?s)step {s}.*latest checkpoint 12.*run.*overwrite=True"
        ):
            save_checkpoint(d, _state(-1), s)
    assert latest_step(d) == 12
    assert [_w(d, s) for s in (10, 11, 12)] == [10.0, 11.0, 12.0]
    d1 = tmp_path / "keep1"
    save_checkpoint(d1, _state(10), 10, keep=1)
    with pytest.raises(ValueError, match="overwrite=True"):
        save_checkpoint(d1, _state(3), 3, keep=1)
    assert latest_step(d1) == 10 and _w(d1, 10) == 10.0


def test_overwrite_replaces_the_newer_steps_on_purpose(tmp_path):
    d = tmp_path / "run"
    for s in (10, 11, 12):
        save_checkpoint(d, _state(s), s, keep=None)
    save_checkpoint(d, _state(-11), 11, overwrite=True)
    assert latest_step(d) == 11 and _w(d, 11) == -11.0 and _w(d, 10) == 10.0
    save_checkpoint(d, _state(-3), 3, overwrite=True)
    assert latest_step(d) == 3 and _w(d, 3) == -3.0
    assert sorted(p.name for p in d.iterdir()) == ["3"]


def test_retention_only_deletes_older_steps(tmp_path):
    d = tmp_path / "run"
    save_checkpoint(d, _state(0), 0, keep=2)
    (d / "99").mkdir()  # a foreign folder with a step-like name is neither a step nor deleted
    for s in range(1, 5):
        save_checkpoint(d, _state(s), s, keep=2)
    assert sorted(int(p.name) for p in d.iterdir()) == [3, 4, 99]
    assert latest_step(d) == 4 and _w(d, 3) == 3.0
    save_checkpoint(d, _state(-3), 3, keep=1, overwrite=True)  # keeps the step it saves
    assert sorted(int(p.name) for p in d.iterdir()) == [3, 99] and _w(d, 3) == -3.0
    with pytest.raises(ValueError, match="keep"):
        save_checkpoint(d, _state(), 9, keep=0)


def test_restore_refuses_a_lossy_dtype_change(tmp_path):
    d = tmp_path / "run"
    save_checkpoint(
        d,
        {
            "f": jnp.full((2,), 2.7),
            "c": jnp.ones(2, jnp.complex64),
            "i": np.array([70000], np.int32),
            "small": np.array([5], np.int32),
            "big": np.array([1e30], np.float32),  # overflows float16
        },
        0,
    )
    like = {
        "f": jnp.zeros(2),
        "c": jnp.ones(2, jnp.complex64),
        "i": np.zeros(1, np.int32),
        "small": np.zeros(1, np.int32),
        "big": np.zeros(1, np.float32),
    }
    for leaf, want in (("f", "int32"), ("c", "float32"), ("i", "int16"), ("big", "float16")):
        bad = dict(like, **{leaf: np.zeros(like[leaf].shape, want)})
        with pytest.raises(ValueError, match=rf"(?s)'{leaf}'.*saved as \w+.*as {want}"):
            restore_checkpoint(d, bad)
    # lossless changes still work: int32 that fits in int16, int -> float
    ok, _ = restore_checkpoint(d, dict(like, small=np.zeros(1, np.int16), i=jnp.zeros(1)))
    assert ok["small"].dtype == jnp.int16 and int(ok["small"][0]) == 5
    assert float(ok["i"][0]) == 70000.0
    np.testing.assert_array_equal(ok["f"], np.full((2,), 2.7, np.float32))


def test_restore_missing_step_names_the_available_steps(tmp_path):
    d = tmp_path / "run"
    save_checkpoint(d, _state(), 2)
    save_checkpoint(d, _state(), 5)
    with pytest.raises(FileNotFoundError, match=r"(?s)step 4.*run.*\[2, 5\]"):
        restore_checkpoint(d, _state(), step=4)


def test_restore_with_other_key_names_lists_missing_and_unexpected(tmp_path):
    d = tmp_path / "run"
    save_checkpoint(d, {"params": {"w": jnp.ones(2)}, "lr": jnp.ones(())}, 0)
    with pytest.raises(ValueError, match=r"(?s)missing.*params/v.*not in `like`.*params/w"):
        restore_checkpoint(d, {"params": {"v": jnp.ones(2)}, "lr": jnp.ones(())})


@pytest.mark.parametrize("name", ["_CHECKPOINT_METADATA", "default/_METADATA"])
def test_corrupted_metadata_is_a_clear_error(tmp_path, name):
    d = tmp_path / "run"
    save_checkpoint(d, _state(), 7)
    (d / "7" / name).write_text("{not json")
    with pytest.raises(ValueError, match=r"(?s)step 7.*run.*corrupted"):
        restore_checkpoint(d, _state())


def test_restore_refuses_another_prng_key_kind(tmp_path):
    d = tmp_path / "run"
    save_checkpoint(d, {"key": jax.random.key(0)}, 0)
    with pytest.raises(ValueError, match=r"(?s)'key'.*threefry2x32.*rbg"):
        restore_checkpoint(d, {"key": jax.random.key(0, impl="rbg")})
    with pytest.raises(ValueError, match=r"(?s)'key'.*typed.*threefry2x32"):
        restore_checkpoint(d, {"key": jax.random.PRNGKey(0)})
    d2 = tmp_path / "legacy"
    save_checkpoint(d2, {"key": jax.random.PRNGKey(0)}, 0)
    with pytest.raises(ValueError, match=r"(?s)'key'.*plain array.*typed"):
        restore_checkpoint(d2, {"key": jax.random.key(0)})


def test_reading_a_mistyped_path_never_creates_it(tmp_path):
    typo = tmp_path / "no_such_run"
    with pytest.raises(FileNotFoundError, match="no_such_run"):
        restore_checkpoint(typo, _state())
    assert latest_step(typo) is None
    assert not typo.exists()


def test_numpy_and_jax_integer_steps(tmp_path):
    d = tmp_path / "run"
    save_checkpoint(d, _state(), jnp.int32(4))
    save_checkpoint(d, _state(), np.int64(5), keep=np.int64(2))
    assert latest_step(d) == 5
    _, step = restore_checkpoint(d, _state(), step=jnp.int32(4))
    assert step == 4 and type(step) is int
    with pytest.raises(TypeError, match="step"):
        save_checkpoint(d, _state(), 6.0)


def test_latest_step_ignores_foreign_and_incomplete_folders(tmp_path):
    d = tmp_path / "run"
    save_checkpoint(d, _state(), 3)
    (d / "99").mkdir()  # not a checkpoint (e.g. an interrupted copy)
    (d / "50").write_text("x")
    (d / "notes.txt").write_text("x")
    assert latest_step(d) == 3
    _, step = restore_checkpoint(d, _state())
    assert step == 3
    save_checkpoint(d, _state(), 4)  # foreign entries are neither counted nor deleted
    assert latest_step(d) == 4 and (d / "99").is_dir() and (d / "notes.txt").exists()
