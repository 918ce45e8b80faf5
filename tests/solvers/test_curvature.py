"""Gauss-Newton curvature (solvers.GaussNewton) and automatic damping (solvers.cg(ridge="auto"))."""

import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel
import solvers
from tests._docs_examples import ROOT, run_example

# ----------------------------------------------------------------------------- tiny problems


def _mlp_params(key, sizes, dtype=jnp.float64):
    params = []
    for k, (m, n) in zip(
        jax.random.split(key, len(sizes) - 1), itertools.pairwise(sizes), strict=True
    ):
        params.append(
            {"w": jax.random.normal(k, (m, n), dtype) / np.sqrt(m), "b": jnp.zeros(n, dtype)}
        )
    return params


def _mlp(params, h, batch):
    del h
    x = batch[0]
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def _xent(logits, h, batch):
    del h
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * jax.nn.one_hot(batch[1], 3), -1))


def _decay(params, h, batch):
    del batch
    return h * sum(jnp.sum(layer["w"] ** 2) for layer in params)


def _data(key, n=12, d=4, dtype=jnp.float64):
    kx, ky = jax.random.split(key)
    return jax.random.normal(kx, (n, d), dtype), jax.random.randint(ky, (n,), 0, 3)


def _dense(matvec, like):
    flat, unravel = jax.flatten_util.ravel_pytree(like)
    mv = lambda v: jax.flatten_util.ravel_pytree(matvec(unravel(v)))[0]
    return jax.vmap(mv, out_axes=1)(jnp.eye(flat.size, dtype=flat.dtype))


# ----------------------------------------------------------------------------- Gauss-Newton


def test_gauss_newton_matvec_equals_dense_jt_h_j():
    with jax.enable_x64(True):
        params = _mlp_params(jax.random.key(0), [4, 5, 3])
        batch = _data(jax.random.key(1))
        h = jnp.asarray(0.01)
        gn = solvers.GaussNewton(_mlp, _xent, _decay)
        # Jitted: one compile each, not hundreds of eager operations.
        G = jax.jit(lambda p: _dense(gn.matvec(p, h, batch), p))(params)
        flat, unravel = jax.flatten_util.ravel_pytree(params)
        out = lambda f: _mlp(unravel(f), h, batch).reshape(-1)
        J = jax.jit(jax.jacfwd(out))(flat)
        logits = out(flat)
        H_out = jax.jit(jax.hessian(lambda o: _xent(o.reshape(-1, 3), h, batch)))(logits)
        H_reg = jax.jit(jax.hessian(lambda f: _decay(unravel(f), h, batch)))(flat)
        np.testing.assert_allclose(G, J.T @ H_out @ J + H_reg, atol=1e-12)
        np.testing.assert_allclose(
            gn.loss(params, h, batch),
            _xent(logits.reshape(-1, 3), h, batch) + _decay(params, h, batch),
        )


def test_gauss_newton_is_psd_where_the_hessian_is_not():
    with jax.enable_x64(True):
        params = _mlp_params(jax.random.key(2), [4, 8, 3])
        params = jax.tree.map(lambda a: 3.0 * a, params)  # far from a minimum: indefinite
        batch = _data(jax.random.key(3), n=20)
        h = jnp.asarray(0.0)
        gn = solvers.GaussNewton(_mlp, _xent)
        hess = jax.hessian(lambda p: gn.loss(p, h, batch))
        flat, unravel = jax.flatten_util.ravel_pytree(params)
        H = jax.jit(jax.hessian(lambda f: gn.loss(unravel(f), h, batch)))(flat)
        del hess
        mv = gn.matvec(params, h, batch)
        # v^T G v, jitted: one compile (batched) for the random directions, one for e below.
        vgv = jax.jit(lambda v: v @ jax.flatten_util.ravel_pytree(mv(unravel(v)))[0])
        vs = jax.random.normal(jax.random.key(4), (200, flat.size), jnp.float64)
        vGv = jax.vmap(vgv)(vs)
        # Directions of negative Hessian curvature exist (the eigenvector of the smallest
        # eigenvalue, and some of the random ones) ...
        evals, evecs = jnp.linalg.eigh(H)
        assert evals[0] < -1e-3 * evals[-1]
        vHv = jnp.concatenate(
            [jnp.einsum("ki,ij,kj->k", vs, H, vs), evecs[:, :1].T @ H @ evecs[:, 0]]
        )
        assert jnp.min(vHv) < 0
        # ... but never of Gauss-Newton curvature, not even along that eigenvector.
        e = evecs[:, 0]
        eGe = vgv(e)
        assert jnp.min(vGv) >= -1e-12 and eGe >= -1e-12


