"""``solvers.nystrom``: exact where the theory says, usable wherever a linear solver is."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import solvers
from tests.solvers.test_linear import spd_system, tree_system


def _exact(A, b, rho):
    return np.linalg.solve(A + rho * np.eye(len(b)), b)


def test_full_rank_is_exact_in_float64():
    with jax.enable_x64(True):
        A, b = spd_system(30, seed=1)
        x, stats = solvers.nystrom(30, 1e-3)(lambda v: jnp.asarray(A) @ v, jnp.asarray(b))
        np.testing.assert_allclose(x, _exact(A, b, 1e-3), rtol=1e-10, atol=1e-12)
        assert bool(stats.converged) and int(stats.iterations) == 31
        assert float(stats.residual) < 1e-12


@pytest.mark.parametrize("rank_a", [3, 8])
def test_exact_when_the_operator_has_rank_at_most_k(rank_a):
    """A PSD operator of rank r <= k < n: the Nystrom approximation is A itself; b has a
    null-space component, which (A + rho I)^-1 divides by rho."""
    with jax.enable_x64(True):
        rng = np.random.RandomState(0)
        n, k, rho = 40, 8, 0.05
        F = rng.randn(n, rank_a)
        A = F @ F.T  # singular: every k x k block A_KK with k > r is singular too
        b = rng.randn(n)
        x, stats = solvers.nystrom(k, rho, key=3)(lambda v: jnp.asarray(A) @ v, jnp.asarray(b))
        np.testing.assert_allclose(x, _exact(A, b, rho), rtol=1e-8, atol=1e-10)
        assert bool(stats.converged)


def test_indefinite_operator_full_rank_is_exact():
    with jax.enable_x64(True):
        rng = np.random.RandomState(2)
        Q, _ = np.linalg.qr(rng.randn(12, 12))
        A = Q @ np.diag(np.linspace(-2.0, 3.0, 12)) @ Q.T
        b = rng.randn(12)
        x, _ = solvers.nystrom(12, 0.1)(lambda v: jnp.asarray(A) @ v, jnp.asarray(b))
        np.testing.assert_allclose(x, _exact(A, b, 0.1), rtol=1e-9)


def test_low_rank_approximation_beats_neumann_at_equal_products_on_a_fast_decaying_spectrum():
    """Not a claim that Nystrom beats CG per product (it does not); on a spectrum with a few
    large eigenvalues, k columns capture them while k Neumann steps barely move."""
    with jax.enable_x64(True):
        rng = np.random.RandomState(4)
        n, k, rho = 60, 10, 0.1
        Q, _ = np.linalg.qr(rng.randn(n, n))
        eig = np.concatenate([np.logspace(2, 0, k), np.full(n - k, 1e-3)])
        A = Q @ np.diag(eig) @ Q.T
        b = rng.randn(n)
        mv = lambda v: jnp.asarray(A) @ v
        exact = _exact(A, b, rho)
        err = lambda x: np.linalg.norm(np.asarray(x) - exact) / np.linalg.norm(exact)
        x_nys, _ = solvers.nystrom(k, rho)(mv, jnp.asarray(b))
        x_neu, _ = solvers.neumann(steps=k + 1, scale=1.0 / eig.max(), ridge=rho)(mv, b)
        assert err(x_nys) < 0.5 * err(x_neu)
        assert np.isfinite(err(x_nys))


def test_pytrees_jit_vmap_and_no_retrace():
    A, b = spd_system(25, seed=5)
    mv, bt, from_tree = tree_system(jnp.asarray(A, jnp.float32), b)
    bt = jax.tree.map(lambda a: a.astype(jnp.float32), bt)
    solve = solvers.nystrom(25, 0.5)
    traces = []

    @jax.jit
    def run(rhs):
        traces.append(1)
        return solve(mv, rhs)[0]

    x = run(bt)
    np.testing.assert_allclose(from_tree(x), _exact(A, b, 0.5), rtol=2e-4, atol=2e-5)
    run(jax.tree.map(lambda a: 2 * a, bt))
    assert len(traces) == 1
    batch = jax.tree.map(lambda a: jnp.stack([a, -a]), bt)
    xs = jax.vmap(lambda r: solve(mv, r)[0])(batch)
    np.testing.assert_allclose(from_tree(jax.tree.map(lambda a: a[1], xs)), -from_tree(x), 1e-5)


def test_derivatives_are_those_of_the_damped_system():
    """grad through the solve w.r.t. b and w.r.t. a parameter of the operator equals the
    derivative of (A(t) + rho I)^-1 b computed densely (k = n: the solve is exact)."""
    with jax.enable_x64(True):
        A, b = spd_system(10, seed=6)
        A, b = jnp.asarray(A), jnp.asarray(b)
        rho, w = 0.2, jnp.linspace(-1.0, 1.0, 10)

        def via_nystrom(t, rhs):
            x, _ = solvers.nystrom(10, rho)(lambda v: (A + t * jnp.diag(w**2)) @ v, rhs)
            return jnp.sum(jnp.sin(x))

        def dense(t, rhs):
            return jnp.sum(
                jnp.sin(jnp.linalg.solve(A + t * jnp.diag(w**2) + rho * jnp.eye(10), rhs))
            )

        got = jax.grad(via_nystrom, argnums=(0, 1))(0.3, b)
        want = jax.grad(dense, argnums=(0, 1))(0.3, b)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-9)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-9)


def test_usable_as_the_implicit_solver_of_argmin():
    """Ridge regression: the IFT hypergradient through Nystrom (k = d, tiny rho) equals CG's."""
    with jax.enable_x64(True):
        rng = np.random.RandomState(7)
        X, y = jnp.asarray(rng.randn(50, 8)), jnp.asarray(rng.randn(50))
        Xv, yv = jnp.asarray(rng.randn(20, 8)), jnp.asarray(rng.randn(20))
        inner = lambda w, lam: jnp.mean((X @ w - y) ** 2) + jnp.exp(lam) * jnp.sum(w**2)

        def val(lam, solver):
            w = solvers.argmin(
                inner, jnp.zeros(8), lam, optimizer=optax.lbfgs(), steps=200, tol=1e-12,
                adjoint=solvers.Implicit(linear_solver=solver),
            )  # fmt: skip
            return jnp.mean((Xv @ w - yv) ** 2)

        g_nys = jax.grad(val)(-1.0, solvers.nystrom(8, 1e-10))
        g_cg = jax.grad(val)(-1.0, solvers.cg(tol=1e-12))
        np.testing.assert_allclose(g_nys, g_cg, rtol=1e-6)


