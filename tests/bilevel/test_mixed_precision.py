"""Mixed precision: bfloat16 parameters and activations, float32 hyperparameters and state.

The policy (docs/mixed_precision.md): hyperparameters, their optimizer state, hd learning rates,
the hd rule's accumulators and linear-solve vectors are float32 whatever the parameters' dtype;
only parameters, activations and the updates applied to them are bfloat16.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bilevel
import solvers
from bilevel import hparams as hp
from bilevel import stn
from tests._docs_examples import ROOT, run_example

F32, BF16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)


def float_dtypes(tree):
    """The dtypes of the floating leaves of ``tree``."""
    return {
        jnp.dtype(leaf.dtype)
        for leaf in jax.tree.leaves(tree)
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)
    }


def cosine(a, b):
    a = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(a)])
    b = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(b)])
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def regression():
    k = jax.random.split(jax.random.key(0), 3)
    X = jax.random.normal(k[0], (96, 8))
    y = X @ jax.random.normal(k[1], (8,)) + 0.3 * jax.random.normal(k[2], (96,))
    return (X[:64], y[:64]), (X[64:], y[64:])


def mse(w, b):
    X, y = b
    r = X.astype(w.dtype) @ w - y.astype(w.dtype)
    return jnp.mean((r * r).astype(jnp.float32))


def inner_loss(w, h, b):
    return mse(w, b) + jnp.sum(h["wd"] * (w * w).astype(jnp.float32))


def outer_loss(w, h, b):
    return mse(w, b)


METHODS = {
    "implicit_cg": lambda: solvers.Implicit(linear_solver=solvers.cg(tol=1e-5)),
    "soba": lambda: solvers.Implicit(linear_solver=solvers.neumann(steps=1, scale=0.1)),
    "truncated": lambda: solvers.Truncated(steps=3),
    "unrolled": lambda: solvers.Unrolled(),
    "forward": lambda: bilevel.Forward(decay=0.9),
}


def run_bilevel(method, dtype, inner_optimizer=None, steps=3):
    train, val = regression()
    opt = bilevel.BilevelOptimizer(
        inner_loss,
        outer_loss,
        inner_optimizer=inner_optimizer or optax.sgd(0.05),
        outer_optimizer=optax.adam(0.05),
        space={"wd": hp.log(jnp.full(8, 0.1))},
        method=method,
        inner_steps=5,
    )
    state = opt.init(jnp.zeros(8, dtype))
    grads = []
    for _ in range(steps):
        state, metrics = opt.step(state, jax.tree.map(lambda a: a[None], train), val)
        assert solvers.Status(int(metrics["status"])) != solvers.Status.NONFINITE
        grads.append(metrics["hypergrad"])
    return state, grads, metrics


@pytest.mark.parametrize("name", list(METHODS))
def test_bilevel_bfloat16_hypergradient_tracks_float32(name):
    state32, grads32, _ = run_bilevel(METHODS[name](), jnp.float32)
    state16, grads16, metrics = run_bilevel(METHODS[name](), jnp.bfloat16)
    assert state16.params.dtype == BF16 and state32.params.dtype == F32
    for step, (g32, g16) in enumerate(zip(grads32, grads16, strict=True)):
        assert cosine(g16, g32) >= 0.99, (name, step)
    # hyperparameters, their optimizer state and the hypergradient never in bfloat16
    assert float_dtypes((state16.hparams, state16.outer_state)) == {F32}
    assert float_dtypes((metrics["hypergrad"], metrics["hparams"])) == {F32}
    np.testing.assert_allclose(
        np.asarray(state16.hparams["wd"]), np.asarray(state32.hparams["wd"]), atol=2e-2
    )


def test_bilevel_bfloat16_with_hd_inner_optimizer_keeps_the_rate_float32():
    method = METHODS["implicit_cg"]()
    state32, grads32, _ = run_bilevel(method, jnp.float32, bilevel.hd_sgd(0.05))
    state16, grads16, _ = run_bilevel(method, jnp.bfloat16, bilevel.hd_sgd(0.05))
    assert float_dtypes(state16.inner_state) == {F32}
    assert float_dtypes((state16.hparams, state16.outer_state)) == {F32}
    lr16 = optax.tree_utils.tree_get(state16.inner_state, "learning_rate")
    lr32 = optax.tree_utils.tree_get(state32.inner_state, "learning_rate")
    assert float(lr16) != 0.05  # the rate moved
    np.testing.assert_allclose(float(lr16), float(lr32), rtol=2e-2)
    assert cosine(grads16[-1], grads32[-1]) >= 0.99


# ----------------------------------------------------------------------------- hd optimizers


def adam_second_moment(tx, dtype, steps=3000):
    """Adam's second moment after 1000 unit normal gradients and 2000 a tenth that size."""
    rng = np.random.default_rng(0)
    params = jnp.zeros(4, dtype)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for t in range(steps):
        g = jnp.asarray(rng.normal(size=4) * (1.0 if t < 1000 else 0.1), dtype)
        _, state = update(g, state, params)
    return state


