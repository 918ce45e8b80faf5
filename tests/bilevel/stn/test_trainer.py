import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bilevel import hparams, stn
from bilevel._checkpoint import restore_checkpoint, save_checkpoint
from experiments.stn_ridge import make_data

# ----------------------------------------------------------------------------- ridge known answer


def _ridge_data(n_train=50, n_val=200, dim=15, noise=4.0, data_seed=5):
    # The instance the issue specifies (and experiments.stn_ridge draws).
    return make_data(n_train, n_val, dim, noise, data_seed)


def _ridge_w(x, y, lam):
    n, d = x.shape
    return np.linalg.solve(x.T @ x / n + lam * np.eye(d), x.T @ y / n)


def _ridge_val(data, lam):
    x_train, y_train, x_val, y_val = data
    return np.mean((x_val @ _ridge_w(x_train, y_train, lam) - y_val) ** 2)


def _ridge_losses():
    def train_loss(m, h, batch, key):
        x, y = batch
        err = jnp.mean((h.apply(m, x)[:, 0] - y) ** 2)
        return err + jnp.mean(h["wd"] * stn.effective_l2(m, h.hnet))

    def val_loss(m, h, batch):
        x, y = batch
        return jnp.mean((m(x, h.hnet)[:, 0] - y) ** 2)

    return train_loss, val_loss


