import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import solvers
from solvers._implicit import ImplicitSolveWarning
from tests.solvers.problems import (
    rel_err,
    ridge_data,
    ridge_hypergrad,
    ridge_inner,
    ridge_solution,
    val_loss,
)

LINEAR_SOLVERS = {
    "cg": solvers.cg(tol=1e-12),
    "gmres": solvers.gmres(tol=1e-12),
    "bicgstab": solvers.bicgstab(tol=1e-12),
    "direct": solvers.direct(),
    "neumann": solvers.neumann(steps=20000, tol=1e-12),
}


@pytest.fixture(autouse=True)
def fresh_warning_registry():
    """Each test sees the once-per-process warning of the implicit rules afresh."""
    solvers._implicit._WARNED.clear()
    yield
    solvers._implicit._WARNED.clear()


def ridge_optimality(w, log_lam, X, y):
    return jax.grad(ridge_inner)(w, log_lam, X, y)


def closed_form_solver(linear_solver):
    @solvers.custom_root(ridge_optimality, linear_solver=linear_solver)
    def solve(init_params, log_lam, X, y):
        del init_params
        # The closed form is computed without derivatives: only the implicit rule differentiates.
        return jax.lax.stop_gradient(ridge_solution(log_lam, X, y))

    return solve


@pytest.mark.parametrize("name", sorted(LINEAR_SOLVERS))
@pytest.mark.parametrize("per_feature", [False, True])
def test_custom_root_closed_form_reverse_and_forward(name, per_feature):
    with jax.enable_x64(True):
        X, y, Xv, yv = ridge_data()
        log_lam = jnp.linspace(-2.0, 0.5, X.shape[1]) if per_feature else jnp.asarray(-1.0)
        solve = closed_form_solver(LINEAR_SOLVERS[name])
        outer = lambda h: val_loss(solve(None, h, X, y), Xv, yv)
        sol = lambda h: solve(None, h, X, y)
        # The hypergradient and the solution's Jacobian, both modes, as one jitted program (one
        # compile, not many small eager ones).
        derivatives = jax.jit(
            lambda h: (
                jax.grad(outer)(h),
                jax.jacfwd(outer)(h),
                jax.jacrev(sol)(h),
                jax.jacfwd(sol)(h),
            )
        )
        rev, fwd, jac_rev, jac_fwd = derivatives(log_lam)
        expected = ridge_hypergrad(log_lam, X, y, Xv, yv)
        assert rel_err(rev, expected) <= 1e-6
        assert rel_err(fwd, expected) <= 1e-6
        jac = jax.jacobian(lambda h: ridge_solution(h, X, y))(log_lam)
        assert rel_err(jac_rev, jac) <= 1e-6
        assert rel_err(jac_fwd, jac) <= 1e-6


def test_custom_root_differentiates_data_arguments_too():
    with jax.enable_x64(True):
        X, y, Xv, yv = ridge_data()
        solve = closed_form_solver(solvers.cg(tol=1e-12))
        got = jax.grad(lambda y: val_loss(solve(None, -1.0, X, y), Xv, yv))(y)
        want = jax.grad(lambda y: val_loss(ridge_solution(-1.0, X, y), Xv, yv))(y)
        assert rel_err(got, want) <= 1e-8


def test_forward_mode_through_custom_root():
    # jaxopt #474: custom_root was reverse-only (custom_vjp); jvp/jacfwd must work here.
    with jax.enable_x64(True):
        X, y, _, _ = ridge_data()
        solve = closed_form_solver(solvers.cg(tol=1e-12))
        _w, w_dot = jax.jvp(lambda h: solve(None, h, X, y), (jnp.asarray(-1.0),), (1.0,))
        _, expected = jax.jvp(lambda h: ridge_solution(h, X, y), (jnp.asarray(-1.0),), (1.0,))
        assert rel_err(w_dot, expected) <= 1e-8


