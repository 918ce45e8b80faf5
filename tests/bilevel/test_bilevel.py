import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bilevel
import solvers
from bilevel import hparams as H

ETA = 0.1  # inner SGD step
N_INNER = 20


def ridge_problem(dtype=np.float64):
    # The STN known-answer instance: optimum lambda ~ 0.25, clearly interior.
    rs = np.random.RandomState(5)
    dim, n_tr, n_val, noise = 15, 50, 200, 4.0
    w = rs.randn(dim)
    X = rs.randn(n_tr, dim)
    y = X @ w + noise * rs.randn(n_tr)
    Xv = rs.randn(n_val, dim)
    yv = Xv @ w + noise * rs.randn(n_val)
    return tuple(jnp.asarray(a, dtype) for a in (X, y, Xv, yv))


def inner_loss(w, h, batch):
    X, y = batch
    return jnp.mean((X @ w - y) ** 2) + jnp.sum(h["lam"] * w**2)


def outer_loss(w, h, batch):
    X, y = batch
    return jnp.mean((X @ w - y) ** 2)


def hessian(lam, X):
    n, d = X.shape
    return 2 * X.T @ X / n + 2 * jnp.diag(jnp.broadcast_to(lam, (d,)))


def w_star(lam, X, y):
    return jnp.linalg.solve(hessian(lam, X), 2 * X.T @ y / X.shape[0])


def grid_optimum(X, y, Xv, yv, f=None):
    grid = jnp.logspace(-3, 1, 4000)
    f = f or (lambda lam: outer_loss(w_star(lam, X, y), None, (Xv, yv)))
    vals = jax.vmap(f)(grid)
    i = int(jnp.argmin(vals))
    assert 0 < i < len(grid) - 1, "the optimum must be interior to the grid"
    return float(grid[i]), float(vals[i])


def full_batches(X, y, n=N_INNER):
    return jnp.broadcast_to(X, (n, *X.shape)), jnp.broadcast_to(y, (n, *y.shape))


def make_opt(method, space=None, inner_steps=N_INNER, outer_lr=0.05, **kw):
    return bilevel.BilevelOptimizer(
        inner_loss,
        outer_loss,
        inner_optimizer=optax.sgd(ETA),
        outer_optimizer=optax.adam(outer_lr),
        space=space or {"lam": H.log(0.01)},
        method=method,
        inner_steps=inner_steps,
        **kw,
    )


def run(opt, state, X, y, Xv, yv, steps):
    step = jax.jit(opt.step)
    batches = full_batches(X, y, opt.inner_steps)
    for _ in range(steps):
        state, metrics = step(state, batches, (Xv, yv))
    return state, metrics


@pytest.mark.parametrize(
    "method",
    [
        solvers.Implicit(),
        solvers.Implicit(linear_solver=solvers.gmres()),
        solvers.Implicit(linear_solver=solvers.neumann(steps=1, scale=0.2)),  # SOBA-style
        bilevel.Forward(),
    ],
    ids=["implicit-cg", "implicit-gmres", "soba", "forward"],
)
def test_known_answer_ridge_optimal_penalty(method):
    with jax.enable_x64(True):
        X, y, Xv, yv = ridge_problem()
        lam_opt, _ = grid_optimum(X, y, Xv, yv)
        opt = make_opt(method)
        state, _metrics = run(opt, opt.init(jnp.zeros(X.shape[1])), X, y, Xv, yv, 400)
        lam = float(opt.hparams(state)["lam"])
        assert abs(lam / lam_opt - 1) <= 0.05, (lam, lam_opt)
        assert int(state.skipped) == 0 and int(state.inner_skipped) == 0