@pytest.mark.parametrize("variant", ["stn", "delta"])
def test_ridge_known_answer(variant):
    data = _ridge_data()
    x_train, y_train, x_val, y_val = data
    grid = np.logspace(-6, 4, 1001)
    losses = np.array([_ridge_val(data, g) for g in grid])
    i = int(np.argmin(losses))
    assert 100 < i < 900, "the target optimum must be interior"
    lam_opt = grid[i]
    assert 0.1 < lam_opt < 0.5
    with jax.enable_x64(True):
        model = stn.StnLinear(15, 1, 1, use_bias=False, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
        model.kernel[...] = jnp.zeros_like(model.kernel[...])
        trainer = stn.Trainer(
            model,
            {"wd": hparams.log(0.01)},
            *_ridge_losses(),
            optimizer=optax.adam(0.01),
            hyper_optimizer=optax.adam(0.03),
            init_scale=0.5,
            entropy_weight=0.1,
            variant=variant,
        )
        state = trainer.init(jax.random.key(0))
        train, val = (jnp.asarray(x_train), jnp.asarray(y_train)), (x_val, y_val)
        state, history = trainer.fit(
            state,
            train,
            val,
            cycles=1200,
            batch_size=50,
            val_batch_size=200,
            warmup_cycles=100,
            chunk=1300,
        )
        lam = float(trainer.hparams(state)["wd"])
        m = trainer.model(state)
        hnet = trainer.hnet(state)
        jac = np.asarray(jax.jacobian(lambda z: m.effective_kernel(z)[:, 0])(hnet)[:, 0])
        w_net = np.asarray(m.effective_kernel(hnet)[:, 0])
    assert 1 / 1.5 < lam / lam_opt < 1.5, (lam, lam_opt)
    # Exact response Jacobian of the training loss MSE + lam ||w||^2 at the final lam.
    w_star = _ridge_w(x_train, y_train, lam)
    hess = 2 * (x_train.T @ x_train / 50 + lam * np.eye(15))
    exact = -2 * np.linalg.solve(hess, w_star)
    cosine = jac @ exact / (np.linalg.norm(jac) * np.linalg.norm(exact))
    assert cosine > 0.9, cosine
    # The schedule moved from 0.01 towards the optimum; the network is at w*(lam).
    assert history["hparams/wd"][0] < 0.05 and history["hparams/wd"].shape == (1200,)
    assert np.linalg.norm(w_net - w_star) < 0.05 * np.linalg.norm(w_star)
    assert int(state.train_skipped) == 0 and int(state.val_skipped) == 0


# ----------------------------------------------------------------------------- a small classifier


class Mlp(nnx.Module):
    def __init__(self, num_hparams=2, *, rngs):
        self.fc1 = stn.StnLinear(6, 8, num_hparams, rngs=rngs)
        self.fc2 = stn.StnLinear(8, 3, num_hparams, rngs=rngs)

    def __call__(self, x, hnet, rate=None, key=None):
        z = jax.nn.relu(self.fc1(x, hnet))
        if rate is not None:
            z = stn.dropout(z, rate, key)
        return self.fc2(z, hnet)


def _xent(logits, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def _clf_losses(counter=None):
    def train_loss(m, h, batch, key):
        if counter is not None:
            counter.append(1)
        x, y = batch
        x = stn.gaussian_noise(x, h["noise"], jax.random.fold_in(key, 0))
        logits = h.apply(m, x, rate=h["drop"], key=jax.random.fold_in(key, 1))
        return _xent(logits, y)

    def val_loss(m, h, batch):
        x, y = batch
        return _xent(m(x, h.hnet), y)

    return train_loss, val_loss


def _clf_data(n=96, seed=0):
    x = jax.random.normal(jax.random.key(seed), (n, 6))
    y = (x[:, 0] > 0).astype(jnp.int32) + (x[:, 1] > 1).astype(jnp.int32)
    return (x, y)


SPACE = {"drop": hparams.unit(0.1), "noise": hparams.log(0.05)}


def _trainer(counter=None, **kw):
    kw.setdefault("optimizer", optax.adam(1e-2))
    kw.setdefault("hyper_optimizer", optax.adam(3e-2))
    kw.setdefault("train_steps", 3)
    nh = kw.pop("num_hparams", 2)
    return stn.Trainer(Mlp(nh, rngs=nnx.Rngs(0)), SPACE, *_clf_losses(counter), **kw)


_COUNTER: list = []


@functools.cache
def _default():
    """One trainer with its jitted step and batch sampler, compiled once for the module."""
    trainer = _trainer(_COUNTER)
    sample = jax.jit(trainer.sample_batches, static_argnames=("batch_size", "val_batch_size"))
    return trainer, jax.jit(trainer.step), sample


@functools.cache
def _delta():
    trainer = _trainer(variant="delta", train_steps=1)
    return trainer, jax.jit(trainer.step), jax.jit(trainer.warmup)


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_construction_errors():
    train_loss, val_loss = _clf_losses()
    model = Mlp(rngs=nnx.Rngs(0))
    ok = {"optimizer": optax.sgd(0.1), "hyper_optimizer": optax.sgd(0.1)}
    with pytest.raises(ValueError, match="variant"):
        stn.Trainer(model, SPACE, train_loss, val_loss, variant="stm", **ok)
    with pytest.raises(ValueError, match="train_steps"):
        stn.Trainer(model, SPACE, train_loss, val_loss, train_steps=0, **ok)
    with pytest.raises(ValueError, match="val_steps"):
        stn.Trainer(model, SPACE, train_loss, val_loss, val_steps=1.5, **ok)
    with pytest.raises(ValueError, match=r"num_hparams=1; mismatched: fc1 \(num_hparams=2\)"):
        stn.Trainer(model, {"drop": hparams.unit(0.1)}, train_loss, val_loss, **ok)
    with pytest.raises(ValueError, match="num_hparams=4"):
        stn.Trainer(model, SPACE, train_loss, val_loss, encoding="mip", **ok)
    with pytest.raises(ValueError, match="encoding"):
        stn.Trainer(model, SPACE, train_loss, val_loss, encoding="sin", **ok)
    with pytest.raises(ValueError, match="linearize"):
        stn.Trainer(model, SPACE, train_loss, val_loss, linearize=True, **ok)
    with pytest.raises(ValueError, match="init_scale"):
        stn.Trainer(model, SPACE, train_loss, val_loss, init_scale=0.0, **ok)
    with pytest.raises(ValueError, match="entropy_weight"):
        stn.Trainer(model, SPACE, train_loss, val_loss, entropy_weight=-1.0, **ok)
    with pytest.raises(ValueError, match="shared"):
        stn.Trainer(model, SPACE, train_loss, val_loss, shared={"drop": True}, **ok)
    with pytest.raises(TypeError, match="optimizer"):
        stn.Trainer(
            model,
            SPACE,
            train_loss,
            val_loss,
            optimizer="adam",
            hyper_optimizer=ok["hyper_optimizer"],
        )
    with pytest.raises(TypeError, match=r"nnx\.Module"):
        stn.Trainer(lambda x: x, SPACE, train_loss, val_loss, **ok)
    with pytest.raises(TypeError, match="hyperparameter spec"):
        stn.Trainer(model, {"drop": 0.1, "noise": 0.1}, train_loss, val_loss, **ok)
    with pytest.raises(ValueError, match="ResponseParam"):
        stn.Trainer(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), SPACE, train_loss, val_loss, **ok)
    trainer = stn.Trainer(model, SPACE, train_loss, val_loss, train_steps=3, **ok)
    state = trainer.init()
    x, y = _clf_data()
    with pytest.raises(ValueError, match="expected 3"):
        trainer.step(state, (x[None], y[None]), (x[None], y[None]))


def test_no_retracing_and_stable_dtypes():
    trainer, step, sample = _default()
    data = _clf_data()
    state = trainer.init(jax.random.key(0))
    tb, vb = sample(state, data, data, batch_size=16)
    state1, _ = step(state, tb, vb)
    traces = len(_COUNTER)
    tb, vb = sample(state1, data, data, batch_size=16)
    state2, m2 = step(state1, tb, vb)
    assert len(_COUNTER) == traces > 0
    assert jax.tree.map(lambda a: a.dtype, state2) == jax.tree.map(lambda a: a.dtype, state)
    assert int(state2.step) == 2
    assert np.isfinite(m2["train_loss"]) and np.isfinite(m2["val_loss"])
    assert set(m2) >= {"train_loss", "val_loss", "entropy", "hparams", "scales", "train_skipped"}


def _run_cycles(trainer, state, data, cycles, step=None, sample=None):
    step = jax.jit(trainer.step) if step is None else step
    sample = trainer.sample_batches if sample is None else sample
    for _ in range(cycles):
        tb, vb = sample(state, data, data, batch_size=16)
        state, _ = step(state, tb, vb)
    return state


def test_checkpoint_resume_is_bit_identical(tmp_path):
    trainer, step, sample = _default()
    run = functools.partial(_run_cycles, step=step, sample=sample)
    data = _clf_data()
    state0 = trainer.init(jax.random.key(3))
    full = run(trainer, state0, data, 4)
    half = run(trainer, state0, data, 2)
    save_checkpoint(tmp_path / "ck", half, int(half.step))
    restored, step = restore_checkpoint(tmp_path / "ck", trainer.init(jax.random.key(99)))
    assert step == 2
    _leaves_equal(restored, half)
    resumed = run(trainer, restored, data, 2)
    _leaves_equal(resumed, full)
    # Another key gives another run: the state really carries the randomness.
    other = run(trainer, trainer.init(jax.random.key(4)), data, 4)
    assert not np.array_equal(other.params["fc1"]["kernel"][...], full.params["fc1"]["kernel"][...])


def test_non_finite_steps_are_skipped_and_counted():
    def train_loss(m, h, batch, key):
        x, y, bad = batch
        return _xent(m(x, h.hnet), y) + jnp.where(bad[0] > 0, jnp.nan, 0.0)

    def val_loss(m, h, batch):
        x, y, bad = batch
        return _xent(m(x, h.hnet), y) + jnp.where(bad[0] > 0, jnp.inf, 0.0)

    trainer = stn.Trainer(
        Mlp(rngs=nnx.Rngs(0)),
        SPACE,
        train_loss,
        val_loss,
        optimizer=optax.adam(1e-2),
        hyper_optimizer=optax.adam(1e-2),
        train_steps=2,
    )
    x, y = _clf_data(16)
    state = trainer.init()
    good = jnp.zeros((16,))
    tb = (jnp.stack([x, x]), jnp.stack([y, y]), jnp.stack([good, good + 1]))
    vb = (x[None], y[None], (good + 1)[None])
    new, metrics = jax.jit(trainer.step)(state, tb, vb)
    assert int(new.train_skipped) == 1 and int(new.val_skipped) == 1
    assert int(metrics["train_skipped"]) == 1 and int(metrics["val_skipped"]) == 1
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(new.params))
    _leaves_equal(new.hparams, state.hparams)  # the hyper step was skipped
    assert np.isfinite(metrics["train_loss"]) and np.isnan(metrics["val_loss"])
    # The good train step was applied.
    assert not np.array_equal(new.params["fc1"]["kernel"][...], state.params["fc1"]["kernel"][...])