def _hypergradient(inner, outer, params, h, *batches, **kw):
    """``bilevel.hypergradient``, jitted: one compile, not many small eager ones."""
    fn = lambda p, hh, *b: bilevel.hypergradient(inner, outer, p, hh, *b, **kw)
    return jax.jit(fn)(params, h, *batches)


def _linear(params, h, batch):
    return batch[0] @ params["w"] + params["b"]


@pytest.mark.parametrize("loss", ["squares", "softmax"])
def test_gauss_newton_equals_hessian_for_a_linear_model(loss):
    """A linear model has no second derivative: G is the Hessian, so the hypergradients agree."""
    with jax.enable_x64(True):
        X, y = _data(jax.random.key(5), n=30, d=4)
        Xv, yv = _data(jax.random.key(6), n=20, d=4)
        if loss == "squares":
            out_loss = lambda o, h, b: 0.5 * jnp.mean((o - jax.nn.one_hot(b[1], 3)) ** 2)
        else:
            out_loss = _xent
        reg = lambda p, h, b: h["wd"] * jnp.sum(p["w"] ** 2)
        gn = solvers.GaussNewton(_linear, out_loss, reg)
        inner = gn.loss
        outer = lambda p, h, b: _xent(_linear(p, h, b), h, b)
        w0 = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
        h = {"wd": jnp.asarray(0.05)}
        w = jax.jit(lambda w0: solvers.argmin(
            lambda p: inner(p, h, (X, y)), w0, optimizer=optax.lbfgs(), steps=200, tol=1e-12,
            adjoint=solvers.Unrolled(),
        ))(w0)  # fmt: skip
        solver = solvers.cg(tol=1e-13, maxiter=200)
        kw = dict(inner_batch=(X, y), outer_batch=(Xv, yv))
        g_h = _hypergradient(
            inner, outer, w, h, method=solvers.Implicit(linear_solver=solver), **kw
        )
        g_gn = _hypergradient(
            inner, outer, w, h, method=solvers.Implicit(linear_solver=solver, curvature=gn), **kw
        )
        np.testing.assert_allclose(g_gn["wd"], g_h["wd"], rtol=1e-10)
        assert abs(float(g_h["wd"])) > 1e-4


def test_gauss_newton_differs_from_hessian_on_an_mlp():
    """On a network the two curvatures give different hypergradients (the test above can fail)."""
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: 3.0 * a, _mlp_params(jax.random.key(7), [4, 8, 3]))
        batch, val = _data(jax.random.key(8), n=20), _data(jax.random.key(9), n=20)
        gn = solvers.GaussNewton(_mlp, _xent, _decay)
        h = jnp.asarray(0.5)
        outer = lambda p, h, b: _xent(_mlp(p, h, b), h, b)
        solver = solvers.cg(tol=1e-10, ridge=1e-3, maxiter=500)
        kw = dict(inner_batch=batch, outer_batch=val)
        g_h = _hypergradient(
            gn.loss, outer, params, h, method=solvers.Implicit(linear_solver=solver), **kw
        )
        g_gn = _hypergradient(
            gn.loss,
            outer,
            params,
            h,
            method=solvers.Implicit(linear_solver=solver, curvature=gn),
            **kw,
        )
        assert abs(float(g_h - g_gn)) > 1e-3 * abs(float(g_gn))