def truncated_root(X, y, Xv, yv, k):
    """Zero of the K-step truncated hypergradient at the inner fixed point, in closed form.

    From w_0 = w*(lam) held fixed, K SGD steps give dw_K/dlam = -(I - (I - eta A)^K) A^-1 2 w*,
    so g_K(lam) = grad_w L_V(w*)^T dw_K/dlam (Wu et al., 2018: short-horizon bias).
    """

    def g(lam):
        A = hessian(lam, X)
        w = w_star(lam, X, y)
        M = jnp.linalg.matrix_power(jnp.eye(len(w)) - ETA * A, k)
        dw = -(jnp.eye(len(w)) - M) @ jnp.linalg.solve(A, 2 * w)
        return jnp.dot(jax.grad(outer_loss)(w, None, (Xv, yv)), dw)

    grid = jnp.logspace(-3, 1, 4000)
    vals = jax.vmap(g)(grid)
    i = int(jnp.argmax(jnp.diff(jnp.sign(vals)) != 0))
    assert vals[i] < 0 < vals[i + 1]
    return float(grid[i])


@pytest.mark.parametrize("k", [1, 3])
def test_truncated_converges_to_the_truncated_root_not_the_optimum(k):
    with jax.enable_x64(True):
        X, y, Xv, yv = ridge_problem()
        lam_opt, _ = grid_optimum(X, y, Xv, yv)
        root = truncated_root(X, y, Xv, yv, k)
        assert abs(root / lam_opt - 1) > 0.05  # the bias is visible on this problem
        opt = make_opt(solvers.Truncated(steps=k))
        state, _ = run(opt, opt.init(jnp.zeros(X.shape[1])), X, y, Xv, yv, 400)
        lam = float(opt.hparams(state)["lam"])
        assert abs(lam / root - 1) <= 0.02, (lam, root, lam_opt)


def test_per_feature_penalties_beat_best_shared_penalty():
    with jax.enable_x64(True):
        X, y, Xv, yv = ridge_problem()
        _, best_shared_val = grid_optimum(X, y, Xv, yv)
        opt = make_opt(solvers.Implicit(), space={"lam": H.log(jnp.full(X.shape[1], 0.25))})
        state, _ = run(opt, opt.init(jnp.zeros(X.shape[1])), X, y, Xv, yv, 300)
        lam = opt.hparams(state)["lam"]
        val = float(outer_loss(w_star(lam, X, y), None, (Xv, yv)))
        assert val < best_shared_val - 1e-3


def unrolled_reference(u0, X, y, Xv, yv, n_steps, k):
    """Explicit Python unroll of n_steps SGD steps from w=0; gradient through the last k."""

    def f(u):
        w = jnp.zeros(X.shape[1])
        for t in range(n_steps):
            uu = jax.lax.stop_gradient(u) if t < n_steps - k else u
            w = jax.lax.stop_gradient(w) if t == n_steps - k else w
            w = w - ETA * jax.grad(inner_loss)(w, {"lam": jnp.exp(uu)}, (X, y))
        return outer_loss(w, None, (Xv, yv))

    return jax.grad(f)(u0)


@pytest.mark.parametrize(
    "method, k",
    [(bilevel.Forward(), None), (solvers.Truncated(steps=4), 4), (solvers.Unrolled(), None)],
    ids=["forward", "truncated", "unrolled"],
)
def test_online_hypergradients_against_explicit_unroll(method, k):
    with jax.enable_x64(True):
        X, y, Xv, yv = ridge_problem()
        u0 = jnp.log(0.3)
        opt = bilevel.BilevelOptimizer(
            inner_loss,
            outer_loss,
            inner_optimizer=optax.sgd(ETA),
            outer_optimizer=optax.sgd(0.0),
            space={"lam": H.log(0.3)},
            method=method,
            inner_steps=6,
        )
        state = opt.init(jnp.zeros(X.shape[1]))
        batches = full_batches(X, y, 6)
        state, _m1 = opt.step(state, batches, (Xv, yv))
        state, m2 = opt.step(state, batches, (Xv, yv))
        if isinstance(method, bilevel.Forward):
            # Forward mode goes through every inner step since the start: 12 steps.
            want = unrolled_reference(u0, X, y, Xv, yv, 12, 12)
        else:
            # Reverse mode goes through the last k steps of the current cycle only.
            want = unrolled_reference(u0, X, y, Xv, yv, 12, k or 6)
        np.testing.assert_allclose(m2["hypergrad"]["lam"], want, rtol=1e-9)