def test_vmap_over_hyperparameter_initializations():
    trainer, step, sample = _default()
    data = _clf_data()
    values = [
        {"drop": jnp.asarray(0.1), "noise": jnp.asarray(0.05)},
        {"drop": jnp.asarray(0.4), "noise": jnp.asarray(0.2)},
    ]
    us = [hparams.unconstrain(SPACE, v) for v in values]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *us)
    key = jax.random.key(1)
    states = jax.vmap(trainer.init, in_axes=(None, 0))(key, stacked)
    tb, vb = sample(trainer.init(key, us[0]), data, data, batch_size=16)
    new, _ = jax.jit(jax.vmap(trainer.step, in_axes=(0, None, None)))(states, tb, vb)
    for i, u in enumerate(us):
        single, _ = step(trainer.init(key, u), tb, vb)
        for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(single.params), strict=True):
            np.testing.assert_allclose(a[i], b, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(new.hparams["drop"][i], single.hparams["drop"], rtol=1e-5)


def test_delta_trains_general_weights_at_unperturbed_hyperparameters():
    data = _clf_data()
    general = nnx.All(nnx.Param, nnx.Not(stn.ResponseParam))
    trainer, _, warmup = _delta()
    out = []
    for scale in (0.01, 2.0):
        state = trainer.init(jax.random.key(0))
        state = state._replace(
            scale=jax.tree.map(lambda r, s=scale: r * 0 + stn.scale_to_param(s), state.scale)
        )
        tb, _ = trainer.sample_batches(state, data, data, 32)
        state, _ = warmup(state, jax.tree.map(lambda a: a[:1], tb))
        out.append(nnx.split_state(state.params, general, stn.ResponseParam))
    _leaves_equal(out[0][0], out[1][0])  # general weights: independent of the perturbation
    resp0, resp1 = jax.tree.leaves(out[0][1]), jax.tree.leaves(out[1][1])
    assert any(not np.allclose(a, b) for a, b in zip(resp0, resp1, strict=True))
    # In the STN variant the general weights see the perturbation.
    trainer, step, sample = _default()
    stns = []
    for scale in (0.01, 2.0):
        state = trainer.init(jax.random.key(0))
        state = state._replace(
            scale=jax.tree.map(lambda r, s=scale: r * 0 + stn.scale_to_param(s), state.scale)
        )
        tb, vb = sample(state, data, data, batch_size=16)
        stns.append(step(state, tb, vb)[0].params["fc1"]["kernel"][...])
    assert not np.allclose(stns[0], stns[1])


def test_delta_hnet_is_centred_and_hypergradient_flows():
    trainer, step, _ = _delta()
    state = trainer.init()
    np.testing.assert_array_equal(trainer.hnet(state), jnp.zeros(2))
    data = _clf_data()
    state = _run_cycles(trainer, state, data, 3, step=step)
    assert not np.allclose(state.hparams["drop"], trainer.init().hparams["drop"])


def test_linearized_apply_is_first_order_taylor():
    f = lambda x, z: jnp.sin(x * z[..., :1]) + z[..., 1:] ** 2
    x, z = jnp.array([[0.5], [2.0]]), jnp.array([[0.3, -0.2], [0.1, 0.4]])
    h = stn.StnHparams({}, z, linearize=True)
    expected = f(x, jnp.zeros_like(z)) + x * z[:, :1]  # sin(0) = 0, d(z1^2) = 0 at 0
    np.testing.assert_allclose(h.apply(f, x), expected, rtol=1e-6)
    np.testing.assert_allclose(stn.StnHparams({}, z).apply(f, x), f(x, z), rtol=1e-6)
    # Delta-STN with linearization trains.
    trainer = _trainer(variant="delta", linearize=True)
    state = _run_cycles(trainer, trainer.init(), _clf_data(), 2)
    assert int(state.train_skipped) == 0
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(state.params))


