"""Test problems with known answers: ridge regression (closed form) and logistic regression."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def ridge_data(n=40, d=6, n_val=30, seed=0, dtype=np.float64):
    rng = np.random.RandomState(seed)
    w = rng.randn(d)
    X = rng.randn(n, d)
    y = X @ w + 0.5 * rng.randn(n)
    Xv = rng.randn(n_val, d)
    yv = Xv @ w + 0.5 * rng.randn(n_val)
    return tuple(jnp.asarray(a, dtype) for a in (X, y, Xv, yv))


def ridge_inner(w, log_lam, X, y):
    """0.5 mean squared error + 0.5 sum(exp(log_lam) * w^2) (scalar or per-feature log_lam)."""
    return 0.5 * jnp.mean((X @ w - y) ** 2) + 0.5 * jnp.sum(jnp.exp(log_lam) * w**2)


def ridge_solution(log_lam, X, y):
    n, d = X.shape
    lam = jnp.broadcast_to(jnp.exp(log_lam), (d,))
    return jnp.linalg.solve(X.T @ X / n + jnp.diag(lam), X.T @ y / n)


def val_loss(w, Xv, yv):
    return 0.5 * jnp.mean((Xv @ w - yv) ** 2)


def ridge_hypergrad(log_lam, X, y, Xv, yv):
    """Closed-form hypergradient d val_loss(w*(log_lam)) / d log_lam, by the closed-form w*."""
    return jax.grad(lambda h: val_loss(ridge_solution(h, X, y), Xv, yv))(log_lam)


def logistic_data(n=60, d=5, n_val=40, seed=1, dtype=np.float64):
    rng = np.random.RandomState(seed)
    w = rng.randn(d)
    X = rng.randn(n, d)
    y = (X @ w + 0.5 * rng.randn(n) > 0).astype(np.float64)
    Xv = rng.randn(n_val, d)
    yv = (Xv @ w + 0.5 * rng.randn(n_val) > 0).astype(np.float64)
    return tuple(jnp.asarray(a, dtype) for a in (X, y, Xv, yv))


def logistic_inner(w, log_lam, X, y):
    logits = X @ w
    nll = jnp.mean(jnp.logaddexp(0.0, logits) - y * logits)
    return nll + 0.5 * jnp.sum(jnp.exp(log_lam) * w**2)


def logistic_val(w, Xv, yv):
    logits = Xv @ w
    return jnp.mean(jnp.logaddexp(0.0, logits) - yv * logits)


def rel_err(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def both_modes(f):
    """``jax.grad(f)`` and ``jax.jacfwd(f)`` as one jitted program (one compile, not many eager
    ones)."""
    return jax.jit(lambda *args: (jax.grad(f)(*args), jax.jacfwd(f)(*args)))