@pytest.mark.parametrize("transform", ["jit", "vmap", "grad", "grad_of_hypergrad"])
def test_optimality_fn_closing_over_traced_values(transform):
    # jaxopt #31 / #111: an optimality function that closes over tracers (here the data X and the
    # scale c) must be differentiated w.r.t. them, under jit, vmap and an outer grad.
    with jax.enable_x64(True):
        X, y, Xv, yv = ridge_data()

        def solution(c, log_lam):
            def optimality(w, log_lam):
                return jax.grad(ridge_inner)(w, log_lam, c * X, y)

            @solvers.custom_root(optimality, linear_solver=solvers.cg(tol=1e-12))
            def solve(_, log_lam):
                return jax.lax.stop_gradient(ridge_solution(log_lam, c * X, y))

            return solve(None, log_lam)

        def hypergrad(c, log_lam):
            return jax.grad(lambda h: val_loss(solution(c, h), Xv, yv))(log_lam)

        def expected(c, log_lam):
            f = lambda h: val_loss(ridge_solution(h, c * X, y), Xv, yv)
            return jax.grad(f)(log_lam)

        if transform == "jit":
            got, want = jax.jit(hypergrad)(1.3, -1.0), expected(1.3, -1.0)
        elif transform == "vmap":
            cs = jnp.array([0.7, 1.0, 1.3])
            got = jax.vmap(hypergrad, in_axes=(0, None))(cs, -1.0)
            want = jnp.stack([expected(c, -1.0) for c in cs])
        elif transform == "grad":  # derivative w.r.t. the closed-over c, through the root
            got = jax.grad(lambda c: val_loss(solution(c, -1.0), Xv, yv))(1.3)
            want = jax.grad(lambda c: val_loss(ridge_solution(-1.0, c * X, y), Xv, yv))(1.3)
        else:  # the hypergradient itself differentiated w.r.t. c (second order, mixed)
            got = jax.grad(hypergrad)(1.3, -1.0)
            want = jax.grad(expected)(1.3, -1.0)
        assert rel_err(got, want) <= 1e-6


def test_custom_root_has_aux():
    with jax.enable_x64(True):
        X, y, Xv, yv = ridge_data()

        @solvers.custom_root(ridge_optimality, has_aux=True, linear_solver=solvers.cg(tol=1e-12))
        def solve(_, log_lam, X, y):
            return jax.lax.stop_gradient(ridge_solution(log_lam, X, y)), {"iters": 7}

        _w, aux = solve(None, -1.0, X, y)
        assert aux == {"iters": 7}
        got = jax.grad(lambda h: val_loss(solve(None, h, X, y)[0], Xv, yv))(-1.0)
        assert rel_err(got, ridge_hypergrad(-1.0, X, y, Xv, yv)) <= 1e-6


def test_fixed_point_contraction_against_finite_differences():
    with jax.enable_x64(True):
        rng = np.random.RandomState(0)
        M = jnp.asarray(rng.randn(6, 6))
        M = 0.5 * M / jnp.linalg.norm(M, 2)  # contraction: ||M|| = 0.5 (non-symmetric)

        def T(w, theta):
            return jnp.tanh(M @ w + theta)

        @solvers.custom_fixed_point(T, linear_solver=solvers.gmres(tol=1e-12))
        def solve(w0, theta):
            return jax.lax.fori_loop(0, 200, lambda _, w: T(w, theta), w0)

        theta = jnp.asarray(rng.randn(6))
        u = jnp.asarray(rng.randn(6))
        f = lambda th: jnp.dot(u, solve(jnp.zeros(6), th))
        g = jax.grad(f)(theta)
        eps = 1e-6
        fd = np.array([(f(theta + eps * e) - f(theta - eps * e)) / (2 * eps) for e in np.eye(6)])
        assert rel_err(g, fd) <= 1e-6
        assert rel_err(jax.jacfwd(f)(theta), fd) <= 1e-6


def test_unconverged_backward_solve_is_not_silently_zero():
    # jaxopt #466: a capped linear solve still returns its last iterate, so the hypergradient is
    # an approximation (not zero), and root_vjp reports the non-convergence.
    with jax.enable_x64(True):
        X, y, Xv, yv = ridge_data()
        solve = closed_form_solver(solvers.cg(maxiter=1))
        # The capped solve is intended here: the rule says so with its one-time warning.
        with pytest.warns(ImplicitSolveWarning, match="did not converge"):
            g = jax.grad(lambda h: val_loss(solve(None, h, X, y), Xv, yv))(jnp.zeros(6) - 1.0)
            jax.effects_barrier()
        assert float(jnp.linalg.norm(g)) > 0
        w = ridge_solution(-1.0, X, y)
        cot = jax.grad(val_loss)(w, Xv, yv)
        _, _, stats = solvers.root_vjp(
            ridge_optimality, w, (-1.0, X, y), cot, linear_solver=solvers.cg(maxiter=1)
        )
        assert not bool(stats.converged) and int(stats.iterations) == 1