def test_mip_encoding_and_shared_perturbation():
    seen = {}

    def record(drop, noise, hnet):
        seen["drop"], seen["noise"], seen["hnet"] = map(np.asarray, (drop, noise, hnet))

    def train_loss(m, h, batch, key):
        jax.debug.callback(record, h["drop"], h["noise"], h.hnet)
        x, y = batch
        return _xent(m(x, h.hnet), y)

    trainer = stn.Trainer(
        Mlp(4, rngs=nnx.Rngs(0)),
        SPACE,
        train_loss,
        _clf_losses()[1],
        optimizer=optax.sgd(0.1),
        hyper_optimizer=optax.sgd(0.1),
        train_steps=1,
        encoding="mip",
        shared={"drop": True, "noise": False},
    )
    assert trainer.num_features == 4
    state = trainer.init()
    hnet = trainer.hnet(state)
    np.testing.assert_allclose(hnet[:2] ** 2 + hnet[2:] ** 2, 1.0, rtol=1e-6)
    x, y = _clf_data(16)
    trainer.warmup(state, (x[None], y[None]))
    assert seen["drop"].shape == (16,) and seen["hnet"].shape == (16, 4)
    assert np.all(seen["drop"] == seen["drop"][0]) and seen["drop"][0] != 0.1
    assert np.std(seen["noise"]) > 0
    assert np.all((seen["drop"] > 0) & (seen["drop"] < 1)) and np.all(seen["noise"] > 0)
    np.testing.assert_allclose(seen["hnet"][:, :2] ** 2 + seen["hnet"][:, 2:] ** 2, 1.0, rtol=1e-5)


def test_fit_records_the_schedule():
    trainer, _, _ = _default()
    data = _clf_data()
    calls = []
    state, hist = trainer.fit(
        trainer.init(),
        data,
        data,
        cycles=6,
        batch_size=16,
        warmup_cycles=3,
        chunk=3,
        callback=calls.append,
    )
    assert calls == [3, 6, 9]
    assert int(state.step) == 9
    np.testing.assert_array_equal(hist["step"], np.arange(4, 10))
    for key in ("hparams/drop", "hparams/noise", "scales/drop", "val_loss", "train_loss"):
        assert hist[key].shape == (6,), key
    np.testing.assert_allclose(hist["hparams/drop"][-1], trainer.hparams(state)["drop"], rtol=1e-6)
    assert not np.allclose(hist["hparams/drop"][0], hist["hparams/drop"][-1])
