import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import solvers
from tests.solvers.problems import (
    both_modes,
    logistic_data,
    logistic_inner,
    logistic_val,
    rel_err,
    ridge_data,
    ridge_hypergrad,
    ridge_inner,
    val_loss,
)

STEPS = 400
OPT = optax.sgd(0.5)  # converges on ridge_data: Hessian eigenvalues are below 4


def ridge_outer(adjoint, steps=STEPS, optimizer=OPT, tol=None):
    def outer(log_lam, X, y, Xv, yv):
        w = solvers.argmin(
            ridge_inner,
            jnp.zeros(X.shape[1], X.dtype),
            log_lam,
            X,
            y,
            optimizer=optimizer,
            steps=steps,
            tol=tol,
            adjoint=adjoint,
        )
        return val_loss(w, Xv, yv)

    return outer


ADJOINTS = {
    "implicit-cg": (solvers.Implicit(linear_solver=solvers.cg(tol=1e-12)), 1e-6),
    "implicit-gmres": (solvers.Implicit(linear_solver=solvers.gmres(tol=1e-12)), 1e-6),
    "implicit-neumann": (
        solvers.Implicit(linear_solver=solvers.neumann(steps=5000, tol=1e-12)),
        1e-6,
    ),
    "unrolled": (solvers.Unrolled(), 1e-4),
    "unrolled-checkpointed": (solvers.Unrolled(checkpoint_every=20), 1e-4),
}


@pytest.mark.parametrize("name", sorted(ADJOINTS))
@pytest.mark.parametrize("per_feature", [False, True])
def test_ridge_hypergradient_against_closed_form(name, per_feature):
    adjoint, tol = ADJOINTS[name]
    with jax.enable_x64(True):
        X, y, Xv, yv = ridge_data()
        h = jnp.linspace(-2.0, 0.5, X.shape[1]) if per_feature else jnp.asarray(-1.0)
        outer = ridge_outer(adjoint)
        expected = ridge_hypergrad(h, X, y, Xv, yv)
        rev, fwd = both_modes(outer)(h, X, y, Xv, yv)
        assert rel_err(rev, expected) <= tol
        assert rel_err(fwd, expected) <= tol


def test_checkpointed_unrolled_equals_plain_unrolled():
    with jax.enable_x64(True):
        X, y, Xv, yv = ridge_data()
        h = jnp.linspace(-2.0, 0.5, X.shape[1])
        plain = jax.jit(jax.grad(ridge_outer(solvers.Unrolled(), steps=53)))(h, X, y, Xv, yv)
        for every in (1, 7, 10, 53, 100):  # divides, leaves a remainder, >= steps
            ckpt = jax.jit(
                jax.grad(ridge_outer(solvers.Unrolled(checkpoint_every=every), steps=53))
            )
            np.testing.assert_allclose(ckpt(h, X, y, Xv, yv), plain, rtol=1e-12, atol=1e-15)


def unrolled_reference(h, X, y, Xv, yv, steps, k):
    """Plain Python unroll: ``steps`` SGD steps, derivatives through the last ``k`` only."""
    w = jnp.zeros(X.shape[1])
    for t in range(steps):
        hh = jax.lax.stop_gradient(h) if t < steps - k else h
        w = jax.lax.stop_gradient(w) if t == steps - k else w
        w = w - 0.5 * jax.grad(ridge_inner)(w, hh, X, y)
    return val_loss(w, Xv, yv)


@pytest.mark.parametrize("k", [1, 5, 30])
def test_truncated_against_explicit_unroll(k):
    with jax.enable_x64(True):
        X, y, Xv, yv = ridge_data()
        h = jnp.linspace(-2.0, 0.5, X.shape[1])
        got, fwd = both_modes(ridge_outer(solvers.Truncated(steps=k), steps=40))(h, X, y, Xv, yv)
        want = jax.grad(unrolled_reference)(h, X, y, Xv, yv, 40, k)
        assert rel_err(got, want) <= 1e-10
        assert rel_err(fwd, want) <= 1e-10