def test_the_key_chooses_the_columns():
    A, b = spd_system(20, seed=8)
    mv = lambda v: jnp.asarray(A, jnp.float32) @ v
    b = jnp.asarray(b, jnp.float32)
    x0 = solvers.nystrom(5, 0.1)(mv, b)[0]
    np.testing.assert_array_equal(x0, solvers.nystrom(5, 0.1, key=None)(mv, b)[0])
    x1 = solvers.nystrom(5, 0.1, key=jax.random.key(1))(mv, b)[0]
    np.testing.assert_array_equal(x1, solvers.nystrom(5, 0.1, key=1)(mv, b)[0])
    assert not np.allclose(x0, x1)
    assert solvers.nystrom(5, 0.1, key=1) == solvers.nystrom(5, 0.1, key=jax.random.key(1))
    assert hash(solvers.nystrom(5, 0.1, key=jax.random.PRNGKey(1))) == hash(
        solvers.nystrom(5, 0.1, key=1)
    )


def test_bad_input_is_a_clear_error_and_nonfinite_shows():
    mv = lambda v: 2.0 * v
    with pytest.raises(ValueError, match="rank=9 exceeds the 4 unknowns"):
        solvers.nystrom(9, 0.1)(mv, jnp.ones(4))
    with pytest.raises(ValueError, match="rho"):
        solvers.nystrom(3, 0.0)
    with pytest.raises(ValueError, match="rank"):
        solvers.nystrom(0, 0.1)
    with pytest.raises(TypeError, match="key must be"):
        solvers.nystrom(3, 0.1, key="seed")
    x, stats = solvers.nystrom(np.int64(4), np.float32(0.1))(mv, jnp.ones(4))
    np.testing.assert_allclose(x, jnp.full(4, 1 / 2.1), rtol=1e-5)
    _, stats = solvers.nystrom(4, 0.1)(mv, jnp.array([1.0, jnp.nan, 0.0, 0.0]))
    assert not np.isfinite(float(stats.residual)) and not bool(stats.converged)