def test_gauss_newton_in_argmin_matches_hessian_for_linear_least_squares():
    """Implicit.solve (argmin's path) with a loop that exposes the arguments of its loss."""
    # A loop that does not expose its inner loss's arguments says so.
    with pytest.raises(NotImplementedError, match="does not expose the arguments"):
        solvers.InnerLoop.curvature_args(object(), ())
    # argmin's loop over theta = args: the pieces take fun's arguments
    with jax.enable_x64(True):
        X, y = _data(jax.random.key(10), n=30, d=4)
        Xv, yv = _data(jax.random.key(11), n=10, d=4)
        out_loss = lambda o, lam: 0.5 * jnp.mean((o - jax.nn.one_hot(y, 3)) ** 2)
        model = lambda p, lam: X @ p["w"] + p["b"]
        reg = lambda p, lam: lam * jnp.sum(p["w"] ** 2)
        gn = solvers.GaussNewton(model, out_loss, reg)
        w0 = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}

        def hyper(lam, curvature):
            m = solvers.Implicit(linear_solver=solvers.cg(tol=1e-13), curvature=curvature)
            w = solvers.argmin(
                gn.loss, w0, lam, optimizer=optax.lbfgs(), steps=100, tol=1e-12, adjoint=m
            )
            return jnp.mean((Xv @ w["w"] + w["b"] - jax.nn.one_hot(yv, 3)) ** 2)

        lam = jnp.asarray(0.1)
        grad = jax.jit(jax.grad(hyper), static_argnums=1)  # a compile each, not many eager ones
        np.testing.assert_allclose(grad(lam, gn), grad(lam, None), rtol=1e-9)


def test_gauss_newton_validation():
    with pytest.raises(TypeError, match="output_loss must be callable"):
        solvers.GaussNewton(_mlp, 1.0)
    with pytest.raises(TypeError, match="regularizer must be callable"):
        solvers.GaussNewton(_mlp, _xent, "l2")
    with pytest.raises(TypeError, match="curvature must be None"):
        solvers.Implicit(curvature="gauss-newton")


# ----------------------------------------------------------------------------- automatic damping


def _indefinite(dtype=jnp.float64):
    evals = jnp.asarray([-2.0, -0.5, 0.3, 1.0, 4.0, 9.0], dtype)
    Q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(0), (6, 6), dtype))
    return (Q * evals) @ Q.T, jnp.ones(6, dtype)


