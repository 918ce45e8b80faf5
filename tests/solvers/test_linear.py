import dataclasses

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
    with pytest.raises((ValueError, TypeError)):
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


# --- NumPy / JAX scalars in configurations ---------------------------------------------------


def test_numpy_and_jax_scalars_are_valid_configuration_numbers():
    configs = [
        (
            solvers.cg(maxiter=np.int64(20), tol=jnp.asarray(0.125)),
            solvers.cg(maxiter=20, tol=0.125),
        ),
        (
            solvers.neumann(steps=np.int32(3), scale=np.float32(0.5), power_iters=np.int64(4)),
            solvers.neumann(steps=3, scale=0.5, power_iters=4),
        ),
        (
            solvers.gmres(maxiter=np.int64(30), restart=jnp.int32(5), ridge=np.float64(0.1)),
            solvers.gmres(maxiter=30, restart=5, ridge=0.1),
        ),
        (solvers.bicgstab(maxiter=np.int32(7)), solvers.bicgstab(maxiter=7)),
        (solvers.direct(tol=np.float32(1e-3)), solvers.direct(tol=float(np.float32(1e-3)))),
    ]
    for got, plain in configs:
        assert got == plain and hash(got) == hash(plain)
        for field in dataclasses.fields(got):
            value = getattr(got, field.name)
            assert value is None or type(value) in (int, float), (field.name, type(value))
    # Usable as a static argument of jit.
    solve = jax.jit(lambda s, b: s(lambda v: 2.0 * v, b)[0], static_argnums=0)
    np.testing.assert_allclose(solve(configs[0][0], jnp.ones(3)), 0.5, rtol=1e-6)


def test_invalid_numbers_name_the_argument():
    with pytest.raises(ValueError, match="maxiter"):
        solvers.cg(maxiter=np.int64(0))
    with pytest.raises(TypeError, match="steps"):
        solvers.neumann(steps=2.5)
    with pytest.raises(ValueError, match="scale"):
        solvers.neumann(scale=np.float32(0.0))
    with pytest.raises(ValueError, match="ridge"):
        solvers.cg()(lambda v: v, jnp.ones(2), ridge=-1.0)


# --- default iteration budgets ----------------------------------------------------------------


def ill_conditioned_spd(n, cond, seed):
    """A random SPD matrix with eigenvalues log-spaced in [1/cond, 1] and a random b."""
    rng = np.random.RandomState(seed)
    Q, _ = np.linalg.qr(rng.randn(n, n))
    return (Q * np.logspace(0, -np.log10(cond), n)) @ Q.T, rng.randn(n)


def test_default_maxiter_is_ten_times_the_unknowns_capped():
    assert solvers._linear.default_maxiter(3) == 30
    assert solvers._linear.default_maxiter(10) == 100
    assert solvers._linear.default_maxiter(10**6) == solvers._linear.MAXITER_CAP == 1000


