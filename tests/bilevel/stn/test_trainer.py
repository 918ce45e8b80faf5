import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import solvers
from bilevel import _fit as _fit_module
from bilevel import hparams, stn
from bilevel._checkpoint import latest_step, restore_checkpoint, save_checkpoint
from bilevel._fit import fit
from bilevel.stn import TrainerState
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
    def inner_loss(m, h, batch, key):
        x, y = batch
        err = jnp.mean((h.apply(m, x)[:, 0] - y) ** 2)
        return err + jnp.mean(h["wd"] * stn.effective_l2(m, h.hnet))

    def outer_loss(m, h, batch):
        x, y = batch
        return jnp.mean((m(x, h.hnet)[:, 0] - y) ** 2)

    return inner_loss, outer_loss


@pytest.mark.parametrize("method", [stn.STN(), stn.DeltaSTN()], ids=["stn", "delta"])
def test_ridge_known_answer(method):
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
            *_ridge_losses(),
            space={"wd": hparams.log(0.01)},
            inner_optimizer=optax.adam(0.01),
            outer_optimizer=optax.adam(0.03),
            init_scale=0.5,
            entropy_weight=0.1,
            method=method,
        )
        state = trainer.init(key=jax.random.key(0))
        train, val = (jnp.asarray(x_train), jnp.asarray(y_train)), (x_val, y_val)
        state, history = trainer.fit(
            state,
            train,
            val,
            steps=1200,
            batch_size=50,
            outer_batch_size=200,
            warmup_steps=100,
            chunk=1300,
            progress=False,
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
    assert int(state.inner_skipped) == 0 and int(state.skipped) == 0


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
    def inner_loss(m, h, batch, key):
        if counter is not None:
            counter.append(1)
        x, y = batch
        x = stn.gaussian_noise(x, h["noise"], jax.random.fold_in(key, 0))
        logits = h.apply(m, x, rate=h["drop"], key=jax.random.fold_in(key, 1))
        return _xent(logits, y)

    def outer_loss(m, h, batch):
        x, y = batch
        return _xent(m(x, h.hnet), y)

    return inner_loss, outer_loss


def _clf_data(n=96, seed=0):
    x = jax.random.normal(jax.random.key(seed), (n, 6))
    y = (x[:, 0] > 0).astype(jnp.int32) + (x[:, 1] > 1).astype(jnp.int32)
    return (x, y)


SPACE = {"drop": hparams.unit(0.1), "noise": hparams.log(0.05)}


def _trainer(counter=None, losses=None, **kw):
    kw.setdefault("inner_optimizer", optax.adam(1e-2))
    kw.setdefault("outer_optimizer", optax.adam(3e-2))
    kw.setdefault("inner_steps", 3)
    kw.setdefault("space", SPACE)
    nh = kw.pop("num_hparams", 2)
    losses = _clf_losses(counter) if losses is None else losses
    return stn.Trainer(Mlp(nh, rngs=nnx.Rngs(0)), *losses, **kw)


_COUNTER: list = []


@functools.cache
def _default():
    """One trainer with its jitted step and batch sampler, compiled once for the module."""
    trainer = _trainer(_COUNTER)
    sample = jax.jit(trainer.sample_batches, static_argnames=("batch_size", "outer_batch_size"))
    return trainer, jax.jit(trainer.step), sample


@functools.cache
def _delta():
    trainer = _trainer(method=stn.DeltaSTN(), inner_steps=1)
    return trainer, jax.jit(trainer.step), jax.jit(trainer.warmup)


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_construction_errors():
    inner_loss, outer_loss = _clf_losses()
    model = Mlp(rngs=nnx.Rngs(0))
    ok = {
        "space": SPACE,
        "inner_optimizer": optax.sgd(0.1),
        "outer_optimizer": optax.sgd(0.1),
    }
    make = lambda **kw: stn.Trainer(model, inner_loss, outer_loss, **{**ok, **kw})
    with pytest.raises(TypeError, match=r"stn\.STN\(\) or stn\.DeltaSTN\(\)"):
        make(method="delta")
    with pytest.raises(ValueError, match="inner_steps"):
        make(inner_steps=0)
    with pytest.raises(TypeError, match="outer_steps"):
        make(outer_steps=1.5)
    with pytest.raises(ValueError, match=r"num_hparams=1; mismatched: fc1 \(num_hparams=2\)"):
        make(space={"drop": hparams.unit(0.1)})
    with pytest.raises(ValueError, match="num_hparams=4"):
        make(encoding="mip")
    with pytest.raises(ValueError, match="encoding"):
        make(encoding="sin")
    with pytest.raises(TypeError, match="linearize"):
        stn.DeltaSTN(linearize="yes")
    with pytest.raises(TypeError):
        stn.DeltaSTN(True)  # keyword-only
    with pytest.raises(ValueError, match="init_scale"):
        make(init_scale=0.0)
    with pytest.raises(ValueError, match="entropy_weight"):
        make(entropy_weight=-1.0)
    with pytest.raises(ValueError, match="shared"):
        make(shared={"drop": True})
    with pytest.raises(TypeError, match="inner_optimizer"):
        make(inner_optimizer="adam")
    with pytest.raises(TypeError, match=r"nnx\.Module"):
        stn.Trainer(lambda x: x, inner_loss, outer_loss, **ok)
    with pytest.raises(TypeError, match="hyperparameter spec"):
        make(space={"drop": 0.1, "noise": 0.1})
    with pytest.raises(ValueError, match="ResponseParam"):
        stn.Trainer(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), inner_loss, outer_loss, **ok)
    trainer = make(inner_steps=3)
    state = trainer.init()
    x, y = _clf_data()
    with pytest.raises(ValueError, match="expected 3"):
        trainer.step(state, (x[None], y[None]), (x[None], y[None]))


