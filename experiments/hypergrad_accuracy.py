"""Hypergradient accuracy against cost: implicit (CG, Neumann, GMRES), unrolled and truncated.

Two problems, in float64, each with a per-feature L2 penalty ``exp(log_lam)`` as hyperparameter and
the validation loss at the inner solution as outer objective:

- **ridge**: synthetic least squares (default n=200, d=50) whose Hessian has a chosen condition
  number (eigenvalues log-spaced in ``[1/cond, 1]``); reference = the closed-form hypergradient
  (differentiating the dense solve ``w* = (X^T X / n + diag(lam))^{-1} X^T y / n``).
- **logistic**: scikit-learn's breast cancer data (300 train / 135 validation rows, 30 standardized
  features); reference = the implicit hypergradient with a dense (direct) linear solve at a
  Newton-converged inner solution, checked against central finite differences.

Methods and their cost:

- ``implicit-cg``, ``implicit-neumann``, ``implicit-gmres``: ``solvers.root_vjp`` at the exact
  inner solution with ``maxiter``/``steps`` = 1, 2, 4, ... and ``tol=0`` (so exactly that many
  iterations run); cost = Hessian-vector products actually evaluated (counted at run time, which
  includes GMRES's restart residuals). Neumann uses the step ``1 / lambda_max`` of the Hessian at
  the solution (computed once, not counted).
- ``unrolled``: ``solvers.argmin`` with gradient descent (step ``1/L``) from zero for ``T`` steps,
  ``adjoint=solvers.Unrolled()``; cost = ``T`` inner steps.
- ``truncated``: the same with ``T`` fixed and large, ``adjoint=solvers.Truncated(steps=K)``;
  cost = ``K`` differentiated steps (the ``T`` forward steps are not counted). At a converged
  ``w_T`` this is the ``K``-term Neumann series with step ``1/L`` (on ridge, where ``L`` is
  ``lambda_max``, the two curves coincide).

For logistic regression, ``L`` must bound the Hessian everywhere on the path from zero
(``lambda_max(X^T X) / (4 n) + lam``), which is ~15x its largest eigenvalue at the solution, so
gradient descent contracts like a problem of condition ``L / lambda_min`` (~350), not 23.5.

Printed: a table of the relative error at a few costs and the cost to reach 1e-6; saved: JSON, CSV
and a log-log plot of relative error against cost (one panel per problem).

    python -m experiments.hypergrad_accuracy            # default (about a minute on CPU)
    python -m experiments.hypergrad_accuracy --smoke    # seconds, for the test suite
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import solvers
from experiments._common import (
    load_breast_cancer,
    logistic_inner,
    logistic_val,
    make_parser,
    print_table,
    progress,
    pyplot,
    rel_error,
    results_dir,
    ridge_inner,
    ridge_val,
    save_csv,
    save_figure,
    save_json,
)

IMPLICIT_METHODS = ("implicit-cg", "implicit-neumann", "implicit-gmres")
METHODS = (*IMPLICIT_METHODS, "unrolled", "truncated")
TARGET = 1e-6  # relative error for the "cost to reach" column


# ----------------------------------------------------------------------------- problems


class Problem(NamedTuple):
    """One bilevel problem: ``min_lam val(w*(lam))``, ``w*(lam) = argmin_w inner(w, lam, X, y)``."""

    name: str
    inner: Callable
    val: Callable
    log_lam: jax.Array
    train: tuple[jax.Array, jax.Array]
    valid: tuple[jax.Array, jax.Array]
    w_star: jax.Array  # the exact (or Newton-converged) inner solution
    lr: float  # gradient-descent step of the unrolled / truncated inner loop
    reference: jax.Array  # reference hypergradient
    info: dict[str, Any]


def hessian_at_solution(p: Problem) -> np.ndarray:
    return np.asarray(jax.jit(jax.hessian(p.inner))(p.w_star, p.log_lam, *p.train))


def ridge_problem(n: int, d: int, cond: float, seed: int) -> Problem:
    """Least squares whose Hessian ``X^T X / n + diag(lam)`` has eigenvalues in ``[1/cond, 1]``."""
    rng = np.random.RandomState(seed)
    hess_eigs = np.logspace(0.0, -math.log10(cond), d)
    lam = 0.5 / cond  # half of the smallest Hessian eigenvalue comes from the penalty
    data_eigs = hess_eigs - lam
    basis = np.linalg.qr(rng.randn(d, d))[0]
    U = np.linalg.qr(rng.randn(n, d))[0]
    X = math.sqrt(n) * (U * np.sqrt(data_eigs)) @ basis.T  # X^T X / n = V diag(data_eigs) V^T
    w_true = rng.randn(d)
    y = X @ w_true + 0.5 * rng.randn(n)
    n_val = n
    Xv = (rng.randn(n_val, d) * np.sqrt(data_eigs)) @ basis.T
    yv = Xv @ w_true + 0.5 * rng.randn(n_val)
    X, y, Xv, yv = (jnp.asarray(a, jnp.float64) for a in (X, y, Xv, yv))
    log_lam = jnp.full(d, math.log(lam), jnp.float64)

    def closed_form(log_lam):
        hess = X.T @ X / n + jnp.diag(jnp.exp(log_lam))
        return jnp.linalg.solve(hess, X.T @ y / n)

    w_star, reference = jax.jit(
        lambda h: (closed_form(h), jax.grad(lambda h: ridge_val(closed_form(h), Xv, yv))(h))
    )(log_lam)
    p = Problem(
        "ridge",
        ridge_inner,
        ridge_val,
        log_lam,
        (X, y),
        (Xv, yv),
        w_star,
        1.0,
        reference,
        {},
    )
    eigs = np.linalg.eigvalsh(hessian_at_solution(p))
    info = {
        "data": f"synthetic, n={n}, d={d}, seed={seed}",
        "reference": "closed form (autodiff through the dense solve for w*)",
        "lam": lam,
        "hessian_condition": float(eigs[-1] / eigs[0]),
        "hessian_eig_range": [float(eigs[0]), float(eigs[-1])],
        "gd_step": float(1.0 / eigs[-1]),
    }
    return p._replace(lr=float(1.0 / eigs[-1]), info=info)


def newton(inner, w0, log_lam, X, y, iters: int = 40):
    """Newton's method on a small strictly convex problem (dense Hessian), float64."""

    def body(_, w):
        g = jax.grad(inner)(w, log_lam, X, y)
        return w - jnp.linalg.solve(jax.hessian(inner)(w, log_lam, X, y), g)

    return jax.lax.fori_loop(0, iters, body, w0)


