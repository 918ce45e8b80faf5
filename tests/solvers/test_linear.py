import jax
import jax.numpy as jnp
import numpy as np
import pytest

import solvers

SPD_SOLVERS = {
    "cg": solvers.cg(tol=1e-10),
    "neumann": solvers.neumann(steps=5000, tol=1e-10),
    "gmres": solvers.gmres(tol=1e-10, maxiter=200),
    "bicgstab": solvers.bicgstab(tol=1e-10),
    "direct": solvers.direct(),
}
GENERAL_SOLVERS = {
    "gmres": solvers.gmres(tol=1e-10, restart=40, maxiter=400),
    "bicgstab": solvers.bicgstab(tol=1e-10, maxiter=500),
    "direct": solvers.direct(),
}


def spd_system(n=25, seed=0):
    rng = np.random.RandomState(seed)
    M = rng.randn(n, n)
    A = M @ M.T / n + 0.5 * np.eye(n)
    return A, rng.randn(n)


def tree_system(A, b):
    """The same system on a pytree {'a': (10,), 'b': (rest,)} to exercise pytree handling."""

    def to_tree(v):
        return {"a": v[:10], "b": v[10:].reshape(-1, 1)}

    def from_tree(t):
        return jnp.concatenate([t["a"], t["b"].ravel()])

    return (lambda t: to_tree(A @ from_tree(t))), to_tree(jnp.asarray(b)), from_tree


@pytest.mark.parametrize("name", sorted(SPD_SOLVERS))
def test_spd_against_numpy_solve(name):
    with jax.enable_x64(True):
        A, b = spd_system()
        matvec, bt, flat = tree_system(A, b)
        x, stats = jax.jit(lambda bt: SPD_SOLVERS[name](matvec, bt))(bt)
        np.testing.assert_allclose(flat(x), np.linalg.solve(A, b), rtol=1e-7, atol=1e-8)
        assert bool(stats.converged)
        assert float(stats.residual) <= 1e-9
        assert x["b"].shape == (15, 1)


@pytest.mark.parametrize("name", sorted(GENERAL_SOLVERS))
def test_nonsymmetric_against_numpy_solve(name):
    with jax.enable_x64(True):
        A, b = spd_system(seed=3)
        A = A + 0.2 * np.triu(np.random.RandomState(4).randn(*A.shape))
        x, stats = GENERAL_SOLVERS[name](lambda v: A @ v, jnp.asarray(b))
        np.testing.assert_allclose(x, np.linalg.solve(A, b), rtol=1e-6, atol=1e-8)
        assert bool(stats.converged)


@pytest.mark.parametrize("name", sorted(SPD_SOLVERS))
def test_ridge_damping(name):
    with jax.enable_x64(True):
        A, b = spd_system()
        solver = type(SPD_SOLVERS[name])(**{**vars(SPD_SOLVERS[name]), "ridge": 0.7})
        x, _ = solver(lambda v: A @ v, jnp.asarray(b))
        np.testing.assert_allclose(x, np.linalg.solve(A + 0.7 * np.eye(len(b)), b), rtol=1e-6)


@pytest.mark.parametrize("name", ["cg", "gmres", "bicgstab", "neumann"])
def test_warm_start_from_solution_needs_no_iterations(name):
    with jax.enable_x64(True):
        A, b = spd_system()
        exact = jnp.asarray(np.linalg.solve(A, b))
        x, stats = SPD_SOLVERS[name](lambda v: A @ v, jnp.asarray(b), init=exact)
        assert int(stats.iterations) == 0
        np.testing.assert_allclose(x, exact, rtol=1e-12)


@pytest.mark.parametrize("name", ["cg", "gmres", "bicgstab", "neumann"])
def test_unconverged_solve_is_reported_and_returns_last_iterate(name):
    # jaxopt #466: a solve that stops early must not silently hand back zeros.
    A, b = spd_system(n=50)
    A = A + np.diag(np.linspace(0, 100, 50))  # badly conditioned
    short = {
        "cg": solvers.cg(maxiter=3),
        "gmres": solvers.gmres(maxiter=3),
        "bicgstab": solvers.bicgstab(maxiter=2),
        "neumann": solvers.neumann(steps=3),
    }[name]
    x, stats = short(lambda v: jnp.asarray(A, jnp.float32) @ v, jnp.asarray(b, jnp.float32))
    assert not bool(stats.converged)
    assert 0 < int(stats.iterations) <= 3
    assert float(stats.residual) > 1e-3
    assert float(jnp.linalg.norm(x)) > 0
    # The returned iterate is better than zero.
    r = np.linalg.norm(b - A @ np.asarray(x)) / np.linalg.norm(b)
    assert r < 1.0
    np.testing.assert_allclose(float(stats.residual), r, rtol=1e-3)


def test_zero_rhs_gives_zero_solution():
    A, _ = spd_system()
    for solver in SPD_SOLVERS.values():
        x, stats = solver(lambda v: A @ v, jnp.zeros(25))
        assert bool(stats.converged)
        np.testing.assert_array_equal(np.asarray(x), 0.0)