def test_numpy_scalar_settings_are_valid():
    trainer = _trainer(
        inner_steps=np.int64(2),
        outer_steps=np.int32(1),
        init_scale=np.float32(0.5),
        entropy_weight=np.float64(1e-3),
        tune_scales=np.bool_(True),
    )
    assert (trainer.inner_steps, trainer.outer_steps) == (2, 1)
    assert type(trainer.inner_steps) is int and trainer.init_scale == 0.5
    data = _clf_data()
    tb, vb = trainer.sample_batches(trainer.init(), data, data, np.int64(16), np.int32(8))
    assert tb[0].shape == (2, 16, 6) and vb[0].shape == (1, 8, 6)


def test_no_retracing_stable_dtypes_and_shared_metric_names():
    trainer, step, sample = _default()
    data = _clf_data()
    state = trainer.init(key=jax.random.key(0))
    tb, vb = sample(state, data, data, batch_size=16)
    state1, _ = step(state, tb, vb)
    traces = len(_COUNTER)
    tb, vb = sample(state1, data, data, batch_size=16)
    state2, m2 = step(state1, tb, vb)
    assert len(_COUNTER) == traces > 0
    assert jax.tree.map(lambda a: a.dtype, state2) == jax.tree.map(lambda a: a.dtype, state)
    assert int(state2.step) == 2
    assert np.isfinite(m2["inner_loss"]) and np.isfinite(m2["outer_loss"])
    # BilevelOptimizer's names, plus the STN-specific ones.
    assert set(m2) == {
        "inner_loss",
        "outer_loss",
        "hparams",
        "hypergrad",
        "hypergrad_norm",
        "skipped",
        "inner_skipped",
        "status",
        "entropy",
        "scales",
    }
    assert m2["status"].dtype == jnp.int32 and int(m2["status"]) == solvers.Status.SUCCESS
    assert set(m2["hypergrad"]) == set(SPACE)
    norm = np.sqrt(sum(float(g) ** 2 for g in m2["hypergrad"].values()))
    np.testing.assert_allclose(m2["hypergrad_norm"], norm, rtol=1e-5)
    assert TrainerState._fields == (
        "params",
        "model_state",
        "inner_state",
        "hparams",
        "scale",
        "outer_state",
        "step",
        "skipped",
        "inner_skipped",
        "key",
    )