def test_root_vjp_matches_custom_root_vjp_and_warm_starts():
    with jax.enable_x64(True):
        X, y, Xv, yv = ridge_data()
        log_lam = jnp.linspace(-2.0, 0.5, 6)
        w = ridge_solution(log_lam, X, y)
        cot = jax.grad(val_loss)(w, Xv, yv)
        (g_lam, _, _), u, stats = solvers.root_vjp(
            ridge_optimality, w, (log_lam, X, y), cot, linear_solver=solvers.cg(tol=1e-12)
        )
        assert bool(stats.converged)
        assert rel_err(g_lam, ridge_hypergrad(log_lam, X, y, Xv, yv)) <= 1e-8
        _, _, warm = solvers.root_vjp(ridge_optimality, w, (log_lam, X, y), cot, init=u)
        assert int(warm.iterations) == 0


def test_matches_jaxopt_reference():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from jaxopt import implicit_diff, linear_solve

    with jax.enable_x64(True):
        X, y, Xv, yv = ridge_data()
        ref_solve = implicit_diff.custom_root(
            ridge_optimality, solve=lambda mv, b: linear_solve.solve_cg(mv, b, tol=1e-12)
        )(lambda _, h, X, y: ridge_solution(h, X, y))
        ours = closed_form_solver(solvers.cg(tol=1e-12))
        h = jnp.linspace(-2.0, 0.5, 6)
        g_ref = jax.grad(lambda h: val_loss(ref_solve(None, h, X, y), Xv, yv))(h)
        g_ours = jax.grad(lambda h: val_loss(ours(None, h, X, y), Xv, yv))(h)
        assert rel_err(g_ours, g_ref) <= 1e-8


def test_optimality_output_structure_mismatch_is_a_clear_error():
    @solvers.custom_root(lambda w, a: {"w": w}, linear_solver=solvers.cg())
    def solve(w0, a):
        return w0

    with pytest.raises(ValueError, match="shaped like params"):
        solve(jnp.ones(3), 1.0)


def test_bad_linear_solver_is_a_type_error():
    with pytest.raises(TypeError, match="linear solver"):
        solvers.custom_root(lambda w, a: w, linear_solver="cg")


def test_custom_root_jit_no_retrace():
    X, y, Xv, yv = ridge_data(dtype=np.float32)
    solve = closed_form_solver(solvers.cg(tol=1e-6))
    traces = []

    @jax.jit
    def hypergrad(h):
        traces.append(1)
        return jax.grad(lambda h: val_loss(solve(None, h, X, y), Xv, yv))(h)

    g1 = hypergrad(jnp.float32(-1.0))
    g2 = hypergrad(jnp.float32(-0.5))
    assert len(traces) == 1
    assert g1.dtype == jnp.float32 and g2.dtype == jnp.float32
    with jax.enable_x64(True):
        X64, y64, Xv64, yv64 = ridge_data()
        assert rel_err(g1, ridge_hypergrad(-1.0, X64, y64, Xv64, yv64)) <= 1e-3


# --- reporting a failed linear solve from inside the rule --------------------------------------


def capped_ridge_solver(**options):
    X, y, _, _ = ridge_data()

    optimality = lambda w, log_lam: ridge_optimality(w, log_lam, X, y)

    @solvers.custom_root(optimality, linear_solver=solvers.cg(maxiter=1), **options)
    def solve(_, log_lam):
        return jax.lax.stop_gradient(ridge_solution(log_lam, X, y))

    return solve


@pytest.mark.parametrize("mode", ["grad", "jit_grad", "jvp", "vmap_grad"])
def test_unconverged_solve_inside_the_rule_warns_once(mode):
    with jax.enable_x64(True):
        solve = capped_ridge_solver()
        f = lambda h: jnp.sum(solve(None, h))
        run = {
            "grad": lambda: jax.grad(f)(-1.0),
            "jit_grad": lambda: jax.jit(jax.grad(f))(-1.0),
            "jvp": lambda: jax.jvp(f, (-1.0,), (1.0,)),
            "vmap_grad": lambda: jax.vmap(jax.grad(f))(jnp.array([-1.0, 0.0])),
        }[mode]
        with pytest.warns(ImplicitSolveWarning, match="custom_root.*did not converge") as record:
            run()
            jax.effects_barrier()
            run()  # once per process for this rule and solver
            jax.effects_barrier()
        assert len([w for w in record if w.category is ImplicitSolveWarning]) == 1