def logistic_problem(lam: float, seed: int, fd_eps: float) -> Problem:
    """Per-feature L2 logistic regression on breast cancer; direct-solve reference, FD check."""
    split = load_breast_cancer(seed=seed)
    X, y, Xv, yv = (
        jnp.asarray(a, jnp.float64)
        for a in (split.x_train, split.y_train, split.x_val, split.y_val)
    )
    n, d = X.shape
    log_lam = jnp.full(d, math.log(lam), jnp.float64)
    solve = lambda h: newton(logistic_inner, jnp.zeros(d, jnp.float64), h, X, y)

    @jax.jit
    def reference_and_checks(log_lam):
        w_star = solve(log_lam)
        grad_norm = jnp.linalg.norm(jax.grad(logistic_inner)(w_star, log_lam, X, y))
        F = lambda w, h: jax.grad(logistic_inner)(w, h, X, y)
        cotangent = jax.grad(logistic_val)(w_star, Xv, yv)
        (reference,), _, _ = solvers.root_vjp(F, w_star, (log_lam,), cotangent, solvers.direct())
        # Central finite differences of val(w*(log_lam)), w* by Newton for each perturbation.
        shifts = jnp.concatenate([jnp.eye(d), -jnp.eye(d)]) * fd_eps
        vals = jax.vmap(lambda s: logistic_val(solve(log_lam + s), Xv, yv))(shifts)
        fd = (vals[:d] - vals[d:]) / (2 * fd_eps)
        return w_star, reference, grad_norm, fd

    w_star, reference, grad_norm, fd = reference_and_checks(log_lam)
    grad_norm = float(grad_norm)
    fd_diff = rel_error(fd, reference)

    # Gradient descent must be stable everywhere: L = lambda_max(X^T X) / (4 n) + max(lam).
    x_np = np.asarray(X)
    lipschitz = float(np.linalg.eigvalsh(x_np.T @ x_np).max() / (4 * n) + lam)
    p = Problem(
        "logistic",
        logistic_inner,
        logistic_val,
        log_lam,
        (X, y),
        (Xv, yv),
        w_star,
        1.0 / lipschitz,
        reference,
        {},
    )
    eigs = np.linalg.eigvalsh(hessian_at_solution(p))
    info = {
        "data": f"breast cancer (scikit-learn), n_train={n}, n_val={Xv.shape[0]}, d={d}, "
        "standardized",
        "reference": "implicit, direct (dense) linear solve at the Newton-converged solution",
        "lam": lam,
        "inner_grad_norm_at_reference": grad_norm,
        "fd_eps": fd_eps,
        "fd_vs_reference_rel_diff": fd_diff,
        "hessian_condition": float(eigs[-1] / eigs[0]),
        "hessian_eig_range": [float(eigs[0]), float(eigs[-1])],
        "gd_step": 1.0 / lipschitz,
    }
    return p._replace(info=info)