def test_init_keywords_and_legacy_keys():
    trainer, _, _ = _default()
    legacy = trainer.init(key=jax.random.PRNGKey(7))
    typed = trainer.init(key=jax.random.key(7))
    assert jax.dtypes.issubdtype(legacy.key.dtype, jax.dtypes.prng_key)
    _leaves_equal(legacy.key, typed.key)
    with pytest.raises(TypeError, match="PRNG key"):
        trainer.init(key=jnp.zeros(3))
    params = jax.tree.map(lambda a: a + 1.0, trainer.init().params)
    state = trainer.init(params, hparams=hparams.unconstrain(SPACE, {"drop": 0.3, "noise": 0.1}))
    np.testing.assert_allclose(trainer.hparams(state)["drop"], 0.3, rtol=1e-6)
    _leaves_equal(state.params, params)


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
    state0 = trainer.init(key=jax.random.key(3))
    full = run(trainer, state0, data, 4)
    half = run(trainer, state0, data, 2)
    save_checkpoint(tmp_path / "ck", half, int(half.step))
    restored, step = restore_checkpoint(tmp_path / "ck", trainer.init(key=jax.random.key(99)))
    assert step == 2
    _leaves_equal(restored, half)
    resumed = run(trainer, restored, data, 2)
    _leaves_equal(resumed, full)
    # Another key gives another run: the state really carries the randomness.
    other = run(trainer, trainer.init(key=jax.random.key(4)), data, 4)
    assert not np.array_equal(other.params["fc1"]["kernel"][...], full.params["fc1"]["kernel"][...])


@pytest.mark.filterwarnings("ignore:STN hyperparameter")
def test_non_finite_steps_are_skipped_and_counted():
    def inner_loss(m, h, batch, key):
        x, y, bad = batch
        return _xent(m(x, h.hnet), y) + jnp.where(bad[0] > 0, jnp.nan, 0.0)

    def outer_loss(m, h, batch):
        x, y, bad = batch
        return _xent(m(x, h.hnet), y) + jnp.where(bad[0] > 0, jnp.inf, 0.0)

    trainer = _trainer(losses=(inner_loss, outer_loss), inner_steps=2)
    x, y = _clf_data(16)
    state = trainer.init()
    good = jnp.zeros((16,))
    tb = (jnp.stack([x, x]), jnp.stack([y, y]), jnp.stack([good, good + 1]))
    vb = (x[None], y[None], (good + 1)[None])
    new, metrics = jax.jit(trainer.step)(state, tb, vb)
    assert int(new.inner_skipped) == 1 and int(new.skipped) == 1
    assert int(metrics["inner_skipped"]) == 1 and int(metrics["skipped"]) == 1
    assert int(metrics["status"]) == solvers.Status.NONFINITE
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(new.params))
    _leaves_equal(new.hparams, state.hparams)  # the hyper step was skipped
    assert np.isfinite(metrics["inner_loss"]) and np.isnan(metrics["outer_loss"])
    # The good inner step was applied.
    assert not np.array_equal(new.params["fc1"]["kernel"][...], state.params["fc1"]["kernel"][...])


@pytest.mark.parametrize("method", [stn.STN(), stn.DeltaSTN()], ids=["stn", "delta"])
def test_guard_skips_a_huge_finite_gradient_that_would_poison_adam(method):
    # A gradient of 1e25 is finite in float32, but Adam's second moment (1e50) is not: applying
    # that step would make every later update 0 without a single skip being counted.
    inner, outer = _clf_losses()

    def inner_loss(m, h, batch, key):
        x, y, scale = batch
        return inner(m, h, (x, y), key) * scale[0]

    trainer = _trainer(losses=(inner_loss, lambda m, h, b: outer(m, h, b[:2])), method=method)
    x, y = _clf_data(16)
    one = jnp.ones((16,))
    tb = (jnp.stack([x] * 3), jnp.stack([y] * 3), jnp.stack([one, one * 1e25, one]))
    vb = (x[None], y[None], one[None])
    step = jax.jit(trainer.step)
    state, metrics = step(trainer.init(), tb, vb)
    assert int(state.inner_skipped) == 1 and int(metrics["inner_skipped"]) == 1
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(state.inner_state))
    # Training goes on: the next cycle (ordinary batches) still moves the weights.
    ordinary = (tb[0], tb[1], jnp.stack([one] * 3))
    after, _ = step(state, ordinary, vb)
    assert not np.allclose(after.params["fc1"]["kernel"][...], state.params["fc1"]["kernel"][...])
    assert int(after.inner_skipped) == 1


