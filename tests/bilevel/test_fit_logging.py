"""``fit``'s per-step metrics file and TensorBoard scalars; the tuners' way back into the model."""

from __future__ import annotations

import json
import struct
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bilevel
import solvers
from bilevel import hparams as H
from bilevel import stn


def _problem():
    model = nnx.Linear(4, 1, rngs=nnx.Rngs(0))
    apply_fn, params = bilevel.nnx_apply_fn(model)
    X = jax.random.normal(jax.random.key(0), (60, 4))
    y = X @ jnp.arange(1.0, 5.0)[:, None] + 0.1 * jax.random.normal(jax.random.key(1), (60, 1))

    def inner(p, h, b):
        fit = jnp.mean((apply_fn(p, b[0]) - b[1]) ** 2)
        return (
            fit
            + h["wd"][0] * jnp.sum(p["kernel"][...] ** 2)
            + h["wd"][1] * jnp.sum(p["bias"][...] ** 2)
        )

    def outer(p, h, b):
        return jnp.mean((apply_fn(p, b[0]) - b[1]) ** 2)

    opt = bilevel.BilevelOptimizer(
        inner,
        outer,
        inner_optimizer=optax.sgd(0.05),
        outer_optimizer=optax.adam(0.05),
        space={"wd": H.log(jnp.full(2, 0.1))},
        method=solvers.Implicit(linear_solver=solvers.cg(maxiter=10)),
        inner_steps=2,
    )
    return model, apply_fn, params, opt, (X[:40], y[:40]), (X[40:], y[40:])


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_log_dir_writes_one_json_line_per_step_equal_to_the_history(tmp_path):
    _, _, params, opt, train, val = _problem()
    _, history = opt.fit(
        opt.init(params), train, val, steps=7, batch_size=8, chunk=3, progress=False,
        log_dir=tmp_path,
    )  # fmt: skip
    rows = _read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == history["step"].tolist() == list(range(1, 8))
    np.testing.assert_allclose([r["outer_loss"] for r in rows], history["outer_loss"], rtol=1e-6)
    np.testing.assert_allclose([r["hparams/wd"] for r in rows], history["hparams/wd"], rtol=1e-6)
    assert {"status", "hypergrad_norm", "inner_loss", "skipped"} <= set(rows[0])


def test_a_resumed_fit_never_logs_a_step_twice(tmp_path):
    _, _, params, opt, train, val = _problem()
    kw = dict(batch_size=8, chunk=2, progress=False, log_dir=tmp_path / "log")
    ckpt = tmp_path / "ckpt"
    opt.fit(opt.init(params), train, val, steps=4, checkpoint_dir=ckpt, **kw)
    # the job "crashes" after step 4 with a half-written line of step 5 in the file
    with (tmp_path / "log" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "outer_lo')
    _, history = opt.fit(opt.init(params), train, val, steps=8, checkpoint_dir=ckpt, **kw)
    rows = _read_jsonl(tmp_path / "log" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))
    np.testing.assert_allclose([r["outer_loss"] for r in rows], history["outer_loss"], rtol=1e-6)


def _events(folder):
    """Scalars ``{tag: [(step, value), ...]}`` parsed from TFRecord event files."""
    from tensorboardX.proto import event_pb2

    out = {}
    for path in folder.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_tensorboard_scalars_per_step_and_per_hyperparameter_element(tmp_path):
    pytest.importorskip("tensorboardX")
    _, _, params, opt, train, val = _problem()
    _, history = opt.fit(
        opt.init(params), train, val, steps=4, batch_size=8, progress=False, log_dir=tmp_path,
        tensorboard=True,
    )  # fmt: skip
    events = _events(tmp_path)
    assert [s for s, _ in events["outer_loss"]] == [1, 2, 3, 4]
    np.testing.assert_allclose([v for _, v in events["outer_loss"]], history["outer_loss"], 1e-6)
    np.testing.assert_allclose(
        [v for _, v in events["hparams/wd/1"]], history["hparams/wd"][:, 1], rtol=1e-6
    )


def test_tensorboard_without_tensorboardx_is_a_clear_error(tmp_path, monkeypatch):
    _, _, params, opt, train, val = _problem()
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with pytest.raises(ImportError, match="pip install tensorboardX"):
        opt.fit(opt.init(params), train, val, steps=2, batch_size=8, progress=False,
                log_dir=tmp_path, tensorboard=True)  # fmt: skip
    with pytest.raises(ValueError, match="needs a log_dir"):
        opt.fit(opt.init(params), train, val, steps=2, batch_size=8, tensorboard=True)
    with pytest.raises(TypeError, match="log_dir must be a path"):
        opt.fit(opt.init(params), train, val, steps=2, batch_size=8, log_dir=3)


def test_update_model_puts_tuned_parameters_back_into_the_users_model():
    model, apply_fn, params, opt, train, val = _problem()
    state, _ = opt.fit(opt.init(params), train, val, steps=3, batch_size=8, progress=False)
    assert not jnp.allclose(model(val[0]), apply_fn(state.params, val[0]))
    assert opt.update_model(model, state) is model
    np.testing.assert_array_equal(model(val[0]), apply_fn(state.params, val[0]))
    plain = opt.init({"kernel": jnp.zeros((4, 1))})
    with pytest.raises(TypeError, match="nnx_apply_fn"):
        opt.update_model(model, plain)
    with pytest.raises(TypeError, match=r"model must be a flax\.nnx\.Module"):
        opt.update_model(lambda x: x, state)


def test_stn_trainer_update_model_equals_its_model_copy():
    net = stn.StnLinear(4, 1, 1, rngs=nnx.Rngs(0))
    X = jax.random.normal(jax.random.key(0), (32, 4))
    data = (X, X @ jnp.ones((4, 1)))
    loss = lambda m, h, b: jnp.mean((m(b[0], h.hnet) - b[1]) ** 2)
    trainer = stn.Trainer(
        net, lambda m, h, b, key: loss(m, h, b) + h["wd"].mean() * stn.effective_l2(m, h.hnet).mean(), loss, space={"wd": H.log(0.1)},
        inner_optimizer=optax.adam(1e-2), outer_optimizer=optax.adam(1e-2),
    )  # fmt: skip
    state, _ = trainer.fit(trainer.init(), data, data, steps=3, batch_size=8, progress=False)
    hnet = trainer.hnet(state)
    user_model = stn.StnLinear(4, 1, 1, rngs=nnx.Rngs(5))
    trainer.update_model(user_model, state)
    np.testing.assert_array_equal(user_model(X, hnet), trainer.model(state)(X, hnet))