@pytest.mark.parametrize("name", ["cg", "bicgstab"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("n", "cond"), [(3, 1e3), (10, 1e4)])
def test_default_maxiter_converges_on_ill_conditioned_small_systems(name, dtype, n, cond):
    # n iterations ("exact in exact arithmetic") left a 10 x 10 system of condition 1e4 at a
    # residual of 0.17 in float32; 3 x 3 systems needed a 4th iteration.
    with jax.enable_x64(dtype == "float64"):
        tol = 1e-5 if dtype == "float32" else 1e-12
        solver = {"cg": solvers.cg, "bicgstab": solvers.bicgstab}[name](tol=tol)
        for seed in range(5):
            A, b = ill_conditioned_spd(n, cond, seed)
            Aj, bj = jnp.asarray(A, dtype), jnp.asarray(b, dtype)
            x, stats = jax.jit(lambda A, b: solver(lambda v: A @ v, b))(Aj, bj)
            assert bool(stats.converged), (seed, stats)
            assert int(stats.iterations) > n or dtype == "float64"
            want = np.linalg.solve(A, b)
            err = np.linalg.norm(np.asarray(x, np.float64) - want) / np.linalg.norm(want)
            assert err <= (3e-2 if dtype == "float32" else 1e-7), (seed, err)


# --- pytrees with Python-float leaves --------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SPD_SOLVERS))
def test_python_float_leaves_in_a_pytree_rhs(name):
    matvec = lambda t: {"a": 2.0 * t["a"], "b": 4.0 * t["b"]}
    x, stats = SPD_SOLVERS[name](matvec, {"a": 1.0, "b": jnp.ones(2)})
    assert bool(stats.converged)
    np.testing.assert_allclose(x["a"], 0.5, rtol=1e-5)
    np.testing.assert_allclose(x["b"], 0.25, rtol=1e-5)
    x, _ = SPD_SOLVERS[name](
        matvec, {"a": 1.0, "b": jnp.ones(2)}, init={"a": 0.4, "b": np.full(2, 0.2)}
    )
    np.testing.assert_allclose(x["a"], 0.5, rtol=1e-5)


# --- BiCGSTAB breakdown -----------------------------------------------------------------------


def kkt_system():
    """KKT system of min 0.5 x'Qx s.t. a'x = 1: with b = (0, 1), r0' A r0 = 0 (a breakdown)."""
    Q = np.diag([2.0, 3.0, 1.0])
    a = np.array([1.0, 1.0, 1.0])
    K = np.block([[Q, a[:, None]], [a[None, :], np.zeros((1, 1))]])
    b = np.array([0.0, 0.0, 0.0, 1.0])
    assert b @ K @ b == 0
    return K, b


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_bicgstab_breakdown_on_a_kkt_system_is_still_solved(dtype):
    # r0 . A r0 = 0 used to stop BiCGSTAB at x = 0 with converged=False: a silent zero derivative
    # inside custom_root.
    with jax.enable_x64(dtype == "float64"):
        K, b = kkt_system()
        tol = 1e-5 if dtype == "float32" else 1e-12
        x, stats = solvers.bicgstab(tol=tol)(
            lambda v: jnp.asarray(K, dtype) @ v, jnp.asarray(b, dtype)
        )
        assert bool(stats.converged), stats
        np.testing.assert_allclose(
            x, np.linalg.solve(K, b), rtol=1e-4 if dtype == "float32" else 1e-9, atol=1e-6
        )


def test_bicgstab_reports_an_unsolvable_system_honestly():
    A = jnp.diag(jnp.array([1.0, 0.0, 2.0]))  # singular, b not in its range
    b = jnp.ones(3)
    x, stats = solvers.bicgstab()(lambda v: A @ v, b)
    assert not bool(stats.converged)
    true = float(jnp.linalg.norm(b - A @ x) / jnp.linalg.norm(b))
    assert true >= 1 / np.sqrt(3) - 1e-6  # the component along e_2 cannot be matched
    np.testing.assert_allclose(float(stats.residual), true, rtol=1e-3)


# --- non-finite inputs -------------------------------------------------------------------------

ALL_SOLVERS = {
    "cg": solvers.cg(),
    "neumann": solvers.neumann(),
    "gmres": solvers.gmres(),
    "bicgstab": solvers.bicgstab(),
    "direct": solvers.direct(),
}


@pytest.mark.parametrize("name", sorted(ALL_SOLVERS))
@pytest.mark.parametrize("where", ["rhs_nan", "rhs_inf", "matvec_nan", "matvec_nan_later"])
def test_nonfinite_rhs_or_operator_never_looks_finite(name, where):
    A = jnp.diag(jnp.array([1.0, 2.0, 3.0, 4.0]))
    b = jnp.ones(4)
    matvec = lambda v: A @ v
    if where == "rhs_nan":
        b = b.at[1].set(jnp.nan)
    elif where == "rhs_inf":
        b = b.at[2].set(jnp.inf)
    elif where == "matvec_nan":
        matvec = lambda v: v * jnp.nan
    else:  # NaN only in one output component
        matvec = lambda v: (A @ v).at[3].set(jnp.nan)
    for run in (ALL_SOLVERS[name], jax.jit(ALL_SOLVERS[name], static_argnums=0)):
        _x, stats = run(matvec, b)
        assert not bool(stats.converged)
        assert not np.isfinite(float(stats.residual)), stats
        assert stats.residual.dtype == jnp.float32


@pytest.mark.parametrize("steps", [10, 200])
def test_a_diverging_neumann_series_reports_a_growing_residual(steps):
    A = jnp.diag(jnp.array([1.0, 2.0, 3.0]))
    x, stats = solvers.neumann(steps=steps, scale=1.0)(lambda v: A @ v, jnp.ones(3))  # s > 2/3
    assert not bool(stats.converged)
    residual = float(stats.residual)
    assert (not np.isfinite(residual)) or residual > 100
    true = float(jnp.linalg.norm(jnp.ones(3) - A @ x) / jnp.sqrt(3.0))
    assert (not np.isfinite(true)) or true > 100


def test_neumann_on_an_indefinite_operator_reports_a_growing_residual():
    A = jnp.diag(jnp.array([1.0, -2.0, 3.0]))
    _, stats = solvers.neumann(steps=50)(lambda v: A @ v, jnp.ones(3))
    assert not bool(stats.converged)
    assert not float(stats.residual) <= 1.0


# --- differentiating a solve on its own --------------------------------------------------------

DIFF_SOLVERS = {
    "cg": solvers.cg(tol=1e-12),
    "neumann": solvers.neumann(steps=5000, tol=1e-12),
    "gmres": solvers.gmres(tol=1e-12),
    "bicgstab": solvers.bicgstab(tol=1e-12),
    "direct": solvers.direct(),
}


@pytest.mark.parametrize("name", sorted(DIFF_SOLVERS))
def test_jacobian_of_a_solve_wrt_rhs_is_the_inverse_matrix_both_modes(name):
    with jax.enable_x64(True):
        A, _ = spd_system(n=6, seed=2)
        if name in ("gmres", "bicgstab", "direct"):
            A = A + 0.3 * np.triu(np.random.RandomState(5).randn(6, 6), 1)  # non-symmetric
        solve = lambda b: DIFF_SOLVERS[name](lambda v: A @ v, b)[0]
        b = jnp.asarray(np.random.RandomState(6).randn(6))
        inv = np.linalg.inv(A)
        np.testing.assert_allclose(jax.jacrev(solve)(b), inv, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(jax.jacfwd(solve)(b), inv, rtol=1e-7, atol=1e-9)
        # jaxopt's solve_cg supports this: grad of a scalar function of the solution.
        g = jax.grad(lambda b: solve(b).sum())(b)
        np.testing.assert_allclose(g, inv.T @ np.ones(6), rtol=1e-7)


@pytest.mark.parametrize("name", sorted(DIFF_SOLVERS))
def test_gradient_wrt_values_the_matvec_closes_over(name):
    with jax.enable_x64(True):
        A, b = spd_system(n=6, seed=3)
        b = jnp.asarray(b)

        def loss(c):
            x, _ = DIFF_SOLVERS[name](lambda v: c * (A @ v), b)
            return jnp.sum(x**2)

        want = jax.grad(lambda c: jnp.sum(jnp.linalg.solve(c * A, b) ** 2))(1.7)
        np.testing.assert_allclose(jax.grad(loss)(1.7), want, rtol=1e-7)
        np.testing.assert_allclose(jax.jit(jax.grad(loss))(1.7), want, rtol=1e-7)


@pytest.mark.parametrize("name", sorted(DIFF_SOLVERS))
def test_traced_ridge_at_call_time_inside_jit_and_grad(name):
    with jax.enable_x64(True):
        A, b = spd_system(n=6, seed=4)
        b = jnp.asarray(b)
        solver = DIFF_SOLVERS[name]

        @jax.jit
        def loss(log_ridge):
            x, stats = solver(lambda v: A @ v, b, ridge=jnp.exp(log_ridge))
            return jnp.sum(x**2), stats

        def want(log_ridge):
            return jnp.sum(jnp.linalg.solve(A + jnp.exp(log_ridge) * np.eye(6), b) ** 2)

        (value, stats), g = jax.value_and_grad(loss, has_aux=True)(-0.5)
        assert bool(stats.converged)
        np.testing.assert_allclose(value, want(-0.5), rtol=1e-8)
        np.testing.assert_allclose(g, jax.grad(want)(-0.5), rtol=1e-7)
        # A call-time ridge overrides the configured one.
        damped = type(solver)(**{**vars(solver), "ridge": 5.0})
        x1, _ = damped(lambda v: A @ v, b, ridge=0.25)
        x2, _ = solver(lambda v: A @ v, b, ridge=0.25)
        np.testing.assert_allclose(x1, x2, rtol=1e-12)


@pytest.mark.parametrize("name", sorted(ALL_SOLVERS))
def test_vmap_over_right_hand_sides_equals_loop_for_every_solver(name):
    with jax.enable_x64(True):
        A, _ = spd_system(n=8, seed=7)
        B = jnp.asarray(np.random.RandomState(8).randn(3, 8))
        solver = DIFF_SOLVERS[name]
        solve = lambda b: solver(lambda v: A @ v, b)
        xb, sb = jax.vmap(solve)(B)
        for i in range(3):
            x, s = solve(B[i])
            np.testing.assert_allclose(xb[i], x, rtol=1e-9, atol=1e-12)
            assert int(sb.iterations[i]) == int(s.iterations)
            assert bool(sb.converged[i]) == bool(s.converged)


def test_a_non_transposable_matvec_still_solves_in_forward_mode():
    # A matvec JAX cannot transpose (a while loop) keeps working; only reverse mode needs it.
    def matvec(v):
        return jax.lax.while_loop(lambda c: c[1] < 1, lambda c: (2.0 * c[0], c[1] + 1), (v, 0))[0]

    x, stats = solvers.gmres(tol=1e-6)(matvec, jnp.ones(3))
    assert bool(stats.converged)
    np.testing.assert_allclose(x, 0.5, rtol=1e-6)


def test_neumann_calibrated_estimates_the_scale_once():
    """``calibrated`` fixes ``scale = safety / lambda_max(A + ridge I)``; the calibrated solver
    then runs no power iteration (as many matvecs as steps)."""
    rng = np.random.RandomState(0)
    Q = np.linalg.qr(rng.randn(6, 6))[0]
    A = jnp.asarray(Q @ np.diag([0.5, 1.0, 2.0, 3.0, 4.0, 8.0]) @ Q.T, jnp.float32)
    solver = solvers.neumann(steps=200, ridge=1.0, power_iters=100).calibrated(
        lambda v: A @ v, jnp.zeros(6), safety=0.5
    )
    assert isinstance(solver.scale, float)
    np.testing.assert_allclose(solver.scale, 0.5 / 9.0, rtol=1e-3)
    assert solver.steps == 200 and solver.ridge == 1.0
    calls = []

    def matvec(v):
        calls.append(1)
        return A @ v

    b = jnp.arange(1.0, 7.0)
    x, stats = solver(matvec, b)
    np.testing.assert_allclose(x, np.linalg.solve(np.asarray(A) + np.eye(6), b), rtol=1e-3)
    assert bool(stats.converged)
    one = solvers.neumann(steps=1, scale=solver.scale)
    calls.clear()
    jax.make_jaxpr(lambda b: one(matvec, b))(b)
    traced_fixed = len(calls)
    calls.clear()
    jax.make_jaxpr(lambda b: solvers.neumann(steps=1)(matvec, b))(b)
    assert len(calls) > traced_fixed  # scale=None adds the power iteration's matvec


def test_neumann_calibrated_rejects_bad_input():
    with pytest.raises(ValueError, match="safety"):
        solvers.neumann().calibrated(lambda v: v, jnp.zeros(2), safety=2.0)
    with pytest.raises(ValueError, match="not positive semi-definite or not finite"):
        solvers.neumann().calibrated(lambda v: jnp.nan * v, jnp.zeros(2))
    with pytest.raises(ValueError, match="ridge= damping"):
        solvers.neumann().calibrated(lambda v: -v, jnp.zeros(2))