# ----------------------------------------------------------------------------- methods


class HvpCounter:
    """Counts Hessian-vector products as they execute (a ``jax.debug.callback`` in the backward
    pass of an identity placed on the parameters of the optimality function)."""

    def __init__(self):
        self.count = 0

        @jax.custom_vjp
        def tap(w):
            return w

        def fwd(w):
            return w, None

        def bwd(_, cotangent):
            jax.debug.callback(self._add)
            return (cotangent,)

        tap.defvjp(fwd, bwd)
        self.tap = tap

    def _add(self):
        self.count += 1

    def take(self) -> int:
        jax.effects_barrier()
        count, self.count = self.count, 0
        return count


def make_implicit(p: Problem, counter: HvpCounter):
    """Jitted ``(linear_solver) -> (hypergradient, stats)`` by ``solvers.root_vjp`` at ``w*``."""

    def hypergrad(w_star, log_lam, X, y, Xv, yv, linear_solver):
        F = lambda w, h: jax.grad(p.inner)(counter.tap(w), h, X, y)
        cotangent = jax.grad(p.val)(w_star, Xv, yv)
        (g,), _, stats = solvers.root_vjp(F, w_star, (log_lam,), cotangent, linear_solver)
        return g, stats

    fn = jax.jit(hypergrad, static_argnames="linear_solver")
    return lambda linear_solver: fn(
        p.w_star, p.log_lam, *p.train, *p.valid, linear_solver=linear_solver
    )


def make_argmin(p: Problem):
    """Jitted ``(steps, adjoint) -> hypergradient`` through ``solvers.argmin`` (gradient descent)."""

    def hypergrad(log_lam, X, y, Xv, yv, steps, adjoint):
        def outer(h):
            w = solvers.argmin(
                p.inner,
                jnp.zeros_like(p.w_star),
                h,
                X,
                y,
                optimizer=optax.sgd(p.lr),
                steps=steps,
                adjoint=adjoint,
            )
            return p.val(w, Xv, yv)

        return jax.grad(outer)(log_lam)

    fn = jax.jit(hypergrad, static_argnames=("steps", "adjoint"))
    return lambda steps, adjoint: fn(p.log_lam, *p.train, *p.valid, steps=steps, adjoint=adjoint)


def linear_solver_for(method: str, iters: int, neumann_scale: float) -> solvers.LinearSolver:
    if method == "implicit-cg":
        return solvers.cg(maxiter=iters, tol=0.0)
    if method == "implicit-neumann":
        return solvers.neumann(steps=iters, scale=neumann_scale, tol=0.0)
    if method == "implicit-gmres":
        return solvers.gmres(maxiter=iters, tol=0.0)
    raise ValueError(method)


def powers_of_two(maximum: int) -> list[int]:
    return [2**i for i in range(int(math.log2(maximum)) + 1)]


def sweep(p: Problem, iters: list[int], steps: list[int], truncated_total: int, bar) -> list[dict]:
    """All methods on one problem: one row per (method, cost)."""
    counter = HvpCounter()
    implicit = make_implicit(p, counter)
    through_argmin = make_argmin(p)
    neumann_scale = float(1.0 / np.linalg.eigvalsh(hessian_at_solution(p))[-1])
    rows = []
    for method in IMPLICIT_METHODS:
        for k in iters:
            bar.set_postfix_str(f"{p.name} {method} {k}")
            g, stats = implicit(linear_solver_for(method, k, neumann_scale))
            g = jax.block_until_ready(g)
            rows.append(
                {
                    "problem": p.name,
                    "method": method,
                    "setting": k,
                    "cost": counter.take(),
                    "cost_unit": "hvp",
                    "rel_error": rel_error(g, p.reference),
                    "iterations": int(stats.iterations),
                    "residual": float(stats.residual),
                }
            )
            bar.update()
    for method in ("unrolled", "truncated"):
        for k in steps:
            bar.set_postfix_str(f"{p.name} {method} {k}")
            if method == "unrolled":
                g = through_argmin(k, solvers.Unrolled())
            else:
                g = through_argmin(truncated_total, solvers.Truncated(steps=k))
            rows.append(
                {
                    "problem": p.name,
                    "method": method,
                    "setting": k,
                    "cost": k,
                    "cost_unit": "inner steps" if method == "unrolled" else "differentiated steps",
                    "rel_error": rel_error(g, p.reference),
                }
            )
            bar.update()
    return rows


# ----------------------------------------------------------------------------- report