@pytest.mark.parametrize(
    "method",
    [bilevel.Forward(), solvers.Truncated(steps=5), solvers.Unrolled()],
    ids=["forward", "truncated", "unrolled"],
)
def test_one_shot_hypergradient_unrolled_methods(method):
    with jax.enable_x64(True):
        X, y, Xv, yv = ridge_problem()
        h = {"lam": jnp.asarray(0.3)}
        g = bilevel.hypergradient(
            inner_loss,
            outer_loss,
            jnp.zeros(X.shape[1]),
            h,
            full_batches(X, y, 10),
            (Xv, yv),
            method=method,
            inner_optimizer=optax.sgd(ETA),
        )
        k = method.steps if isinstance(method, solvers.Truncated) else 10
        # d/dlam = d/du / lam with u = log lam.
        want = unrolled_reference(jnp.log(0.3), X, y, Xv, yv, 10, k) / 0.3
        np.testing.assert_allclose(g["lam"], want, rtol=1e-9)


def test_one_shot_implicit_hypergradient_closed_form_and_info():
    with jax.enable_x64(True):
        X, y, Xv, yv = ridge_problem()
        lam = jnp.linspace(0.1, 0.5, X.shape[1])
        w = w_star(lam, X, y)
        g, info = bilevel.hypergradient(
            inner_loss,
            outer_loss,
            w,
            {"lam": lam},
            (X, y),
            (Xv, yv),
            method=solvers.Implicit(linear_solver=solvers.cg(tol=1e-12)),
            return_info=True,
        )
        want = jax.grad(lambda lm: outer_loss(w_star(lm, X, y), None, (Xv, yv)))(lam)
        np.testing.assert_allclose(g["lam"], want, rtol=1e-8)
        assert int(info.status) == solvers.Status.SUCCESS and int(info.linear_iterations) > 0
        _, info = bilevel.hypergradient(
            inner_loss,
            outer_loss,
            w,
            {"lam": lam},
            (X, y),
            (Xv, yv),
            method=solvers.Implicit(linear_solver=solvers.cg(maxiter=2)),
            return_info=True,
        )
        assert int(info.status) == solvers.Status.LINEAR_SOLVE_FAILED
        assert float(info.linear_residual) > 1e-3


def test_warm_start_saves_linear_iterations():
    with jax.enable_x64(True):
        rs = np.random.RandomState(0)
        X = jnp.asarray(rs.randn(150, 100) * np.logspace(0, -1.5, 100))  # ill-conditioned
        y = X @ jnp.asarray(rs.randn(100)) + 0.5 * jnp.asarray(rs.randn(150))
        Xv = jnp.asarray(rs.randn(100, 100) * np.logspace(0, -1.5, 100))
        yv = Xv @ jnp.asarray(rs.randn(100))
        iters = {}
        for warm in (True, False):
            opt = make_opt(
                solvers.Implicit(linear_solver=solvers.cg(tol=1e-6), warm_start=warm), outer_lr=0.01
            )
            step = jax.jit(opt.step)
            state = opt.init(jnp.zeros(X.shape[1]))
            counts = []
            for _ in range(40):
                state, m = step(state, full_batches(X, y), (Xv, yv))
                counts.append(int(m["linear_iterations"]))
            iters[warm] = np.mean(counts[5:])
        assert iters[True] < 0.8 * iters[False], iters