def test_neumann_default_scale_is_inverse_max_eigenvalue():
    A, _ = spd_system()
    scale = solvers.estimate_inverse_max_eigenvalue(lambda v: A @ v, jnp.zeros(25), iters=100)
    np.testing.assert_allclose(1 / scale, np.linalg.eigvalsh(A).max(), rtol=1e-3)


def test_vmap_over_right_hand_sides_equals_loop():
    A, _ = spd_system()
    B = np.random.RandomState(1).randn(4, 25).astype(np.float32)
    solve = lambda b: solvers.cg(tol=1e-6)(lambda v: A @ v, b)[0]
    batched = jax.vmap(solve)(jnp.asarray(B))
    looped = jnp.stack([solve(jnp.asarray(b)) for b in B])
    np.testing.assert_allclose(batched, looped, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_dtype_is_preserved(dtype):
    with jax.enable_x64(True):
        A, b = spd_system()
        for solver in SPD_SOLVERS.values():
            x, stats = solver(lambda v: jnp.asarray(A, dtype) @ v, jnp.asarray(b, dtype))
            assert x.dtype == dtype
            assert stats.residual.dtype == dtype


def test_structure_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="structure of b"):
        solvers.cg()(lambda v: {"a": v["a"], "extra": v["a"]}, {"a": jnp.ones(3)})
    with pytest.raises(ValueError, match="init must have the structure"):
        solvers.cg()(lambda v: v, jnp.ones(3), init=jnp.ones(4))
    with pytest.raises(TypeError, match="floating"):
        solvers.cg()(lambda v: v, jnp.ones(3, jnp.int32))


@pytest.mark.parametrize(
    "make",
    [
        lambda: solvers.cg(maxiter=0),
        lambda: solvers.cg(tol=-1.0),
        lambda: solvers.neumann(steps=0),
        lambda: solvers.neumann(scale=0.0),
        lambda: solvers.gmres(restart=0),
        lambda: solvers.bicgstab(maxiter=1.5),
        lambda: solvers.direct(ridge=-1.0),
        lambda: solvers.cg(ridge=float("nan")),
    ],
)
def test_invalid_configuration_raises(make):
    with pytest.raises(ValueError):
        make()


def test_solvers_are_immutable_and_hashable():
    s = solvers.cg(maxiter=10)
    with pytest.raises(AttributeError):
        s.maxiter = 3
    assert hash(s) == hash(solvers.cg(maxiter=10))
    with pytest.raises(TypeError):
        solvers.cg(10)  # keyword-only: no silent positional mix-up with ridge


def test_no_retrace_on_second_call():
    traces = []

    @jax.jit
    def solve(b):
        traces.append(1)
        return solvers.cg()(lambda v: 2.0 * v, b)

    solve(jnp.ones(3))
    solve(jnp.arange(3.0, dtype=jnp.float32))
    assert len(traces) == 1


def test_nonfinite_operator_is_reported():
    _x, stats = solvers.cg()(lambda v: v * jnp.nan, jnp.ones(3))
    assert not bool(stats.converged)


def test_cg_stops_at_negative_curvature_without_nan():
    A = np.diag([1.0, 2.0, -1.0, 3.0]).astype(np.float32)
    x, stats = solvers.cg()(lambda v: jnp.asarray(A) @ v, jnp.ones(4, jnp.float32))
    assert bool(jnp.all(jnp.isfinite(x)))
    assert not bool(stats.converged)
    assert bool(jnp.isfinite(stats.residual))


@pytest.mark.parametrize("name", ["cg", "gmres", "bicgstab", "neumann"])
def test_a_bad_warm_start_is_replaced_by_zero(name):
    with jax.enable_x64(True):
        A, b = spd_system()
        cold_x, cold = SPD_SOLVERS[name](lambda v: A @ v, jnp.asarray(b))
        bad = jnp.full(len(b), 1e6)
        x, warm = SPD_SOLVERS[name](lambda v: A @ v, jnp.asarray(b), init=bad)
        assert int(warm.iterations) == int(cold.iterations)
        np.testing.assert_allclose(x, cold_x, rtol=1e-10)
        x, _ = SPD_SOLVERS[name](lambda v: A @ v, jnp.asarray(b), init=jnp.full(len(b), jnp.nan))
        np.testing.assert_allclose(x, cold_x, rtol=1e-10)


def test_early_stopped_cg_returns_the_last_iterate_like_scipy():
    # On a positive-definite system the residual of CG can exceed ||b|| for many iterations while
    # the error keeps shrinking: the answer is the last iterate, as in jax.scipy's CG.
    with jax.enable_x64(True):
        A = jnp.diag(jnp.logspace(0, -4, 200))
        b = jnp.ones(200)
        x, stats = solvers.cg(maxiter=40, tol=0.0)(lambda v: A @ v, b)
        ref, _ = jax.scipy.sparse.linalg.cg(lambda v: A @ v, b, maxiter=40, tol=0.0)
        np.testing.assert_allclose(x, ref, rtol=1e-8)
        assert float(stats.residual) > 1.0  # the residual really is above ||b|| here