def test_auto_damping_solves_an_indefinite_system_plain_cg_cannot():
    with jax.enable_x64(True):
        A, b = _indefinite()
        x, stats = solvers.cg(tol=1e-10)(lambda v: A @ v, b)
        assert not bool(stats.converged)  # plain CG meets negative curvature and stops
        x, stats = solvers.cg(tol=1e-10, ridge="auto")(lambda v: A @ v, b)
        assert bool(stats.converged)
        lam = float(stats.ridge)
        assert lam > 2.0  # above the most negative eigenvalue's size: a positive-definite system
        np.testing.assert_allclose(x, jnp.linalg.solve(A + lam * jnp.eye(6), b), rtol=1e-8)
        assert bool(jnp.all(jnp.isfinite(x)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_auto_damping_recovers_the_undamped_solution_of_a_pd_system(dtype):
    with jax.enable_x64(True):
        A, b = _indefinite(dtype)
        A = A + 2.5 * jnp.eye(6, dtype=dtype)  # eigenvalues 0.5 ... 11.5
        tol = 1e-6 if dtype == jnp.float32 else 1e-12
        x, stats = solvers.cg(tol=tol, ridge="auto")(lambda v: A @ v, b)
        assert bool(stats.converged) and float(stats.ridge) == 0.0
        np.testing.assert_allclose(x, jnp.linalg.solve(A, b), rtol=20 * tol)


def test_auto_damping_jits_vmaps_without_retracing():
    A, b = _indefinite(jnp.float32)
    traces = []

    @jax.jit
    def solve(shift, lam0):
        traces.append(None)
        x, stats = solvers.cg(ridge="auto")(lambda v: A @ v + shift * v, b, ridge=lam0)
        return x, stats

    _, stats = jax.vmap(solve)(jnp.asarray([0.0, 5.0]), jnp.zeros(2))
    _, _ = solve(jnp.asarray(1.0), jnp.asarray(0.5))
    _, _ = solve(jnp.asarray(2.0), jnp.asarray(0.0))
    assert len(traces) == 2  # one for the vmapped call, one for the plain one
    assert bool(jnp.all(stats.converged))
    assert float(stats.ridge[0]) > 2.0 and float(stats.ridge[1]) == 0.0  # A + 5 I is PD


def test_auto_ridge_only_for_cg():
    with pytest.raises(ValueError, match=r"needs solvers\.cg"):
        solvers.gmres(ridge="auto")
    with pytest.raises(ValueError, match="'auto'"):
        solvers.cg(ridge="automatic")


def test_auto_damping_carried_across_outer_steps():
    """BilevelOptimizer keeps the damping in the method state and shrinks it after success."""
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: 3.0 * a, _mlp_params(jax.random.key(12), [4, 8, 3]))
        batch, val = _data(jax.random.key(13), n=20), _data(jax.random.key(14), n=20)
        inner = lambda p, h, b: _xent(_mlp(p, h, b), h, b) + _decay(p, h["wd"], b)
        outer = lambda p, h, b: _xent(_mlp(p, h, b), h, b)
        method = solvers.Implicit(linear_solver=solvers.cg(ridge="auto", maxiter=400))
        opt = bilevel.BilevelOptimizer(
            inner, outer, inner_optimizer=optax.sgd(1e-4), outer_optimizer=optax.sgd(0.0),
            space={"wd": bilevel.hparams.log(1e-3)}, method=method, inner_steps=1,
        )  # fmt: skip
        state = opt.init(params)
        assert isinstance(state.method_state, solvers.DampedAdjoint)
        batches = jax.tree.map(lambda a: a[None], batch)
        state, m = opt.step(state, batches, val)
        lam1 = float(state.method_state.ridge)
        assert int(m["status"]) == solvers.Status.SUCCESS
        assert lam1 > 0  # the indefinite Hessian needed damping
        # the weights barely move: the next solve starts from lam1 and needs no more damping ...
        state, m = opt.step(state, batches, val)
        assert int(m["status"]) == solvers.Status.SUCCESS
        lam2 = float(state.method_state.ridge)
        assert lam2 == pytest.approx(lam1 / 2, rel=1e-6)  # ... so it is halved for the next


def test_gauss_newton_with_batchnorm_state():
    """A stateful model: the pieces receive the frozen model state after (h, batch)."""
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(4, 6, rngs=rngs)
            self.bn = nnx.BatchNorm(6, rngs=rngs)
            self.l2 = nnx.Linear(6, 3, rngs=rngs)

        def __call__(self, x):
            return self.l2(jnp.tanh(self.bn(self.l1(x))))

    model = Net(nnx.Rngs(0))
    apply, params, state = bilevel.nnx_apply_fn(model, with_state=True, mode="train")
    batch, val = (
        _data(jax.random.key(15), n=16, dtype=jnp.float32),
        _data(jax.random.key(16), n=16, dtype=jnp.float32),
    )
    logits = lambda p, h, b, s: apply(p, s, b[0])[0]
    gn = solvers.GaussNewton(
        logits,
        lambda o, h, b, s: _xent(o, h, b),
        lambda p, h, b, s: h * sum(jnp.sum(x**2) for x in jax.tree.leaves(p)),
    )

    def inner(p, h, b, s):
        out, new_s = apply(p, s, b[0])
        return _xent(out, h, b) + h * sum(jnp.sum(x**2) for x in jax.tree.leaves(p)), new_s

    def outer(p, h, b, s):
        out, new_s = apply(p, s, b[0])
        return _xent(out, h, b), new_s

    m = solvers.Implicit(linear_solver=solvers.cg(ridge=1e-2, maxiter=300, tol=1e-4), curvature=gn)
    g, info = _hypergradient(
        inner,
        outer,
        params,
        jnp.asarray(0.01),
        batch,
        val,
        method=m,
        model_state=state,
        return_info=True,
    )
    assert bool(jnp.isfinite(g)) and int(info.status) == solvers.Status.SUCCESS


def test_the_docs_example_runs_as_written():
    page = (ROOT / "docs" / "curvature.md").read_text()
    stdout = run_example("curvature.md", "ggn", max_lines=30)
    status, wd = re.fullmatch(r"(\w+) wd = (\S+)\n", stdout).groups()
    assert status == "SUCCESS" and float(wd) != pytest.approx(0.01, rel=1e-3)
    printed = re.search(r"It prints\n\n```text\n(.*?)```", page, re.S)
    assert printed, "docs/curvature.md lost the example's output"
    assert printed.group(1).split()[0] == status
    np.testing.assert_allclose(float(printed.group(1).split()[-1]), float(wd), rtol=0.05)