def test_population_vmap_equals_loop():
    X, y, Xv, yv = ridge_problem(np.float32)
    opt = make_opt(solvers.Implicit(), inner_steps=5)
    us = [H.unconstrain(opt.space, {"lam": v}) for v in (0.01, 0.1, 1.0)]
    states = [opt.init(jnp.zeros(X.shape[1]), hparams=u) for u in us]
    batched = jax.tree.map(lambda *a: jnp.stack(a), *states)
    batches = full_batches(X, y, 5)
    step = jax.jit(opt.step)
    vstep = jax.jit(jax.vmap(opt.step, in_axes=(0, None, None)))
    for _ in range(5):
        batched, _ = vstep(batched, batches, (Xv, yv))
        states = [step(s, batches, (Xv, yv))[0] for s in states]
    for i, s in enumerate(states):
        np.testing.assert_allclose(batched.hparams["lam"][i], s.hparams["lam"], rtol=1e-5)
        np.testing.assert_allclose(batched.params[i], s.params, rtol=1e-4, atol=1e-6)


def test_no_retrace_on_second_step():
    X, y, Xv, yv = ridge_problem(np.float32)
    for method in (solvers.Implicit(), solvers.Truncated(steps=2), bilevel.Forward()):
        opt = make_opt(method, inner_steps=4)
        traces = []

        def traced_step(state, b, v, opt=opt, traces=traces):
            traces.append(1)
            return opt.step(state, b, v)

        step = jax.jit(traced_step)
        state = opt.init(jnp.zeros(X.shape[1]))
        state, _ = step(state, full_batches(X, y, 4), (Xv, yv))
        state, _ = step(state, full_batches(X, y, 4), (Xv, yv))
        assert len(traces) == 1


def test_bad_input_errors():
    X, y, Xv, yv = ridge_problem(np.float32)
    opt = make_opt(solvers.Implicit(), inner_steps=4)
    state = opt.init(jnp.zeros(X.shape[1]))
    with pytest.raises(ValueError, match="leading axis of length inner_steps=4"):
        opt.step(state, full_batches(X, y, 3), (Xv, yv))
    bad = bilevel.BilevelOptimizer(
        lambda w, h, b: inner_loss(w, h, b) + h["decay"] * 0.0,
        outer_loss,
        inner_optimizer=optax.sgd(0.1),
        outer_optimizer=optax.sgd(0.1),
        space={"lam": H.log(0.1)},
        method=solvers.Implicit(),
        inner_steps=4,
    )
    with pytest.raises(KeyError, match="space lacks"):
        bad.step(bad.init(jnp.zeros(X.shape[1])), full_batches(X, y, 4), (Xv, yv))
    with pytest.raises(ValueError, match="there are only 4"):
        make_opt(solvers.Truncated(steps=5), inner_steps=4)
    with pytest.raises(TypeError, match="method"):
        make_opt("implicit")
    with pytest.raises(ValueError, match="inner_steps"):
        make_opt(solvers.Implicit(), inner_steps=0)
    with pytest.raises(ValueError, match="does not match the space"):
        opt.init(jnp.zeros(X.shape[1]), hparams={"decay": jnp.zeros(())})
    with pytest.raises(ValueError):
        bilevel.Forward(decay=0.0)
    with pytest.raises(TypeError, match="scalar"):
        bilevel.BilevelOptimizer(
            lambda w, h, b: b[0] @ w,
            outer_loss,
            inner_optimizer=optax.sgd(0.1),
            outer_optimizer=optax.sgd(0.1),
            space={"lam": H.log(0.1)},
            method=solvers.Implicit(),
            inner_steps=4,
        ).step(state, full_batches(X, y, 4), (Xv, yv))


@pytest.mark.parametrize(
    "method",
    [solvers.Implicit(), solvers.Truncated(steps=2), bilevel.Forward()],
    ids=["implicit", "truncated", "forward"],
)
def test_nonfinite_hypergradient_is_skipped_and_counted(method):
    X, y, Xv, yv = ridge_problem(np.float32)
    opt = make_opt(method, inner_steps=4)
    step = jax.jit(opt.step)
    state = opt.init(jnp.zeros(X.shape[1]))
    state, _ = step(state, full_batches(X, y, 4), (Xv, yv))
    u_before = state.hparams
    poisoned = (Xv.at[0, 0].set(jnp.nan), yv)
    state, metrics = step(state, full_batches(X, y, 4), poisoned)
    assert int(metrics["skipped"]) == 1 and int(state.skipped) == 1
    np.testing.assert_array_equal(state.hparams["lam"], u_before["lam"])
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(state))
    # A poisoned training batch: the inner steps are not applied, params stay finite.
    bad_inner = full_batches(X.at[0, 0].set(jnp.inf), y, 4)
    state, metrics = step(state, bad_inner, (Xv, yv))
    assert int(metrics["inner_skipped"]) == 4
    assert bool(jnp.all(jnp.isfinite(state.params)))