def test_guard_skips_an_outer_step_whose_constrained_hparams_overflow():
    # The outer loss rewards a larger noise, so SGD pushes u up to about 1e30: finite, but exp(u)
    # (the log-scale "noise" value) is inf. That step must not be applied.
    inner, outer = _clf_losses()
    greedy = lambda m, h, b: outer(m, h, b) - jnp.mean(h["noise"])
    trainer = _trainer(losses=(inner, greedy), outer_optimizer=optax.sgd(1e32))
    data = _clf_data()
    state = trainer.init()
    tb, vb = trainer.sample_batches(state, data, data, 16)
    new, metrics = jax.jit(trainer.step)(state, tb, vb)
    assert int(new.skipped) == 1 and int(metrics["status"]) == solvers.Status.NONFINITE
    _leaves_equal(new.hparams, state.hparams)
    _leaves_equal(new.scale, state.scale)


def test_unused_hyperparameter_warns_once_naming_it():
    inner, outer = _clf_losses()
    space = {**SPACE, "forgotten": hparams.log(0.1)}
    trainer = _trainer(losses=(inner, outer), space=space, num_hparams=3)
    data = _clf_data()
    state = trainer.init()
    tb, vb = trainer.sample_batches(state, data, data, 16)
    step = jax.jit(trainer.step)
    with pytest.warns(UserWarning, match=r"\['forgotten'\]") as record:
        state, _ = step(state, tb, vb)
    assert len([w for w in record if "forgotten" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.step(state, tb, vb)  # once per trainer


def test_loss_returning_a_tuple_or_a_vector_is_a_clear_type_error():
    inner, outer = _clf_losses()
    data = _clf_data(16)
    batches = (data[0][None], data[1][None])
    with_aux = lambda m, h, b, key: (inner(m, h, b, key), {"acc": 1.0})
    trainer = _trainer(losses=(with_aux, outer), inner_steps=1)
    with pytest.raises(TypeError, match=r"inner_loss returned a tuple .*real scalar.*has_aux"):
        trainer.step(trainer.init(), batches, batches)
    vector = lambda m, h, b: optax.softmax_cross_entropy_with_integer_labels(m(b[0], h.hnet), b[1])
    trainer = _trainer(losses=(inner, vector), inner_steps=1)
    with pytest.raises(
        TypeError, match=r"outer_loss returned an array of shape \(16,\).*outer_loss\(model, h"
    ):
        trainer.step(trainer.init(), batches, batches)


def test_missing_hyperparameter_key_error_names_the_space_but_batch_errors_propagate():
    inner, outer = _clf_losses()
    data = {"x": _clf_data(16)[0], "y": _clf_data(16)[1]}
    batches = jax.tree.map(lambda a: a[None], data)

    def typo(m, h, b, key):
        return inner(m, h, (b["x"], b["y"]), key) + h["dropout"][0]

    trainer = _trainer(losses=(typo, lambda m, h, b: outer(m, h, (b["x"], b["y"]))), inner_steps=1)
    with pytest.raises(KeyError, match=r"inner_loss asked for hyperparameter 'dropout'.*'drop'"):
        trainer.step(trainer.init(), batches, batches)

    def batch_typo(m, h, b):
        return outer(m, h, (b["inputs"], b["y"]))  # the user's own KeyError

    trainer = _trainer(
        losses=(lambda m, h, b, k: inner(m, h, (b["x"], b["y"]), k), batch_typo), inner_steps=1
    )
    with pytest.raises(KeyError) as info:
        trainer.step(trainer.init(), batches, batches)
    assert info.value.args == ("inputs",)


def test_outer_batches_none_is_a_clear_value_error_before_the_loss_runs():
    calls = []
    trainer = _trainer(calls, inner_steps=1)
    x, y = _clf_data(16)
    with pytest.raises(ValueError, match="outer_batches is None"):
        trainer.step(trainer.init(), (x[None], y[None]), None)
    with pytest.raises(ValueError, match="outer_data is None"):
        trainer.sample_batches(trainer.init(), (x, y), None, 8)
    assert calls == []


def test_vmap_population_equals_a_loop():
    trainer, step, sample = _default()
    data = _clf_data()
    values = [
        {"drop": jnp.asarray(0.1), "noise": jnp.asarray(0.05)},
        {"drop": jnp.asarray(0.4), "noise": jnp.asarray(0.2)},
    ]
    us = [hparams.unconstrain(SPACE, v) for v in values]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *us)
    key = jax.random.key(1)
    states = jax.vmap(lambda u: trainer.init(hparams=u, key=key))(stacked)
    tb, vb = sample(trainer.init(hparams=us[0], key=key), data, data, batch_size=16)
    new, _ = jax.jit(jax.vmap(trainer.step, in_axes=(0, None, None)))(states, tb, vb)
    for i, u in enumerate(us):
        single, _ = step(trainer.init(hparams=u, key=key), tb, vb)
        for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(single.params), strict=True):
            np.testing.assert_allclose(a[i], b, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(new.hparams["drop"][i], single.hparams["drop"], rtol=1e-5)


def test_delta_trains_general_weights_at_unperturbed_hyperparameters():
    data = _clf_data()
    general = nnx.All(nnx.Param, nnx.Not(stn.ResponseParam))
    trainer, _, warmup = _delta()
    out = []
    for scale in (0.01, 2.0):
        state = trainer.init(key=jax.random.key(0))
        state = state._replace(
            scale=jax.tree.map(lambda r, s=scale: r * 0 + stn.scale_to_param(s), state.scale)
        )
        tb, _ = trainer.sample_batches(state, data, data, 32)
        state, _ = warmup(state, jax.tree.map(lambda a: a[:1], tb))
        out.append(nnx.split_state(state.params, general, stn.ResponseParam))
    _leaves_equal(out[0][0], out[1][0])  # general weights: independent of the perturbation
    resp0, resp1 = jax.tree.leaves(out[0][1]), jax.tree.leaves(out[1][1])
    assert any(not np.allclose(a, b) for a, b in zip(resp0, resp1, strict=True))
    # In the STN method the general weights see the perturbation.
    trainer, step, sample = _default()
    stns = []
    for scale in (0.01, 2.0):
        state = trainer.init(key=jax.random.key(0))
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
    trainer = _trainer(method=stn.DeltaSTN(linearize=True))
    state = _run_cycles(trainer, trainer.init(), _clf_data(), 2)
    assert int(state.inner_skipped) == 0
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(state.params))