def test_unrolled_short_horizon_against_explicit_unroll():
    with jax.enable_x64(True):
        X, y, Xv, yv = ridge_data()
        h = jnp.linspace(-2.0, 0.5, X.shape[1])
        got = jax.jit(jax.grad(ridge_outer(solvers.Unrolled(), steps=12)))(h, X, y, Xv, yv)
        want = jax.grad(unrolled_reference)(h, X, y, Xv, yv, 12, 12)
        assert rel_err(got, want) <= 1e-10


@pytest.mark.parametrize(
    "adjoint",
    [solvers.Implicit(linear_solver=solvers.cg(tol=1e-12)), solvers.Unrolled()],
    ids=["implicit", "unrolled"],
)
def test_logistic_per_feature_l2_against_finite_differences(adjoint):
    with jax.enable_x64(True):
        X, y, Xv, yv = logistic_data()
        d = X.shape[1]

        def outer(h):
            w = solvers.argmin(
                logistic_inner,
                jnp.zeros(d),
                h,
                X,
                y,
                optimizer=optax.lbfgs()
                if isinstance(adjoint, solvers.Implicit)
                else optax.sgd(1.0),
                steps=100 if isinstance(adjoint, solvers.Implicit) else 3000,
                tol=1e-12,
                adjoint=adjoint,
            )
            return logistic_val(w, Xv, yv)

        h = jnp.linspace(-3.0, -1.0, d)
        g = jax.jit(jax.grad(outer))(h)
        eps = 1e-5
        outer = jax.jit(outer)
        fd = np.array([(outer(h + eps * e) - outer(h - eps * e)) / (2 * eps) for e in np.eye(d)])
        assert rel_err(g, fd) <= 1e-5


def test_vmap_over_hyperparameters_equals_loop():
    with jax.enable_x64(True):
        X, y, Xv, yv = ridge_data()
        hs = jnp.stack([jnp.full(X.shape[1], v) for v in (-2.0, -1.0, 0.0, 1.0)])
        for adjoint in (solvers.Implicit(), solvers.Unrolled(), solvers.Truncated(steps=10)):
            hg = jax.jit(jax.grad(ridge_outer(adjoint, steps=100, tol=1e-9)))
            batched = jax.vmap(hg, in_axes=(0, None, None, None, None))(hs, X, y, Xv, yv)
            looped = jnp.stack([hg(h, X, y, Xv, yv) for h in hs])
            np.testing.assert_allclose(batched, looped, rtol=1e-9, atol=1e-12)


def test_lbfgs_with_implicit_inboth_modes():
    with jax.enable_x64(True):
        X, y, Xv, yv = ridge_data()
        h = jnp.linspace(-2.0, 0.5, X.shape[1])
        outer = ridge_outer(
            solvers.Implicit(linear_solver=solvers.cg(tol=1e-12)),
            steps=50,
            optimizer=optax.lbfgs(),
            tol=1e-10,
        )
        expected = ridge_hypergrad(h, X, y, Xv, yv)
        rev, fwd = both_modes(outer)(h, X, y, Xv, yv)
        assert rel_err(rev, expected) <= 1e-6
        assert rel_err(fwd, expected) <= 1e-6


def test_lbfgs_unrolled_forward_mode_works_reverse_mode_raises_clearly():
    with jax.enable_x64(True):
        X, y, Xv, yv = ridge_data()
        h = jnp.linspace(-2.0, 0.5, X.shape[1])
        outer = ridge_outer(solvers.Unrolled(), steps=50, optimizer=optax.lbfgs(), tol=1e-10)
        expected = ridge_hypergrad(h, X, y, Xv, yv)
        assert rel_err(jax.jit(jax.jacfwd(outer))(h, X, y, Xv, yv), expected) <= 1e-4
        # Under jit the error comes while tracing, before the forward pass is compiled and run.
        with pytest.raises(ValueError, match="lbfgs"):
            jax.jit(jax.grad(outer))(h, X, y, Xv, yv)
        trunc = ridge_outer(solvers.Truncated(steps=3), steps=50, optimizer=optax.lbfgs())
        with pytest.raises(ValueError, match="Implicit"):
            jax.jit(jax.grad(trunc))(h, X, y, Xv, yv)