class MLP(nnx.Module):
    def __init__(self, din, dout, *, rngs):
        self.l1 = nnx.Linear(din, 16, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)
        self.l2 = nnx.Linear(16, dout, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.drop(nnx.relu(self.l1(x))))


def test_flax_nnx_model_with_dropout_and_per_layer_weight_decay():
    X, y, Xv, yv = ridge_problem(np.float32)
    model = MLP(X.shape[1], 1, rngs=nnx.Rngs(0, dropout=1))
    apply_fn, params = bilevel.nnx_apply_fn(model)
    model.eval()
    eval_fn, _ = bilevel.nnx_apply_fn(model)

    def inner(p, h, batch):
        pred = apply_fn(p, batch["x"], key=batch["key"])[:, 0]
        decay = h["wd_l1"] * jnp.sum(p["l1"]["kernel"] ** 2) + h["wd_l2"] * jnp.sum(
            p["l2"]["kernel"] ** 2
        )
        return jnp.mean((pred - batch["y"]) ** 2) + decay

    def outer(p, h, batch):
        return jnp.mean((eval_fn(p, batch["x"])[:, 0] - batch["y"]) ** 2)

    opt = bilevel.BilevelOptimizer(
        inner,
        outer,
        inner_optimizer=optax.adam(1e-2),
        outer_optimizer=optax.adam(0.05),
        space={"wd_l1": H.log(1e-3), "wd_l2": H.log(1e-3)},
        method=solvers.Implicit(),
        inner_steps=5,
    )
    state = opt.init(params, key=jax.random.key(0))
    step = jax.jit(opt.step)
    data = {"x": X, "y": y}
    first = None
    for _ in range(30):
        batches = bilevel.minibatches(data, state.key, state.step, 25, 5)
        batches["key"] = jax.random.split(jax.random.fold_in(state.key, state.step), 5)
        state, metrics = step(state, batches, {"x": Xv, "y": yv})
        first = float(metrics["outer_loss"]) if first is None else first
    assert float(metrics["outer_loss"]) < first
    hs = opt.hparams(state)
    assert float(hs["wd_l1"]) != pytest.approx(1e-3) and float(hs["wd_l2"]) != pytest.approx(1e-3)

    # Through nnx_apply_fn (evaluation mode) and through a hand-written pure function, the
    # implicit hypergradient is the same.
    def decay(p, h):
        return h["wd_l1"] * jnp.sum(p["l1"]["kernel"] ** 2) + h["wd_l2"] * jnp.sum(
            p["l2"]["kernel"] ** 2
        )

    def inner_eval(p, h, batch):
        return jnp.mean((eval_fn(p, batch["x"])[:, 0] - batch["y"]) ** 2) + decay(p, h)

    def manual_predict(p, x):
        return (
            jax.nn.relu(x @ p["l1"]["kernel"] + p["l1"]["bias"]) @ p["l2"]["kernel"]
            + p["l2"]["bias"]
        )[:, 0]

    def manual_inner(p, h, batch):
        return jnp.mean((manual_predict(p, batch["x"]) - batch["y"]) ** 2) + decay(p, h)

    def manual_outer(p, h, batch):
        return jnp.mean((manual_predict(p, batch["x"]) - batch["y"]) ** 2)

    trained = state.params
    plain = {k: {n: trained[k][n][...] for n in ("kernel", "bias")} for k in ("l1", "l2")}
    h = {"wd_l1": jnp.float32(0.01), "wd_l2": jnp.float32(0.02)}
    ib, ob = {"x": X, "y": y}, {"x": Xv, "y": yv}
    # Jitted: one compile each, not many small eager ones.
    g_nnx = jax.jit(functools.partial(bilevel.hypergradient, inner_eval, outer))(trained, h, ib, ob)
    g_manual = jax.jit(functools.partial(bilevel.hypergradient, manual_inner, manual_outer))(
        plain, h, ib, ob
    )
    np.testing.assert_allclose(g_nnx["wd_l1"], g_manual["wd_l1"], rtol=1e-4)
    np.testing.assert_allclose(g_nnx["wd_l2"], g_manual["wd_l2"], rtol=1e-4)