def test_mip_encoding_and_shared_perturbation():
    seen = {}

    def record(drop, noise, hnet):
        seen["drop"], seen["noise"], seen["hnet"] = map(np.asarray, (drop, noise, hnet))

    def inner_loss(m, h, batch, key):
        jax.debug.callback(record, h["drop"], h["noise"], h.hnet)
        x, y = batch
        return _xent(m(x, h.hnet), y)

    trainer = _trainer(
        losses=(inner_loss, _clf_losses()[1]),
        num_hparams=4,
        inner_optimizer=optax.sgd(0.1),
        outer_optimizer=optax.sgd(0.1),
        inner_steps=1,
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


# ----------------------------------------------------------------------------- fit


def test_fit_records_the_schedule_calls_back_and_does_not_retrace():
    trainer, _, _ = _default()
    data = _clf_data()
    calls = []
    cb = lambda step, state, metrics: calls.append((step, int(state.step), set(metrics)))
    state, hist = trainer.fit(
        trainer.init(),
        data,
        data,
        steps=np.int64(6),
        batch_size=16,
        warmup_steps=3,
        chunk=3,
        callbacks=[cb],
        progress=False,
    )
    assert [c[:2] for c in calls] == [(6, 6), (9, 9)]
    assert calls[0][2] >= {"outer_loss", "hparams", "status"}
    assert int(state.step) == 9
    np.testing.assert_array_equal(hist["step"], np.arange(4, 10))
    for key in ("hparams/drop", "hparams/noise", "scales/drop", "outer_loss", "inner_loss"):
        assert hist[key].shape == (6,), key
    assert hist["hypergrad/drop"].shape == (6,) and hist["status"].dtype == np.int32
    np.testing.assert_allclose(hist["hparams/drop"][-1], trainer.hparams(state)["drop"], rtol=1e-6)
    assert not np.allclose(hist["hparams/drop"][0], hist["hparams/drop"][-1])
    traces = len(_COUNTER)
    trainer.fit(state, data, data, steps=6, batch_size=16, warmup_steps=3, chunk=3, progress=False)
    assert len(_COUNTER) == traces  # the runner is cached on the trainer


def test_fit_validates_its_arguments():
    trainer, _, _ = _default()
    data, state = _clf_data(), _default()[0].init()
    kw = {"steps": 2, "batch_size": 16, "progress": False}
    with pytest.raises(ValueError, match="steps"):
        trainer.fit(state, data, data, **{**kw, "steps": -1})
    with pytest.raises(TypeError, match="batch_size"):
        trainer.fit(state, data, data, **{**kw, "batch_size": 16.0})
    with pytest.raises(ValueError, match="chunk"):
        trainer.fit(state, data, data, chunk=0, **kw)
    with pytest.raises(TypeError, match="callbacks"):
        trainer.fit(state, data, data, callbacks=[1], **kw)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        trainer.fit(state, data, data, checkpoint_every=2, **kw)
    with pytest.raises(TypeError, match="lacks sample_batches, step, warmup"):
        fit(object(), state, data, data, warmup_steps=1, **kw)


def test_fit_early_stop_closes_the_one_progress_bar(monkeypatch):
    bars = []

    class Bar:
        def __init__(self, total, initial, desc, disable):
            self.total, self.n, self.desc, self.closed = total, initial, desc, False
            bars.append(self)

        def update(self, n):
            self.n += n

        def close(self):
            self.closed = True

    monkeypatch.setattr(_fit_module, "_progress_bar", Bar)
    trainer, _, _ = _default()
    data = _clf_data()
    state, hist = trainer.fit(
        trainer.init(),
        data,
        data,
        steps=9,
        batch_size=16,
        chunk=3,
        callbacks=lambda step, s, m: step >= 6,
        desc="tuning",
    )
    assert len(bars) == 1 and bars[0].closed and bars[0].total == 9 and bars[0].n == 6
    assert bars[0].desc == "tuning"
    assert int(state.step) == 6 and hist["step"].tolist() == [1, 2, 3, 4, 5, 6]


def test_fit_resume_is_bit_identical(tmp_path):
    trainer, _, _ = _default()
    data = _clf_data()
    kw = {"steps": 6, "batch_size": 16, "warmup_steps": 2, "chunk": 2, "progress": False}
    state0 = trainer.init(key=jax.random.key(5))
    full, full_hist = trainer.fit(state0, data, data, **kw)
    # An interrupted run: checkpoints every 2 steps, stopped after 4 of the 8.
    ck = tmp_path / "run"
    stop = lambda step, s, m: step >= 4
    _, part = trainer.fit(
        state0, data, data, checkpoint_dir=ck, checkpoint_every=2, callbacks=stop, **kw
    )
    assert part["step"].tolist() == [3, 4] and latest_step(ck) == 4
    resumed, hist = trainer.fit(state0, data, data, checkpoint_dir=ck, checkpoint_every=2, **kw)
    _leaves_equal(resumed, full)
    assert hist.keys() == full_hist.keys()
    for k in full_hist:
        np.testing.assert_array_equal(hist[k], full_hist[k], err_msg=k)
    assert latest_step(ck) == 8
    # Everything done: a rerun restores and returns without running a step.
    again, hist2 = trainer.fit(state0, data, data, checkpoint_dir=ck, **kw)
    _leaves_equal(again, full)
    np.testing.assert_array_equal(hist2["hparams/drop"], full_hist["hparams/drop"])
    # resume=False never overwrites another run's checkpoints.
    with pytest.raises(ValueError, match="already holds checkpoints"):
        trainer.fit(state0, data, data, checkpoint_dir=ck, resume=False, **kw)