def test_info_reports_steps_status_and_gradient_norm():
    X, y, _, _ = ridge_data(dtype=np.float32)
    w0 = jnp.zeros(X.shape[1])
    w, info = solvers.argmin(
        ridge_inner, w0, -1.0, X, y, optimizer=OPT, steps=500, tol=1e-4, return_info=True
    )
    assert int(info.status) == solvers.Status.SUCCESS
    assert 0 < int(info.steps) < 500
    assert float(info.grad_norm) <= 1e-4
    np.testing.assert_allclose(
        info.grad_norm, jnp.linalg.norm(jax.grad(ridge_inner)(w, -1.0, X, y)), rtol=1e-3
    )
    _, info = solvers.argmin(
        ridge_inner, w0, -1.0, X, y, optimizer=OPT, steps=3, tol=1e-4, return_info=True
    )
    assert int(info.status) == solvers.Status.MAX_STEPS and int(info.steps) == 3
    for adjoint in (solvers.Unrolled(), solvers.Truncated(steps=2)):
        _, info = solvers.argmin(
            ridge_inner,
            w0,
            -1.0,
            X,
            y,
            optimizer=OPT,
            steps=500,
            tol=1e-4,
            adjoint=adjoint,
            return_info=True,
        )
        assert float(info.grad_norm) <= 1e-4 or int(info.status) == solvers.Status.MAX_STEPS


@pytest.mark.parametrize(
    "adjoint", [solvers.Implicit(), solvers.Unrolled()], ids=["implicit", "unrolled"]
)
def test_divergence_is_reported_and_last_finite_iterate_returned(adjoint):
    X, y, _, _ = ridge_data(dtype=np.float32)
    w, info = solvers.argmin(
        ridge_inner,
        jnp.zeros(X.shape[1]),
        -1.0,
        X,
        y,
        optimizer=optax.sgd(50.0),
        steps=500,
        adjoint=adjoint,
        return_info=True,
    )
    assert int(info.status) == solvers.Status.NONFINITE
    assert bool(jnp.all(jnp.isfinite(w)))
    assert int(info.steps) < 500


def test_nonfinite_hyperparameter_inside_jit_is_reported():
    X, y, _, _ = ridge_data(dtype=np.float32)
    run = jax.jit(
        lambda h: solvers.argmin(
            ridge_inner, jnp.zeros(X.shape[1]), h, X, y, optimizer=OPT, steps=10, return_info=True
        )
    )
    w, info = run(jnp.float32(jnp.nan))
    assert int(info.status) == solvers.Status.NONFINITE
    assert bool(jnp.all(jnp.isfinite(w)))


def test_bad_input_is_a_clear_error():
    X, y, _, _ = ridge_data(dtype=np.float32)
    w0 = jnp.zeros(X.shape[1])
    kw = dict(optimizer=OPT, steps=10)
    with pytest.raises(ValueError, match="non-finite"):
        solvers.argmin(ridge_inner, w0, jnp.nan, X, y, **kw)
    with pytest.raises(TypeError, match="scalar"):
        solvers.argmin(lambda w, h: w * h, w0, 1.0, **kw)
    with pytest.raises(ValueError, match="steps"):
        solvers.argmin(ridge_inner, w0, -1.0, X, y, optimizer=OPT, steps=0)
    with pytest.raises(ValueError, match="Truncated"):
        solvers.argmin(ridge_inner, w0, -1.0, X, y, adjoint=solvers.Truncated(steps=11), **kw)
    with pytest.raises(TypeError, match="optax"):
        solvers.argmin(ridge_inner, w0, -1.0, X, y, optimizer="sgd", steps=10)
    with pytest.raises(TypeError, match="adjoint"):
        solvers.argmin(ridge_inner, w0, -1.0, X, y, adjoint="implicit", **kw)
    with pytest.raises(ValueError):
        solvers.Unrolled(checkpoint_every=0)
    with pytest.raises(ValueError):
        solvers.Truncated(steps=0)
    with pytest.raises(TypeError, match="linear solver"):
        solvers.Implicit(linear_solver=None)