def test_checkpoint_resume_is_bit_identical(tmp_path):
    X, y, Xv, yv = ridge_problem(np.float32)
    opt = make_opt(solvers.Implicit(), inner_steps=3)
    step = jax.jit(opt.step)
    data = (X, y)

    def train(state, n):
        for _ in range(n):
            batches = bilevel.minibatches(data, state.key, state.step, 16, 3)
            state, _ = step(state, batches, (Xv, yv))
        return state

    start = opt.init(jnp.zeros(X.shape[1]), key=jax.random.key(42))
    straight = train(start, 8)
    half = train(start, 4)
    bilevel.save_checkpoint(tmp_path / "run", half, int(half.step))
    restored, at = bilevel.restore_checkpoint(tmp_path / "run", like=start)
    assert at == 4
    resumed = train(restored, 4)
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


SHARDING_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import bilevel, solvers
    from bilevel import hparams as H
    assert jax.device_count() == 4, jax.devices()
    rs = np.random.RandomState(0)
    X = jnp.asarray(rs.randn(64, 8), jnp.float32); y = jnp.asarray(rs.randn(64), jnp.float32)
    Xv = jnp.asarray(rs.randn(32, 8), jnp.float32); yv = jnp.asarray(rs.randn(32), jnp.float32)
    inner = lambda w, h, b: jnp.mean((b[0] @ w - b[1]) ** 2) + h["lam"] * jnp.sum(w ** 2)
    outer = lambda w, h, b: jnp.mean((b[0] @ w - b[1]) ** 2)
    for method in (solvers.Implicit(), solvers.Truncated(steps=2), bilevel.Forward()):
        opt = bilevel.BilevelOptimizer(inner, outer, inner_optimizer=optax.sgd(0.1),
            outer_optimizer=optax.adam(0.05), space={"lam": H.log(0.1)}, method=method,
            inner_steps=3)
        batches = (jnp.stack([X] * 3), jnp.stack([y] * 3))
        step = jax.jit(opt.step)
        s1 = opt.init(jnp.zeros(8))
        for _ in range(5):
            s1, _ = step(s1, batches, (Xv, yv))
        mesh = Mesh(np.array(jax.devices()), ("data",))
        data_sh = NamedSharding(mesh, P(None, "data"))
        val_sh = NamedSharding(mesh, P("data"))
        sb = jax.device_put(batches, data_sh)
        sv = jax.device_put((Xv, yv), val_sh)
        s2 = opt.init(jnp.zeros(8))
        for _ in range(5):
            s2, _ = step(s2, sb, sv)
        assert len(sb[0].sharding.device_set) == 4
        np.testing.assert_allclose(s2.hparams["lam"], s1.hparams["lam"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s2.params, s1.params, rtol=1e-4, atol=1e-6)

        # A population of 8 tuners: its leading axis sharded over the 4 devices.
        lams = jnp.logspace(-3, 0, 8)
        pop = jax.vmap(lambda lam: opt.init(jnp.zeros(8), hparams={"lam": jnp.log(lam)}))(lams)
        vstep = jax.jit(jax.vmap(opt.step, in_axes=(0, None, None)))
        p1 = pop
        for _ in range(3):
            p1, _ = vstep(p1, batches, (Xv, yv))
        p2 = jax.device_put(pop, NamedSharding(mesh, P("data")))
        for _ in range(3):
            p2, _ = vstep(p2, batches, (Xv, yv))
        assert len(p2.params.sharding.device_set) == 4
        np.testing.assert_allclose(p2.hparams["lam"], p1.hparams["lam"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(p2.params, p1.params, rtol=1e-4, atol=1e-6)
    print("SHARDING OK")
    """
)


def test_data_parallel_sharding_matches_single_device():
    env = dict(
        os.environ,
        XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
    )
    out = subprocess.run(
        [sys.executable, "-c", SHARDING_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SHARDING OK" in out.stdout


@pytest.mark.parametrize(
    "method",
    [solvers.Implicit(), solvers.Truncated(steps=2), solvers.Unrolled(), bilevel.Forward()],
    ids=["implicit", "truncated", "unrolled", "forward"],
)
def test_shared_inner_batch_equals_repeated_batches(method):
    X, y, Xv, yv = ridge_problem(np.float32)
    opt = make_opt(method, inner_steps=4)
    step = jax.jit(opt.step)
    a = b = opt.init(jnp.zeros(X.shape[1]))
    for _ in range(3):
        a, ma = step(a, full_batches(X, y, 4), (Xv, yv))
        b, mb = step(b, (X[None], y[None]), (Xv, yv))
    np.testing.assert_allclose(a.hparams["lam"], b.hparams["lam"], rtol=1e-6)
    np.testing.assert_allclose(a.params, b.params, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ma["inner_loss"], mb["inner_loss"], rtol=1e-6)


@pytest.mark.parametrize(
    "method",
    [solvers.Implicit(), solvers.Truncated(steps=2), bilevel.Forward()],
    ids=["implicit", "truncated", "forward"],
)
def test_has_aux_losses(method):
    X, y, Xv, yv = ridge_problem(np.float32)

    def inner(w, h, b):
        return inner_loss(w, h, b), {"w_norm": jnp.linalg.norm(w)}

    def outer(w, h, b):
        return outer_loss(w, h, b), {"max_abs_err": jnp.max(jnp.abs(b[0] @ w - b[1]))}

    opt = bilevel.BilevelOptimizer(
        inner,
        outer,
        inner_optimizer=optax.sgd(ETA),
        outer_optimizer=optax.adam(0.05),
        space={"lam": H.log(0.01)},
        method=method,
        inner_steps=3,
        has_aux=True,
    )
    plain = make_opt(method, inner_steps=3)
    a, ma = opt.step(opt.init(jnp.zeros(X.shape[1])), full_batches(X, y, 3), (Xv, yv))
    b, mb = plain.step(plain.init(jnp.zeros(X.shape[1])), full_batches(X, y, 3), (Xv, yv))
    np.testing.assert_allclose(a.hparams["lam"], b.hparams["lam"], rtol=1e-6)
    np.testing.assert_allclose(ma["inner_aux"]["w_norm"], jnp.linalg.norm(a.params), rtol=1e-5)
    want = jnp.max(jnp.abs(Xv @ a.params - yv))
    np.testing.assert_allclose(ma["outer_aux"]["max_abs_err"], want, rtol=1e-5)
    assert "inner_aux" not in mb


def test_init_inside_jit_and_nonfinite_hparams():
    X = ridge_problem(np.float32)[0]
    opt = make_opt(solvers.Implicit(), inner_steps=2)
    u = H.unconstrain(opt.space, {"lam": 0.1})
    state = jax.jit(lambda p: opt.init(p, hparams=u))(jnp.zeros(X.shape[1]))
    np.testing.assert_allclose(opt.hparams(state)["lam"], 0.1, rtol=1e-6)
    with pytest.raises(ValueError, match="non-finite"):
        opt.init(jnp.zeros(X.shape[1]), hparams={"lam": jnp.float32(jnp.nan)})
