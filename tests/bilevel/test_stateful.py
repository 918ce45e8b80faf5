"""Stateful Flax NNX models (BatchNorm statistics, dropout RNG counters) in the online tuners.

The model state is threaded through the inner steps exactly as a plain Optax loop threads it,
never differentiated, left unchanged by a skipped step, checkpointed with the tuner's state, and
seen by the outer loss (whose own update of it is discarded).
"""

from __future__ import annotations

import re
from pathlib import Path

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
from tests._docs_examples import run_example
from tests.bilevel import test_tuner_contract as contract
from tests.conftest import FAST_XLA_ON

ROOT = Path(__file__).resolve().parents[2]

# ----------------------------------------------------------------------------- small models


class CNN(nnx.Module):
    """Conv 3x3 -> BatchNorm -> ReLU -> global mean -> dropout -> dense: BatchStat and RngState."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, momentum=0.9, rngs=rngs)
        self.drop = nnx.Dropout(0.25, rngs=rngs)
        self.fc = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.conv(x)))
        return self.fc(self.drop(x.mean((1, 2))))


class MLP(nnx.Module):
    """The same on vectors (dense -> BatchNorm -> ReLU -> dropout -> dense): quick to compile."""

    def __init__(self, rngs):
        self.dense = nnx.Linear(6, 16, use_bias=False, rngs=rngs)  # BatchNorm removes a bias
        self.bn = nnx.BatchNorm(16, momentum=0.9, rngs=rngs)
        self.drop = nnx.Dropout(0.25, rngs=rngs)
        self.fc = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.fc(self.drop(nnx.relu(self.bn(self.dense(x)))))


def _data(shape, n=96, seed=0):
    rs = np.random.RandomState(seed)
    x = jnp.asarray(1.5 + 2.0 * rs.randn(n, *shape), jnp.float32)
    y = jnp.asarray(rs.randint(0, 3, n), jnp.int32)
    return (x[:64], y[:64]), (x[64:], y[64:])


IMAGES = _data((6, 6, 1))
TRAIN, VAL = _data((6,))
SGD = dict(learning_rate=0.1, momentum=0.9)


def _problem(net=MLP):
    """``(model, params, state, inner, outer)``: train-mode inner loss, eval-mode outer loss."""
    model = net(nnx.Rngs(0, dropout=1))
    train_fn, params, state = bilevel.nnx_apply_fn(model, with_state=True, mode="train")
    eval_fn, _, _ = bilevel.nnx_apply_fn(model, with_state=True, mode="eval")

    def inner(p, h, b, s):
        logits, s = train_fn(p, s, b[0])
        decay = h["wd"] * sum(jnp.sum(a**2) for a in jax.tree.leaves(p))
        return optax.softmax_cross_entropy_with_integer_labels(logits, b[1]).mean() + decay, s

    def outer(p, h, b, s):
        logits, s = eval_fn(p, s, b[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, b[1]).mean(), s

    return model, params, state, inner, outer


def _tuner(inner, outer, method=None, inner_steps=3, **kw):
    kw.setdefault("outer_optimizer", optax.set_to_zero())  # fixed hyperparameters
    kw.setdefault("inner_optimizer", optax.sgd(**SGD))
    return bilevel.BilevelOptimizer(
        inner,
        outer,
        space={"wd": H.real(1e-3)},
        method=solvers.Implicit(linear_solver=solvers.cg(maxiter=5, ridge=1.0))
        if method is None
        else method,
        inner_steps=inner_steps,
        has_state=True,
        **kw,
    )


def _plain_loop(inner, params, state, batches, wd=1e-3):
    """A plain Optax training loop (SGD with momentum) over stacked batches, jitted."""
    tx = optax.sgd(**SGD)
    h = {"wd": jnp.asarray(wd, jnp.float32)}

    def body(carry, batch):
        p, s, o = carry
        (value, s), g = jax.value_and_grad(inner, has_aux=True)(p, h, batch, s)
        updates, o = tx.update(g, o, p)
        return (optax.apply_updates(p, updates), s, o), value

    (p, s, _), _ = jax.jit(lambda c, b: jax.lax.scan(body, c, b))(
        (params, state, tx.init(params)), batches
    )
    return p, s


def _leaves(tree):
    return [
        np.asarray(jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else a)
        for a in jax.tree.leaves(tree)
    ]


def _equal(a, b):
    """Bit for bit under XLA's default flags (``BILEVEL_TEST_XLA_FULL=1``); under the suite's
    fast-compile flags two different programs may round a reduction differently in the last bit,
    so there the check is to 2 float32 ulps, and 1e-7 absolute for leaves that are rounding noise
    (a bias under BatchNorm: its gradient is zero up to rounding); integer leaves (PRNG keys)
    stay exact."""
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        if FAST_XLA_ON and np.issubdtype(x.dtype, np.floating):
            np.testing.assert_allclose(x, y, rtol=2.5e-7, atol=1e-7)
        else:
            np.testing.assert_array_equal(x, y)


def _close(a, b, rtol=1e-6, atol=1e-8):
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- the contract


def test_running_statistics_after_fit_equal_a_plain_optax_loop_bit_for_bit():
    model, params, state0, inner, outer = _problem(CNN)
    train, val = IMAGES
    opt = _tuner(inner, outer)
    state = opt.init(params, key=jax.random.key(1), model_state=state0)
    steps = 4
    # The batches fit draws, one outer step after another, stacked for the plain loop.
    drawn = [
        opt.sample_batches(state._replace(step=jnp.int32(k)), train, val, 16)[0]
        for k in range(steps)
    ]
    batches = jax.tree.map(lambda *a: jnp.concatenate(a), *drawn)
    state, history = opt.fit(state, train, val, steps=steps, batch_size=16, chunk=2, progress=False)
    assert int(state.inner_skipped) == 0 and history["inner_applied"].tolist() == [3] * steps

    p, s = _plain_loop(inner, params, state0, batches)
    _equal(state.model_state, s)  # BatchStat (mean, var) and the dropout RngState, bit for bit
    _equal(state.params, p)
    # A real check: the statistics moved, the dropout stream advanced once per inner step.
    assert not np.allclose(state.model_state["bn"]["mean"][...], state0["bn"]["mean"][...])
    assert int(state.model_state["drop"]["rngs"]["count"][...]) == 3 * steps
    # update_model writes parameters and statistics back into the user's model.
    opt.update_model(model, state)
    np.testing.assert_array_equal(model.bn.mean[...], s["bn"]["mean"][...])
    np.testing.assert_array_equal(model.conv.kernel[...], p["conv"]["kernel"][...])
    assert int(model.drop.rngs.count[...]) == 3 * steps


def test_outer_loss_sees_the_state_after_the_inner_steps_and_cannot_change_it():
    _, params, state0, inner, eval_outer = _problem()
    train_fn, _, _ = bilevel.nnx_apply_fn(
        MLP(nnx.Rngs(0, dropout=1)), with_state=True, mode="train"
    )

    def train_outer(p, h, b, s):  # train mode: it would move the statistics and the RNG
        logits, s = train_fn(p, s, b[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, b[1]).mean(), s

    results = {}
    for name, outer in (("eval", eval_outer), ("train", train_outer)):
        opt = _tuner(inner, outer)
        state = opt.init(params, model_state=state0)
        batches, _ = opt.sample_batches(state, TRAIN, VAL, 16)
        results[name] = opt.step(state, batches, VAL)
    (s_eval, m_eval), (s_train, m_train) = results["eval"], results["train"]
    # The outer loss's returned state is discarded: both runs carry the inner steps' state.
    _equal(s_eval.model_state, s_train.model_state)
    _p, s_inner = _plain_loop(inner, params, state0, batches)
    _equal(s_eval.model_state, s_inner)
    # The outer loss is evaluated at the state after the inner steps, not the initial one.
    after = eval_outer(s_eval.params, None, VAL, s_eval.model_state)[0]
    before = eval_outer(s_eval.params, None, VAL, state0)[0]
    np.testing.assert_allclose(m_eval["outer_loss"], after, rtol=1e-6)
    assert abs(float(after) - float(before)) > 1e-3
    assert float(m_train["outer_loss"]) != pytest.approx(float(m_eval["outer_loss"]), rel=1e-3)


def test_a_nonfinite_inner_step_leaves_the_model_state_unchanged():
    _, params, state0, inner, outer = _problem()
    opt = _tuner(inner, outer)
    state = opt.init(params, model_state=state0)
    batches, _ = opt.sample_batches(state, TRAIN, VAL, 16)
    poisoned = (batches[0].at[1, 0].set(jnp.nan), batches[1])  # one NaN example in batch 1
    after, metrics = opt.step(state, poisoned, VAL)
    assert int(metrics["inner_skipped"]) == 1 and int(metrics["inner_applied"]) == 2
    # The skipped step changed nothing: the result is the plain loop on batches 0 and 2.
    p, s = _plain_loop(inner, params, state0, jax.tree.map(lambda a: a[jnp.array([0, 2])], batches))
    _equal(after.model_state, s)
    _equal(after.params, p)
    # A single poisoned step leaves the state exactly as it was.
    one = _tuner(inner, outer, inner_steps=1)
    s1 = one.init(params, model_state=state0)
    s2, m = one.step(s1, jax.tree.map(lambda a: a[1:2], poisoned), VAL)
    assert int(m["inner_skipped"]) == 1
    _equal(s2.model_state, state0)
    _equal(s2.params, params)


def test_checkpoint_and_resume_restore_the_model_state(tmp_path):
    _, params, state0, inner, outer = _problem()
    opt = _tuner(inner, outer, outer_optimizer=optax.adam(1e-2))
    fresh = lambda: opt.init(params, key=jax.random.key(2), model_state=state0)
    kw = dict(batch_size=16, chunk=2, progress=False)
    straight, h_straight = opt.fit(fresh(), TRAIN, VAL, steps=4, **kw)
    opt.fit(fresh(), TRAIN, VAL, steps=2, checkpoint_dir=tmp_path, **kw)
    saved, _ = bilevel.restore_checkpoint(tmp_path, like=fresh())
    assert int(saved.model_state["drop"]["rngs"]["count"][...]) == 6  # the state was saved
    resumed, h_resumed = opt.fit(
        fresh(), TRAIN, VAL, steps=4, checkpoint_dir=tmp_path, resume=True, **kw
    )
    _equal(resumed, straight)  # every leaf, model state and PRNG keys included
    np.testing.assert_array_equal(h_resumed["outer_loss"], h_straight["outer_loss"])
    assert float(straight.hparams["wd"]) != pytest.approx(1e-3)  # it tuned


def test_vmap_over_hyperparameters_equals_a_loop():
    _, params, state0, inner, outer = _problem()
    opt = _tuner(inner, outer, outer_optimizer=optax.adam(0.05))
    probe = opt.init(params, model_state=state0)
    batches, _ = opt.sample_batches(probe, TRAIN, VAL, 16)
    us = {"wd": jnp.asarray([1e-4, 1e-2, 3e-1], jnp.float32)}
    states = jax.vmap(lambda u: opt.init(params, u, model_state=state0))(us)
    vstates, vmetrics = jax.jit(jax.vmap(opt.step, in_axes=(0, None, None)))(states, batches, VAL)
    step = jax.jit(opt.step)
    for i in range(3):
        member = opt.init(params, jax.tree.map(lambda a, i=i: a[i], us), model_state=state0)
        s, m = step(member, batches, VAL)
        _close(s.model_state, jax.tree.map(lambda a, i=i: a[i], vstates.model_state), 1e-5, 1e-7)
        np.testing.assert_allclose(m["outer_loss"], vmetrics["outer_loss"][i], rtol=1e-5)
        np.testing.assert_allclose(s.hparams["wd"], vstates.hparams["wd"][i], rtol=1e-5)
    # Different decays train differently: the members' statistics differ.
    means = vstates.model_state["bn"]["mean"][...]
    assert not np.allclose(means[0], means[2])


@pytest.mark.parametrize(
    "method",
    [
        solvers.Implicit(linear_solver=solvers.neumann(steps=1, scale=0.1)),
        bilevel.BOREP(adjoint_lr=0.1, period=1),
        solvers.Unrolled(checkpoint_every=2),
    ],
    ids=["soba", "borep", "unrolled-checkpointed"],
)
def test_other_methods_thread_the_same_state(method):
    _, params, state0, inner, outer = _problem()
    opt = _tuner(inner, outer, method=method, outer_optimizer=optax.sgd(0.0))
    state = opt.init(params, model_state=state0)
    batches, _ = opt.sample_batches(state, TRAIN, VAL, 16)
    after, metrics = jax.jit(opt.step)(state, batches, VAL)
    assert bool(jnp.isfinite(metrics["hypergrad_norm"])) and int(metrics["skipped"]) == 0
    _close(after.model_state, _plain_loop(inner, params, state0, batches)[1])


def test_validation_driven_hd_rate_sees_the_current_model_state():
    """``inner_hyper_grads=True``: each inner step's ``hyper_grads`` is the outer (eval-mode)
    gradient at the current weights *and running statistics*, as in a hand-written loop (with
    the initial statistics instead, the parameters differ by 4%)."""
    _, params, state0, inner, outer = _problem()
    opt = _tuner(inner, outer, inner_optimizer=bilevel.hd_adam(1e-2), inner_hyper_grads=True)
    state = opt.init(params, model_state=state0)
    batches, _ = opt.sample_batches(state, TRAIN, VAL, 16)
    after, metrics = jax.jit(opt.step)(state, batches, VAL)
    assert int(metrics["skipped"]) == 0 and int(metrics["inner_skipped"]) == 0

    tx, h = bilevel.hd_adam(1e-2), {"wd": jnp.asarray(1e-3, jnp.float32)}

    @jax.jit
    def loop(p, s):
        o = tx.init(p)
        for t in range(3):
            b = jax.tree.map(lambda a, t=t: a[t], batches)
            (_, new_s), g = jax.value_and_grad(inner, has_aux=True)(p, h, b, s)
            hg = jax.grad(lambda q, s=s: outer(q, h, VAL, s)[0])(p)
            u, o = tx.update(g, o, p, hyper_grads=hg)
            p, s = optax.apply_updates(p, u), new_s
        return p, s, o

    p, s, o = loop(params, state0)
    _close(after.params, p, 1e-5, 1e-7)
    _close(after.model_state, s, 1e-5, 1e-7)
    lr = optax.tree_utils.tree_get(after.inner_state, "learning_rate")
    np.testing.assert_allclose(lr, optax.tree_utils.tree_get(o, "learning_rate"), rtol=1e-5)
    assert float(lr) != pytest.approx(1e-2)


# ----------------------------------------------------------------------------- every method


F64 = dict(dtype=jnp.float64, param_dtype=jnp.float64)


def _f64_statistics(bn: nnx.BatchNorm) -> nnx.BatchNorm:
    """``nnx.BatchNorm`` keeps float32 statistics whatever its dtypes: make them float64."""
    bn.mean = nnx.BatchStat(bn.mean[...].astype(jnp.float64))
    bn.var = nnx.BatchStat(bn.var[...].astype(jnp.float64))
    return bn


class TanhNet(nnx.Module):
    """Dense -> BatchNorm -> tanh -> dense in float64: the statistics depend on the weights."""

    def __init__(self, rngs):
        self.l1 = nnx.Linear(3, 5, rngs=rngs, **F64)
        self.bn = _f64_statistics(nnx.BatchNorm(5, momentum=0.8, rngs=rngs, **F64))
        self.l2 = nnx.Linear(5, 1, rngs=rngs, **F64)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.bn(self.l1(x))))[:, 0]


class RidgeNet(nnx.Module):
    """BatchNorm of the inputs (no scale, no bias) -> dense: a strongly convex inner problem."""

    def __init__(self, rngs):
        bn = nnx.BatchNorm(3, use_scale=False, use_bias=False, momentum=0.8, rngs=rngs, **F64)
        self.bn = _f64_statistics(bn)
        self.l1 = nnx.Linear(3, 1, rngs=rngs, **F64)

    def __call__(self, x):
        return self.l1(self.bn(x))[:, 0]


def _regression():
    rs = np.random.RandomState(0)
    X = jnp.asarray(2.0 + 1.5 * rs.randn(40, 3))
    y = jnp.sin(X @ jnp.array([1.0, -1.0, 0.5])) + 0.1 * jnp.asarray(rs.randn(40))
    return (X[:24], y[:24]), (X[24:], y[24:])


def _small_problem(net):
    model = net(nnx.Rngs(0))
    train_fn, params, state = bilevel.nnx_apply_fn(model, with_state=True, mode="train")
    eval_fn, _, _ = bilevel.nnx_apply_fn(model, with_state=True, mode="eval")

    def inner(p, h, b, s):
        out, s = train_fn(p, s, b[0])
        return jnp.mean((out - b[1]) ** 2) + h["wd"] * sum(
            jnp.sum(a**2) for a in jax.tree.leaves(p)
        ), s

    def outer(p, h, b, s):
        out, s = eval_fn(p, s, b[0])
        return jnp.mean((out - b[1]) ** 2), s

    return params, state, inner, outer


def _gd(inner, params, state, batches, n, lr, wd_of_step):
    """``n`` gradient steps (batch ``min(t, len - 1)``), the decay of step ``t`` from a function."""

    def body(carry, t):
        p, s = carry
        b = jax.tree.map(lambda a: a[jnp.minimum(t, a.shape[0] - 1)], batches)
        (_, s), g = jax.value_and_grad(inner, has_aux=True)(p, {"wd": wd_of_step(t)}, b, s)
        return (jax.tree.map(lambda a, d: a - lr * d, p, g), s), None

    return jax.lax.scan(body, (params, state), jnp.arange(n))[0]


EXACT = {
    "implicit": (
        RidgeNet,
        300,
        0.3,
        solvers.Implicit(linear_solver=solvers.cg(tol=1e-13, maxiter=100)),
    ),
    "unrolled": (TanhNet, 4, 0.1, solvers.Unrolled()),
    "truncated": (TanhNet, 4, 0.1, solvers.Truncated(steps=2)),
    "forward": (TanhNet, 4, 0.1, bilevel.Forward()),
}


@pytest.mark.parametrize("name", list(EXACT))
def test_every_method_matches_central_finite_differences_with_the_state_held(name):
    """Train-mode inner loss, eval-mode outer loss, float64.

    The reference differentiates ``u -> L_V(w_T(u), s_T, u)`` with ``s_T`` the statistics at the
    current ``u``: the state enters as a constant (Truncated: the first ``n - K`` steps at the
    current ``u`` too, its window held constant).
    """
    net, n, lr, method = EXACT[name]
    window = method.steps if isinstance(method, solvers.Truncated) else n
    u0, eps = 0.05, 1e-5
    with jax.enable_x64(True):
        train, val = _regression()
        params, state0, inner, outer = _small_problem(net)
        if name == "implicit":
            batches = jax.tree.map(lambda a: a[None], train)  # one batch, every step
        else:
            idx = np.random.RandomState(1).permutation(24).reshape(n, 6)
            batches = jax.tree.map(lambda a: a[idx], train)
        opt = bilevel.BilevelOptimizer(
            inner,
            outer,
            inner_optimizer=optax.sgd(lr),
            outer_optimizer=optax.set_to_zero(),
            space={"wd": H.real(u0)},
            method=method,
            inner_steps=n,
            has_state=True,
        )
        after, metrics = opt.step(opt.init(params, model_state=state0), batches, val)
        assert int(metrics["status"]) == solvers.Status.SUCCESS

        @jax.jit
        def reference(u):
            wd = lambda t: jnp.where(t >= n - window, u, u0)
            p, _ = _gd(inner, params, state0, batches, n, lr, wd)
            _, s_t = _gd(inner, params, state0, batches, n, lr, lambda t: u0)
            return outer(p, None, val, s_t)[0]

        fd = (reference(u0 + eps) - reference(u0 - eps)) / (2 * eps)
        np.testing.assert_allclose(metrics["hypergrad"]["wd"], fd, rtol=2e-5)
        np.testing.assert_allclose(metrics["outer_loss"], reference(u0), rtol=1e-12)
        # The statistics the outer loss saw are the ones the inner steps produced.
        assert float(outer(after.params, None, val, state0)[0]) != pytest.approx(
            float(metrics["outer_loss"]), rel=1e-6
        )
        # The one-shot hypergradient takes the state too and agrees (h = u for a real space):
        # from the same start through the same steps, or (Implicit) at the trained parameters.
        # Jitted: one compile, not many small eager ones.
        if name == "implicit":
            one_shot = jax.jit(
                lambda p, h, s: bilevel.hypergradient(
                    inner, outer, p, h, train, val, method=method, model_state=s
                )
            )(after.params, {"wd": jnp.asarray(u0)}, after.model_state)
        else:
            one_shot = jax.jit(
                lambda p, h, s: bilevel.hypergradient(
                    inner,
                    outer,
                    p,
                    h,
                    batches,
                    val,
                    method=method,
                    inner_optimizer=optax.sgd(lr),
                    model_state=s,
                )
            )(params, {"wd": jnp.asarray(u0)}, state0)
        np.testing.assert_allclose(one_shot["wd"], metrics["hypergrad"]["wd"], rtol=1e-9)


# ----------------------------------------------------------------------------- conventions


def test_nnx_apply_fn_modes_and_update_model():
    model = MLP(nnx.Rngs(0, dropout=1))
    x = TRAIN[0][:8]
    train_fn, params, state = bilevel.nnx_apply_fn(model, with_state=True, mode="train")
    eval_fn, _, _ = bilevel.nnx_apply_fn(model, with_state=True, mode="eval")
    out, new = train_fn(params, state, x)
    assert out.shape == (8, 3) and jax.tree.structure(new) == jax.tree.structure(state)
    assert not np.allclose(new["bn"]["mean"][...], state["bn"]["mean"][...])
    assert int(new["drop"]["rngs"]["count"][...]) == 1
    same, unchanged = eval_fn(params, new, x)
    _equal(unchanged, new)  # eval mode: statistics and RNG untouched, no dropout
    np.testing.assert_array_equal(same, eval_fn(params, new, x)[0])
    # The stateless form discards the update; the model itself is never modified.
    plain_fn, _ = bilevel.nnx_apply_fn(model, mode="train")
    plain_fn(params, x)
    assert model.bn.use_running_average is False and float(model.bn.mean[...].sum()) == 0.0
    with pytest.raises(ValueError, match='mode must be "train", "eval" or None'):
        bilevel.nnx_apply_fn(model, mode="test")
    with pytest.raises(TypeError, match="with_state must be True or False"):
        bilevel.nnx_apply_fn(model, with_state=1)


def _stateless(inner, outer, **kw):
    return bilevel.BilevelOptimizer(
        inner,
        outer,
        inner_optimizer=optax.sgd(0.1),
        outer_optimizer=optax.sgd(0.1),
        space={"wd": H.real(1e-3)},
        method=solvers.Implicit(),
        inner_steps=3,
        **kw,
    )


def test_clear_errors_for_convention_mix_ups():
    _, params, state0, inner, outer = _problem()
    opt = _tuner(inner, outer)
    with pytest.raises(ValueError, match=r"has_state=True needs .* model_state="):
        opt.init(params)
    zero = lambda p, h, b: 0.0 * h["wd"]
    with pytest.raises(ValueError, match="pass has_state=True"):
        _stateless(zero, zero).init(params, model_state=state0)
    batches, _ = opt.sample_batches(opt.init(params, model_state=state0), TRAIN, VAL, 16)
    # A stateful loss given to a stateless tuner, and the reverse.
    mixed = _stateless(lambda p, h, b: inner(p, h, b, state0), lambda p, h, b: 0.0)
    with pytest.raises(TypeError, match="needs has_state=True"):
        mixed.step(mixed.init(params), batches, VAL)
    scalar = _tuner(lambda p, h, b, s: inner(p, h, b, s)[0], outer)
    with pytest.raises(TypeError, match=r"has_state=True expects \(scalar loss, new_model_state\)"):
        scalar.step(scalar.init(params, model_state=state0), batches, VAL)
    wrong = _tuner(lambda p, h, b, s: (inner(p, h, b, s)[0], s["bn"]), outer)
    with pytest.raises(TypeError, match="new_model_state shaped like the model_state"):
        wrong.step(wrong.init(params, model_state=state0), batches, VAL)
    with pytest.raises(TypeError, match="has_state must be True or False"):
        _stateless(inner, outer, has_state="yes")
    state = opt.init(params, model_state={"bn": jnp.zeros(4)})
    with pytest.raises(TypeError, match=r"needs a model state from bilevel\.nnx_apply_fn"):
        opt.update_model(MLP(nnx.Rngs(0, dropout=1)), state)


def test_the_docs_example_runs_as_written():
    page = (ROOT / "docs" / "stateful.md").read_text()
    stdout = run_example("../README.md", "batchnorm", max_lines=34)  # shown on the page too
    numbers = lambda text: [float(v) for v in re.findall(r"\d+\.\d+(?:e[-+]\d+)?", text)]
    got = numbers(stdout)  # loss before, loss after, weight decay, largest change of a mean
    assert len(got) == 4, stdout
    assert got[1] < got[0] and got[3] > 0.01 and got[2] != pytest.approx(1e-3)
    # The page shows what it prints (to the rounding of another machine).
    printed = re.search(r"It prints .*?\n\n```text\n(.*?)```", page, re.S)
    assert printed, "docs/stateful.md lost the example's output"
    np.testing.assert_allclose(numbers(printed.group(1)), got, rtol=0.05)


# ----------------------------------------------------------------------------- the tuner contract


class _StnBnNet(nnx.Module):
    def __init__(self, rngs):
        self.l1 = stn.StnLinear(contract.D, 8, 1, use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
        self.l2 = stn.StnLinear(8, 1, 1, rngs=rngs)

    def __call__(self, x, hnet):
        return self.l2(nnx.relu(self.bn(self.l1(x, hnet))), hnet)[:, 0]


def _stn_losses(eval_outer=True):
    def inner(model, h, b, key):
        del key
        err = jnp.mean((model(b[0], h.hnet) - b[1]) ** 2)
        return err + jnp.mean(h["wd"]) * stn.effective_l2(model, h.hnet).mean()

    def outer(model, h, b):
        if eval_outer:
            model.eval()  # this copy only: the running statistics, not the batch's
        return jnp.mean((model(b[0], h.hnet) - b[1]) ** 2)

    return inner, outer


def _stn_trainer(method=None, eval_outer=True, inner_steps=3):
    inner, outer = _stn_losses(eval_outer)
    # SGD: Adam would turn the rounding noise of gradients that BatchNorm cancels into full steps.
    return stn.Trainer(
        _StnBnNet(nnx.Rngs(0)),
        inner,
        outer,
        space={"wd": H.log(0.1)},
        inner_optimizer=optax.sgd(**SGD),
        outer_optimizer=optax.adam(0.02),
        method=stn.STN() if method is None else method,
        inner_steps=inner_steps,
    )


def _stn_case(method) -> contract.Case:
    train, val = contract._data()
    return contract.Case(
        make=lambda: _stn_trainer(method),
        init=lambda t, u=None: t.init(hparams=u, key=jax.random.key(3)),
        batches=lambda t, s: t.sample_batches(s, train, val, 8),
        poison=lambda b: (b[0].at[1].set(jnp.nan), b[1]),
        population=lambda t: {"wd": jnp.log(jnp.asarray([0.01, 0.1, 1.0]))},
    )


def _bilevel_case(method) -> contract.Case:
    _, params, state0, inner, outer = _problem()
    return contract.Case(
        make=lambda: _tuner(inner, outer, method=method, outer_optimizer=optax.adam(0.05)),
        init=lambda t, u=None: t.init(params, u, key=jax.random.key(3), model_state=state0),
        batches=lambda t, s: t.sample_batches(s, TRAIN, VAL, 16),
        poison=lambda b: (b[0].at[1].set(jnp.nan), b[1]),
        population=lambda t: {"wd": jnp.asarray([1e-4, 1e-3, 1e-2], jnp.float32)},
    )


CASES = {
    "forward": lambda: _bilevel_case(bilevel.Forward(decay=0.9)),
    "truncated": lambda: _bilevel_case(solvers.Truncated(steps=2)),
    "stn": lambda: _stn_case(stn.STN()),
    "delta-stn": lambda: _stn_case(stn.DeltaSTN()),
}
SLOW = ("truncated", "delta-stn")  # a few minutes each on two CPU cores: --runslow


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in CASES]
)
def test_tuner_contract_with_batchnorm(name, tmp_path):
    """Resume bit-identical, vmap equals a loop, non-finite steps skipped, state finite."""
    case = CASES[name]()
    contract.test_resume_is_bit_identical(case, tmp_path)
    contract.test_vmap_over_a_population_equals_a_loop(case)
    contract.test_nonfinite_steps_are_skipped_and_counted_and_state_stays_finite(case)


def test_stn_trainer_threads_batchnorm_statistics_and_discards_the_outer_update():
    train, val = contract._data()
    runs = {}
    for eval_outer in (True, False):
        trainer = _stn_trainer(eval_outer=eval_outer)
        state = trainer.init(key=jax.random.key(3))
        runs[eval_outer] = jax.jit(trainer.step)(
            state, *trainer.sample_batches(state, train, val, 8)
        )
    (after, m_eval), (after_train, m_train) = runs[True], runs[False]
    assert not np.allclose(
        after.model_state["bn"]["mean"][...], state.model_state["bn"]["mean"][...]
    )
    # A train-mode outer loss updates the statistics of its copy only.
    _equal(after.model_state, after_train.model_state)
    assert float(m_eval["outer_loss"]) != pytest.approx(float(m_train["outer_loss"]), rel=1e-4)
    # A poisoned inner batch leaves the statistics of that step unchanged.
    one = _stn_trainer(inner_steps=1)
    s0 = one.init(key=jax.random.key(3))
    inner_b, outer_b = one.sample_batches(s0, train, val, 8)
    s1, m = jax.jit(one.step)(s0, (inner_b[0].at[0].set(jnp.nan), inner_b[1]), outer_b)
    assert int(m["inner_skipped"]) == 1
    _equal(s1.model_state, s0.model_state)
    _equal(s1.params, s0.params)