def test_mismatched_parameter_structure_is_a_clear_error():
    # fun expects a dict of params; the user passes a bare array.
    fun = lambda p, h: jnp.sum(p["w"] ** 2) + h
    with pytest.raises((TypeError, ValueError, IndexError)):
        solvers.argmin(fun, jnp.zeros(3), 1.0, optimizer=OPT, steps=5)


def test_pytree_params_and_float32():
    X, y, Xv, yv = ridge_data(dtype=np.float32)

    def inner(p, log_lam):
        w = jnp.concatenate([p["a"], p["b"]])
        return ridge_inner(w, log_lam, X, y)

    def outer(h):
        p = solvers.argmin(
            inner, {"a": jnp.zeros(2), "b": jnp.zeros(4)}, h, optimizer=OPT, steps=300
        )
        return val_loss(jnp.concatenate([p["a"], p["b"]]), Xv, yv)

    g = jax.jit(jax.grad(outer))(jnp.float32(-1.0))
    assert g.dtype == jnp.float32
    with jax.enable_x64(True):
        X64, y64, Xv64, yv64 = ridge_data()
        assert rel_err(g, ridge_hypergrad(-1.0, X64, y64, Xv64, yv64)) <= 1e-3


def test_jitted_hypergradient_does_not_retrace():
    X, y, Xv, yv = ridge_data(dtype=np.float32)
    for adjoint in (
        solvers.Implicit(),
        solvers.Unrolled(checkpoint_every=10),
        solvers.Truncated(steps=5),
    ):
        traces = []
        outer = ridge_outer(adjoint, steps=50)

        @jax.jit
        def hypergrad(h, outer=outer, traces=traces):
            traces.append(1)
            return jax.grad(outer)(h, X, y, Xv, yv)

        hypergrad(jnp.full(6, -1.0, jnp.float32))
        hypergrad(jnp.full(6, -0.5, jnp.float32))
        assert len(traces) == 1


@pytest.mark.parametrize("mode", ["rev", "fwd"])
def test_leaf_independent_of_hyperparameters(mode):
    # The bias is not penalized: its row of the implicit right-hand side is identically zero.
    with jax.enable_x64(True):
        X, y, Xv, yv = logistic_data()

        def inner(p, h):
            return logistic_inner(p["w"], h, X - 0.3, y) + 0.0 * p["b"] + 0.01 * p["b"] ** 2

        def outer(h):
            p = solvers.argmin(
                inner,
                {"w": jnp.zeros(X.shape[1]), "b": jnp.zeros(())},
                h,
                optimizer=optax.lbfgs(),
                steps=100,
                tol=1e-12,
                adjoint=solvers.Implicit(linear_solver=solvers.cg(tol=1e-12)),
            )
            return logistic_val(p["w"], Xv, yv) + p["b"] ** 2

        h = jnp.linspace(-3.0, -1.0, X.shape[1])
        g = jax.jit((jax.grad if mode == "rev" else jax.jacfwd)(outer))(h)
        eps = 1e-5
        outer = jax.jit(outer)
        fd = np.array(
            [(outer(h + eps * e) - outer(h - eps * e)) / (2 * eps) for e in np.eye(len(h))]
        )
        assert rel_err(g, fd) <= 1e-5