def test_naive_bfloat16_adam_state_fails_the_checks_hd_adam_passes():
    """The checks can fail: optax's Adam on bfloat16 params keeps bfloat16 moments, whose
    second moment never decays (b2 = 0.999 rounds to 1); hd_adam keeps them in float32."""
    naive = adam_second_moment(optax.scale_by_adam(), jnp.bfloat16)
    reference = adam_second_moment(optax.scale_by_adam(), jnp.float32)
    assert float_dtypes(naive) == {BF16}  # the dtype assertion below would fail
    assert np.all(np.asarray(naive.nu, np.float32) > 3 * np.asarray(reference.nu))

    hd = adam_second_moment(bilevel.hd_adam(1e-3), jnp.bfloat16)
    assert float_dtypes(hd) == {F32}
    np.testing.assert_allclose(hd.inner_state.nu, reference.nu, rtol=1e-2)


def quadratic(dtype):
    scales = jnp.asarray(np.geomspace(1.0, 10.0, 16), jnp.float32)

    def loss(w):
        return 0.5 * jnp.sum(scales * (w.astype(jnp.float32) - 1.0) ** 2)

    return jnp.zeros(16, dtype), loss


@pytest.mark.parametrize("factory", ["hd_adam", "hd_sgd"])
def test_hd_bfloat16_trajectory_tracks_float32(factory):
    make = {
        "hd_adam": lambda: bilevel.hd_adam(1e-2),
        "hd_sgd": lambda: bilevel.hd_sgd(1e-3, momentum=0.9),
    }[factory]
    runs = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        w, loss = quadratic(dtype)
        tx = make()
        state = tx.init(w)

        @jax.jit
        def step(w, state, tx=tx, loss=loss):
            updates, state = tx.update(jax.grad(loss)(w), state, w)
            return optax.apply_updates(w, updates), state

        rates, losses = [], []
        for _ in range(150):
            w, state = step(w, state)
            rates.append(float(optax.tree_utils.tree_get(state, "learning_rate")))
            losses.append(float(loss(w)))
        assert w.dtype == jnp.dtype(dtype)
        assert float_dtypes(state) == {F32}
        runs[jnp.dtype(dtype)] = np.array(rates), np.array(losses)
    (r32, l32), (r16, l16) = runs[F32], runs[BF16]
    assert np.max(np.abs(np.log(r32 / r32[0]))) > np.log(3)  # the rate adapted
    # until the rate is cut near the optimum (then both runs oscillate at their own rounding)
    np.testing.assert_allclose(r16[:40], r32[:40], rtol=5e-2)
    assert l16[-1] < 1e-2 * l16[0] and l32[-1] < 1e-2 * l32[0]


def test_inject_hyperparams_with_float32_hyperparam_dtype_keeps_the_exact_rate():
    params = jnp.zeros(4, jnp.bfloat16)
    tx = optax.inject_hyperparams(bilevel.hd_adam, hyperparam_dtype=jnp.float32)(learning_rate=1e-3)
    state = tx.init(params)
    _, state = tx.update(jnp.ones(4, jnp.bfloat16), state, params)
    lr = optax.tree_utils.tree_get(state.inner_state, "learning_rate")
    assert lr.dtype == F32 and state.hyperparams["learning_rate"].dtype == F32
    assert float(state.inner_state.schedule_value) == float(jnp.float32(1e-3))


# ----------------------------------------------------------------------------- spaces, solvers


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_hyperparameter_inits_are_stored_float32(dtype):
    space = {"wd": hp.log(jnp.asarray([1e-3, 0.5], dtype)), "p": hp.unit(jnp.asarray(0.1, dtype))}
    assert float_dtypes(hp.init(space)) == {F32}
    values = {"wd": jnp.asarray([1e-2, 0.3], dtype), "p": jnp.asarray(0.2, dtype)}
    assert float_dtypes(hp.unconstrain(space, values)) == {F32}