def test_converged_solve_inside_the_rule_does_not_warn():
    with jax.enable_x64(True):
        X, y, Xv, yv = ridge_data()
        solve = closed_form_solver(solvers.cg(tol=1e-12))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            jax.grad(lambda h: val_loss(solve(None, h, X, y), Xv, yv))(-1.0)
            jax.effects_barrier()


@pytest.mark.parametrize("jit", [False, True])
def test_throw_raises_when_the_backward_solve_fails(jit):
    with jax.enable_x64(True):
        solve = capped_ridge_solver(throw=True, warn=False)
        g = jax.grad(lambda h: jnp.sum(solve(None, h)))
        g = jax.jit(g) if jit else g
        with pytest.raises(RuntimeError, match="LINEAR_SOLVE_FAILED"):
            jax.block_until_ready(g(-1.0))
            jax.effects_barrier()


def test_throw_raises_when_the_forward_mode_solve_fails():
    with jax.enable_x64(True):
        solve = capped_ridge_solver(throw=True, warn=False)
        with pytest.raises(RuntimeError, match="LINEAR_SOLVE_FAILED"):
            jax.block_until_ready(jax.jvp(lambda h: solve(None, h), (-1.0,), (1.0,)))
            jax.effects_barrier()


def test_throw_is_silent_when_the_solve_converges():
    with jax.enable_x64(True):
        X, y, Xv, yv = ridge_data()

        optimality = lambda w, log_lam: ridge_optimality(w, log_lam, X, y)

        @solvers.custom_root(optimality, linear_solver=solvers.cg(tol=1e-10), throw=True)
        def solve(_, log_lam):
            return jax.lax.stop_gradient(ridge_solution(log_lam, X, y))

        g = jax.jit(jax.grad(lambda h: val_loss(solve(None, h), Xv, yv)))(-1.0)
        jax.effects_barrier()
        assert rel_err(g, ridge_hypergrad(-1.0, X, y, Xv, yv)) <= 1e-8


def test_custom_fixed_point_and_implicit_solution_report_too():
    d = jnp.array([0.1, 0.5, 0.9])
    Tm = lambda w, a: d * w + a  # I - d_w T = diag(1 - d): one GMRES step cannot solve it

    @solvers.custom_fixed_point(Tm, linear_solver=solvers.gmres(maxiter=1, restart=1), throw=True)
    def solve(w0, a):
        return a / (1 - d)

    with pytest.raises(RuntimeError, match="custom_fixed_point"):
        jax.block_until_ready(jax.grad(lambda a: jnp.sum(solve(jnp.zeros(3), a)))(jnp.arange(3.0)))
        jax.effects_barrier()
    F = lambda w, a: jnp.diag(jnp.arange(1.0, 4.0)) @ w - a
    with pytest.warns(ImplicitSolveWarning, match="implicit_solution"):
        jax.grad(
            lambda a: jnp.sum(
                solvers.implicit_solution(F, a, (a,), solvers.cg(maxiter=1), symmetric=True)
            )
        )(jnp.ones(3))
        jax.effects_barrier()


# --- singular implicit systems -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["cg", "gmres", "bicgstab", "direct", "neumann"])
def test_singular_implicit_system_is_reported_by_root_vjp(name):
    # w**2 - a at a = 0: d_w F = 2w = 0. The derivative used to come back as 0 with no signal.
    F = lambda w, a: w**2 - a
    linear_solver = {
        "cg": solvers.cg(),
        "gmres": solvers.gmres(),
        "bicgstab": solvers.bicgstab(),
        "direct": solvers.direct(),
        "neumann": solvers.neumann(),
    }[name]
    w, a, cot = jnp.zeros(2), (jnp.zeros(2),), jnp.ones(2)
    _, _, stats = solvers.root_vjp(F, w, a, cot, linear_solver=linear_solver)
    assert not bool(stats.converged)
    assert not float(stats.residual) < 0.5  # no progress (1.0) or not finite
    with pytest.raises(RuntimeError, match="root_vjp"):
        solvers.root_vjp(F, w, a, cot, linear_solver=linear_solver, throw=True)