def summary(rows: list[dict], checkpoints: list[int]) -> list[dict]:
    """Error at a few costs and the smallest cost reaching ``TARGET``, per problem and method."""
    table = []
    for problem in dict.fromkeys(r["problem"] for r in rows):
        for method in METHODS:
            mine = [r for r in rows if r["problem"] == problem and r["method"] == method]
            if not mine:
                continue
            row = {"problem": problem, "method": method, "unit": mine[0]["cost_unit"]}
            for c in checkpoints:
                at = [r["rel_error"] for r in mine if r["setting"] == c]
                row[f"err@{c}"] = at[0] if at else "-"
            reached = [r["cost"] for r in mine if r["rel_error"] <= TARGET]
            row[f"cost to {TARGET:g}"] = min(reached) if reached else "-"
            row["best err"] = min(r["rel_error"] for r in mine)
            table.append(row)
    return table


def plot(rows: list[dict], problems: list[Problem], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(problems), figsize=(6 * len(problems), 4.5), squeeze=False)
    for ax, p in zip(axes[0], problems, strict=True):
        for method in METHODS:
            mine = [r for r in rows if r["problem"] == p.name and r["method"] == method]
            if not mine:
                continue
            cost = [max(r["cost"], 1) for r in mine]
            err = [max(r["rel_error"], 1e-16) for r in mine]
            style = "-o" if method in IMPLICIT_METHODS else "--s"
            ax.loglog(cost, err, style, ms=3, label=method)
        ax.set_xlabel(
            "cost: Hessian-vector products (implicit) / inner steps (unrolled, truncated K)"
        )
        ax.set_ylabel("relative error of the hypergradient")
        ax.set_title(f"{p.name} (Hessian condition {p.info['hessian_condition']:.3g})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path, dpi=110)


def main(argv=None):
    parser = make_parser("hypergrad_accuracy", __doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="ridge: training examples")
    parser.add_argument("--d", type=int, default=50, help="ridge: features")
    parser.add_argument("--cond", type=float, default=100.0, help="ridge: Hessian condition")
    parser.add_argument("--lam", type=float, default=1e-2, help="logistic: L2 penalty per feature")
    parser.add_argument(
        "--max-iters", type=int, default=128, help="largest maxiter/steps of the linear solvers"
    )
    parser.add_argument(
        "--max-steps", type=int, default=8192, help="largest T (unrolled) and K (truncated)"
    )
    parser.add_argument(
        "--truncated-total",
        type=int,
        default=16384,
        help="inner steps T of the truncated runs (>= --max-steps)",
    )
    parser.add_argument("--fd-eps", type=float, default=1e-4, help="finite-difference step")
    args = parser.parse_args(argv)
    if args.smoke:
        args.n, args.d, args.cond = 40, 10, 20.0
        args.max_iters, args.max_steps, args.truncated_total = 8, 16, 256
    if args.truncated_total < args.max_steps:
        parser.error("--truncated-total must be >= --max-steps")
    out = results_dir(args)
    iters = powers_of_two(args.max_iters)
    steps = powers_of_two(args.max_steps)
    if args.smoke:  # every configuration is one compilation: keep two points per method
        iters, steps = [iters[0], iters[-1]], [steps[0], steps[-1]]

    with jax.enable_x64(True):
        problems = [
            ridge_problem(args.n, args.d, args.cond, args.seed),
            logistic_problem(args.lam, args.seed, args.fd_eps),
        ]
        rows = []
        total = len(problems) * (len(IMPLICIT_METHODS) * len(iters) + 2 * len(steps))
        with progress(total=total, desc="hypergrad accuracy", disable=args.no_progress) as bar:
            for p in problems:
                rows += sweep(p, iters, steps, args.truncated_total, bar)

    checkpoints = sorted({1, 8, iters[-1], steps[-1]})
    table = summary(rows, checkpoints)
    save_json(
        out / "hypergrad_accuracy.json",
        {
            "config": dict(vars(args)),
            "dtype": "float64",
            "truncated_total_steps": args.truncated_total,
            "problems": {p.name: p.info for p in problems},
            "rows": rows,
            "summary": table,
        },
    )
    save_csv(out / "hypergrad_accuracy.csv", rows)
    plot(rows, problems, out / "hypergrad_accuracy.png")

    for p in problems:
        details = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.info.items()
        )
        print(f"{p.name}: {details}")
    print_table(
        table,
        title=(
            "Relative error of the hypergradient (float64) at cost = "
            f"{', '.join(map(str, checkpoints))}; truncated: T={args.truncated_total}"
        ),
    )
    print(f"results in {out}")
    return {"problems": {p.name: p.info for p in problems}, "rows": rows, "summary": table}


if __name__ == "__main__":
    main()