@pytest.mark.parametrize("make", [solvers.cg, solvers.gmres, solvers.bicgstab, solvers.direct])
def test_low_precision_linear_systems_are_solved_in_float32(make):
    k1, k2 = jax.random.split(jax.random.key(1))
    A = jax.random.normal(k1, (20, 20))
    A = A @ A.T / 20 + jnp.eye(20)
    b = jax.random.normal(k2, (20,))
    A16, b16 = A.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    seen = []

    def matvec(v):
        seen.append(v.dtype)
        return A16 @ v

    x, stats = make()(matvec, b16, init=jnp.zeros(20, jnp.float32))
    assert x.dtype == BF16 and stats.residual.dtype == F32
    assert set(seen) == {BF16}  # the operator's domain is the dtype of b
    # the float32 solve of the bfloat16 operator: x is the exact solution up to bfloat16
    # rounding of the operator and of x (a bfloat16 iteration stalls at about 1e-2)
    exact = jnp.linalg.solve(A16.astype(jnp.float32), b16.astype(jnp.float32))
    assert float(jnp.linalg.norm(x.astype(jnp.float32) - exact) / jnp.linalg.norm(exact)) < 8e-3


# ----------------------------------------------------------------------------- stn


@pytest.mark.parametrize("rank", [None, 2])
def test_stn_layers_bfloat16_activations_float32_gates(rank):
    layer = stn.StnLinear(
        4,
        3,
        2,
        param_dtype=jnp.bfloat16,
        response_rank=rank,
        hnet_init=nnx.initializers.normal(1.0),
        rngs=nnx.Rngs(0),
    )
    x, hnet = jnp.ones((5, 4), jnp.bfloat16), jnp.full((5, 2), 0.3, jnp.float32)
    assert layer(x, hnet).dtype == BF16 and layer(x, hnet[0]).dtype == BF16
    conv = stn.StnConv(1, 2, 3, 2, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert conv(jnp.ones((2, 6, 6, 1), jnp.bfloat16), hnet[:2]).dtype == BF16
    g = jax.grad(lambda h: jnp.sum(layer(x, h).astype(jnp.float32)))(hnet)
    assert g.dtype == F32 and np.all(np.isfinite(g)) and np.any(g != 0)
    assert stn.effective_l2(layer, hnet).dtype == F32  # a reduction: accumulated in float32


def run_stn(dtype):
    X = jax.random.normal(jax.random.key(0), (32, 4))
    y = X @ jnp.ones((4, 1)) / 2

    def predict(m, h, b):
        return m(b[0].astype(dtype), h.hnet).astype(jnp.float32)

    def inner(m, h, b, key):
        err = jnp.mean((predict(m, h, b) - b[1]) ** 2)
        return err + jnp.mean(h["wd"] * stn.effective_l2(m, h.hnet))

    def outer(m, h, b):
        return jnp.mean((predict(m, h, b) - b[1]) ** 2)

    trainer = stn.Trainer(
        stn.StnLinear(4, 1, 1, param_dtype=dtype, rngs=nnx.Rngs(0)),
        inner,
        outer,
        space={"wd": hp.log(0.1)},
        inner_optimizer=bilevel.hd_adam(1e-2),
        outer_optimizer=optax.adam(3e-2),
        method=stn.DeltaSTN(),
        inner_steps=4,
    )
    state = trainer.init(key=jax.random.key(1))
    batches = jax.tree.map(lambda a: jnp.stack([a] * 4), (X, y))
    step = jax.jit(trainer.step)
    for _ in range(4):
        state, metrics = step(state, batches, (X[None], y[None]))
        assert int(metrics["status"]) == int(solvers.Status.SUCCESS)
    return trainer, state


def test_stn_trainer_bfloat16_model_keeps_hyperparameters_float32():
    trainer32, state32 = run_stn(jnp.float32)
    trainer16, state16 = run_stn(jnp.bfloat16)
    assert float_dtypes(state16.params) == {BF16}
    assert float_dtypes((state16.hparams, state16.scale, state16.outer_state)) == {F32}
    assert float_dtypes(state16.inner_state) == {F32}  # hd_adam's rate and moments
    wd16 = float(trainer16.hparams(state16)["wd"])
    wd32 = float(trainer32.hparams(state32)["wd"])
    assert wd32 != 0.1  # the hyperparameter moved
    np.testing.assert_allclose(np.log(wd16 / 0.1), np.log(wd32 / 0.1), rtol=0.1)


# ----------------------------------------------------------------------------- the docs page


def test_the_docs_example_runs_as_written():
    page = (ROOT / "docs" / "mixed_precision.md").read_text()
    stdout = run_example("mixed_precision.md", "bf16", max_lines=30)
    assert "params bfloat16, hyperparameters float32, hd learning rate float32" in stdout
    numbers = [float(v) for v in re.findall(r"\d+\.\d+", stdout)]
    cosine, loss32, loss16 = numbers
    assert cosine >= 0.99 and loss16 == pytest.approx(loss32, rel=0.05)
    printed = re.search(r"It prints .*?\n\n```text\n(.*?)```", page, re.S)
    assert printed, "docs/mixed_precision.md lost the example's output"
    shown = [float(v) for v in re.findall(r"\d+\.\d+", printed.group(1))]
    np.testing.assert_allclose(shown, numbers, rtol=0.02)