def test_singular_implicit_system_raises_with_throw_in_custom_root():
    F = lambda w, a: w**2 - a

    @solvers.custom_root(F, throw=True, warn=False)
    def sqrt(w0, a):
        return jnp.sqrt(a)

    assert float(jax.grad(lambda a: jnp.sum(sqrt(jnp.ones(1), a)))(jnp.array([4.0]))[0]) == 0.25
    with pytest.raises(RuntimeError, match="custom_root"):
        jax.block_until_ready(jax.grad(lambda a: jnp.sum(sqrt(jnp.ones(1), a)))(jnp.zeros(1)))
        jax.effects_barrier()
    with pytest.warns(ImplicitSolveWarning):  # the default: a warning, not silence

        @solvers.custom_root(F)
        def sqrt_warn(w0, a):
            return jnp.sqrt(a)

        jax.grad(lambda a: jnp.sum(sqrt_warn(jnp.ones(1), a)))(jnp.zeros(1))
        jax.effects_barrier()


# --- keyword arguments ----------------------------------------------------------------------


def test_custom_root_solver_accepts_keyword_arguments():
    F = lambda w, lam: 2 * (w - 3.0) + 2 * lam * w

    @solvers.custom_root(F)
    def solve(w0, lam):
        return 3.0 / (1.0 + lam)

    want = -0.75
    assert float(solve(None, lam=1.0)) == 1.5
    assert round(float(jax.grad(lambda lam: solve(None, lam=lam))(1.0)), 5) == want
    assert round(float(jax.grad(lambda lam: solve(w0=None, lam=lam))(1.0)), 5) == want
    assert round(float(jax.jacfwd(lambda lam: solve(None, lam=lam))(1.0)), 5) == want
    with pytest.raises(TypeError, match="invalid arguments"):
        solve(None, mu=1.0)


def test_keyword_only_and_defaulted_solver_arguments():
    def F(w, lam, *, scale):
        return scale * (2 * (w - 3.0) + 2 * lam * w)

    @solvers.custom_root(F)
    def solve(w0, lam, *, scale, iters=10):
        del iters  # a solver-only option with a default is not passed to F
        return 3.0 / (1.0 + lam)

    g = jax.grad(lambda lam: solve(None, lam, scale=2.0))(1.0)
    assert round(float(g), 5) == -0.75
    g = jax.grad(lambda s: solve(None, 1.0, scale=s))(2.0)  # d w*/d scale = 0
    assert float(g) == 0.0


def test_custom_fixed_point_solver_accepts_keyword_arguments():
    Tm = lambda w, a: 0.5 * w + a

    @solvers.custom_fixed_point(Tm)
    def solve(w0, a):
        return jax.lax.fori_loop(0, 60, lambda _, w: Tm(w, a), w0)

    assert round(float(jax.grad(lambda a: solve(w0=0.0, a=a))(1.0)), 4) == 2.0


# --- default budget inside the rule ----------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_default_cg_hypergradient_is_accurate_on_an_ill_conditioned_hessian(dtype):
    # With maxiter = n the default CG stopped at a residual of 0.17 on this 10 x 10 system
    # (condition 1e4) and the hypergradient was 60-69 % wrong, silently.
    with jax.enable_x64(dtype == "float64"):
        rng = np.random.RandomState(0)
        Q, _ = np.linalg.qr(rng.randn(10, 10))
        H = jnp.asarray((Q * np.logspace(0, -4, 10)) @ Q.T, dtype)
        c = jnp.asarray(rng.randn(10), dtype)
        F = lambda w, theta: H @ w - theta  # grad of 0.5 w'Hw - theta'w

        @solvers.custom_root(F, linear_solver=solvers.cg(), throw=True)
        def solve(w0, theta):
            return jax.lax.stop_gradient(jnp.linalg.solve(H, theta))

        theta = jnp.asarray(rng.randn(10), dtype)
        g = jax.grad(lambda t: jnp.dot(c, solve(None, t)))(theta)
        jax.effects_barrier()
        want = np.linalg.solve(np.asarray(H, np.float64).T, np.asarray(c, np.float64))
        assert rel_err(np.asarray(g, np.float64), want) <= (5e-2 if dtype == "float32" else 1e-6)
