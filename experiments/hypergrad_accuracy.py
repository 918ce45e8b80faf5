"""Hypergradient accuracy against cost: implicit (CG, Neumann, GMRES), unrolled and truncated.

Two problems, in float64, each with a per-feature L2 penalty ``exp(log_lam)`` as hyperparameter and
the validation loss at the inner solution as outer objective:

- **ridge**: synthetic least squares (default n=200, d=50) whose Hessian has a chosen condition
  number (eigenvalues log-spaced in ``[1/cond, 1]``); reference = the closed-form hypergradient
  (differentiating the dense solve ``w* = (X^T X / n + diag(lam))^{-1} X^T y / n``).
- **logistic**: scikit-learn's breast cancer data (300 train / 135 validation rows, 30 standardized
  features); reference = the implicit hypergradient with a dense (direct) linear solve at a
  Newton-converged inner solution, checked against central finite differences.

Methods and their cost (the budgets are powers of two: 1, 2, 4, ...):

- ``implicit-cg``, ``implicit-neumann``, ``implicit-gmres``: ``solvers.root_vjp`` at the exact
  inner solution with ``maxiter``/``steps`` = the budget and ``tol=0`` (so that many iterations
  run); cost = Hessian-vector products (HVPs) actually evaluated, counted at run time (GMRES also
  pays the true residual at each restart). Neumann uses the step ``1 / lambda_max`` of the
  Hessian at the solution (computed once, not counted).
- ``unrolled``: ``solvers.argmin`` with gradient descent (step ``1/L``) from zero for ``T``
  steps, ``adjoint=solvers.Unrolled()``; cost = ``T`` differentiated inner steps.
- ``truncated``: the same with ``T`` fixed and large (``--truncated-total``),
  ``adjoint=solvers.Truncated(steps=K)``; cost = ``K`` differentiated steps (the ``T`` forward
  steps are not counted). At a converged ``w_T`` this is the ``K``-term Neumann series with step
  ``1/L``: on ridge, where ``L`` is ``lambda_max``, its curve lies on Neumann's.

One differentiated inner step costs about one HVP (the reverse pass through a gradient step), so
both costs share the x axis. For logistic regression, ``L`` must bound the Hessian everywhere on
the path from zero (``lambda_max(X^T X) / (4 n) + lam``), ~15x its largest eigenvalue at the
solution, so gradient descent contracts like a problem of condition ``L / lambda_min`` (~350), not
23.5.

Nothing is timed: every program is compiled with XLA's fast-compile options
(``_common.FAST_COMPILE``), and one program holds several (method, budget) pairs.

Printed: the relative error at a few budgets and the budget reaching 1e-6; saved: JSON, CSV, a
log-log plot of relative error against cost (one panel per problem) and ``summary.json``.

    python -m experiments.hypergrad_accuracy            # default
    python -m experiments.hypergrad_accuracy --smoke    # seconds, for the test suite
"""

from __future__ import annotations

import collections
import functools
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import solvers
from experiments import _common
from experiments._common import (
    load_breast_cancer,
    logistic_inner,
    logistic_val,
    rel_error,
    ridge_inner,
    ridge_val,
)

NAME = "hypergrad_accuracy"
IMPLICIT_METHODS = ("implicit-cg", "implicit-neumann", "implicit-gmres")
ARGMIN = ("unrolled", "truncated")
METHODS = (*IMPLICIT_METHODS, *ARGMIN)
LABELS = {
    "implicit-cg": "implicit, CG",
    "implicit-neumann": "implicit, Neumann",
    "implicit-gmres": "implicit, GMRES",
    "unrolled": "unrolled (T steps)",
    "truncated": "truncated (last K of T steps)",
}
PROBLEMS = ("ridge", "logistic")
TARGET = 1e-6  # relative error for the "budget to reach" column
# (method, budget) pairs compiled together: fewer programs compile faster, more keep the bar moving.
PER_PROGRAM = 4


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
    lambda_max: float  # largest Hessian eigenvalue at w_star (Neumann's step is its inverse)
    reference: jax.Array  # reference hypergradient
    info: dict[str, Any]


def _hessian_info(hessian) -> dict[str, Any]:
    eigs = np.linalg.eigvalsh(np.asarray(hessian))
    return {
        "hessian_condition": float(eigs[-1] / eigs[0]),
        "hessian_eig_min": float(eigs[0]),
        "hessian_eig_max": float(eigs[-1]),
    }


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
    Xv = (rng.randn(n, d) * np.sqrt(data_eigs)) @ basis.T
    yv = Xv @ w_true + 0.5 * rng.randn(n)
    X, y, Xv, yv = (jnp.asarray(a, jnp.float64) for a in (X, y, Xv, yv))
    log_lam = jnp.full(d, math.log(lam), jnp.float64)

    def closed_form(log_lam):
        hess = X.T @ X / n + jnp.diag(jnp.exp(log_lam))
        return jnp.linalg.solve(hess, X.T @ y / n), hess

    @functools.partial(jax.jit, compiler_options=_common.compiler_options(True))
    def solve_and_reference(log_lam):
        w_star, hess = closed_form(log_lam)
        reference = jax.grad(lambda h: ridge_val(closed_form(h)[0], Xv, yv))(log_lam)
        return w_star, hess, reference

    w_star, hess, reference = solve_and_reference(log_lam)
    info = {
        "data": f"synthetic, n={n}, d={d}, seed={seed}",
        "reference": "closed form (autodiff through the dense solve for w*)",
        "lam": lam,
        **_hessian_info(hess),
    }
    lambda_max = info["hessian_eig_max"]
    info["gd_step"] = 1.0 / lambda_max
    return Problem(
        "ridge", ridge_inner, ridge_val, log_lam, (X, y), (Xv, yv), w_star,
        1.0 / lambda_max, lambda_max, reference, info,
    )  # fmt: skip


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

    @functools.partial(jax.jit, compiler_options=_common.compiler_options(True))
    def reference_and_checks(log_lam):
        w_star = solve(log_lam)
        grad_norm = jnp.linalg.norm(jax.grad(logistic_inner)(w_star, log_lam, X, y))
        hess = jax.hessian(logistic_inner)(w_star, log_lam, X, y)
        F = lambda w, h: jax.grad(logistic_inner)(w, h, X, y)
        cotangent = jax.grad(logistic_val)(w_star, Xv, yv)
        (reference,), _, _ = solvers.root_vjp(F, w_star, (log_lam,), cotangent, solvers.direct())
        # Central finite differences of val(w*(log_lam)), w* by Newton for each perturbation.
        shifts = jnp.concatenate([jnp.eye(d), -jnp.eye(d)]) * fd_eps
        vals = jax.vmap(lambda s: logistic_val(solve(log_lam + s), Xv, yv))(shifts)
        fd = (vals[:d] - vals[d:]) / (2 * fd_eps)
        return w_star, hess, reference, grad_norm, fd

    w_star, hess, reference, grad_norm, fd = reference_and_checks(log_lam)

    # Gradient descent must be stable everywhere: L = lambda_max(X^T X) / (4 n) + max(lam).
    x_np = np.asarray(X)
    lipschitz = float(np.linalg.eigvalsh(x_np.T @ x_np).max() / (4 * n) + lam)
    info = {
        "data": f"breast cancer (scikit-learn), n_train={n}, n_val={Xv.shape[0]}, d={d}, "
        "standardized",
        "reference": "implicit, direct (dense) linear solve at the Newton-converged solution",
        "lam": lam,
        "inner_grad_norm_at_reference": float(grad_norm),
        "fd_eps": fd_eps,
        "fd_vs_reference_rel_diff": rel_error(fd, reference),
        **_hessian_info(hess),
        "gd_step": 1.0 / lipschitz,
    }
    return Problem(
        "logistic", logistic_inner, logistic_val, log_lam, (X, y), (Xv, yv), w_star,
        1.0 / lipschitz, info["hessian_eig_max"], reference, info,
    )  # fmt: skip


# ----------------------------------------------------------------------------- methods


class HvpCounter:
    """Counts Hessian-vector products as they execute, per budget.

    ``tap(i)`` is an identity placed on the parameters of the optimality function; its backward
    pass (run once per HVP) calls back to the host and adds one to ``counts[i]``.
    """

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()

    def tap(self, index: int) -> Callable:
        @jax.custom_vjp
        def identity(w):
            return w

        def fwd(w):
            return w, None

        def bwd(_, cotangent):
            jax.debug.callback(functools.partial(self._add, index))
            return (cotangent,)

        identity.defvjp(fwd, bwd)
        return identity

    def _add(self, index: int) -> None:
        self.counts[index] += 1

    def take(self) -> dict[int, int]:
        """The counts since the last call (after every pending callback ran)."""
        jax.effects_barrier()
        counts, self.counts = dict(self.counts), collections.Counter()
        return counts


def linear_solver_for(method: str, iters: int, neumann_scale: float) -> solvers.LinearSolver:
    """The linear solver of ``method`` running exactly ``iters`` iterations (``tol=0``)."""
    if method == "implicit-cg":
        return solvers.cg(maxiter=iters, tol=0.0)
    if method == "implicit-neumann":
        return solvers.neumann(steps=iters, scale=neumann_scale, tol=0.0)
    if method == "implicit-gmres":
        return solvers.gmres(maxiter=iters, tol=0.0)
    raise ValueError(f"method must be one of {IMPLICIT_METHODS}, got {method!r}")


def implicit_rows(p: Problem, work: list[tuple[str, int]]) -> list[dict]:
    """``solvers.root_vjp`` at ``w*`` for each ``(implicit method, budget)``, in one program."""
    counter = HvpCounter()
    configs = [(method, k, linear_solver_for(method, k, 1.0 / p.lambda_max)) for method, k in work]

    @functools.partial(jax.jit, compiler_options=_common.compiler_options(True))
    def run(w_star, log_lam, X, y, Xv, yv):
        cotangent = jax.grad(p.val)(w_star, Xv, yv)
        out = []
        for i, (_, _, linear_solver) in enumerate(configs):
            tap = counter.tap(i)
            F = lambda w, h, tap=tap: jax.grad(p.inner)(tap(w), h, X, y)
            (g,), _, stats = solvers.root_vjp(F, w_star, (log_lam,), cotangent, linear_solver)
            out.append((g, stats.iterations, stats.residual))
        return out

    out = jax.block_until_ready(run(p.w_star, p.log_lam, *p.train, *p.valid))
    hvps = counter.take()
    return [
        {
            "problem": p.name,
            "method": method,
            "budget": k,
            "cost": hvps.get(i, 0),
            "cost_unit": "HVPs",
            "rel_error": rel_error(g, p.reference),
            "iterations": int(iterations),
            "residual": float(residual),
        }
        for i, ((method, k, _), (g, iterations, residual)) in enumerate(
            zip(configs, out, strict=True)
        )
    ]


def argmin_rows(p: Problem, work: list[tuple[str, int]], truncated_total: int) -> list[dict]:
    """Gradient descent through ``solvers.argmin`` for each ``("unrolled" or "truncated",
    budget)``, in one program."""
    configs = [
        (method, k, k, solvers.Unrolled())
        if method == "unrolled"
        else (method, k, truncated_total, solvers.Truncated(steps=k))
        for method, k in work
    ]

    @functools.partial(jax.jit, compiler_options=_common.compiler_options(True))
    def run(log_lam, X, y, Xv, yv):
        def outer(h, steps, adjoint):
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

        return [jax.grad(outer)(log_lam, steps, adjoint) for _, _, steps, adjoint in configs]

    grads = jax.block_until_ready(run(p.log_lam, *p.train, *p.valid))
    units = {"unrolled": "inner steps T", "truncated": "differentiated steps K"}
    return [
        {
            "problem": p.name,
            "method": method,
            "budget": k,
            "cost": k,
            "cost_unit": units[method],
            "rel_error": rel_error(g, p.reference),
        }
        for (method, k, _, _), g in zip(configs, grads, strict=True)
    ]


def chunks(items: list, size: int) -> list[list]:
    """``items`` cut into consecutive lists of at most ``size``."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def powers_of_two(maximum: int) -> list[int]:
    """``[1, 2, 4, ..., 2**floor(log2(maximum))]``."""
    return [2**i for i in range(int(math.log2(maximum)) + 1)]


# ----------------------------------------------------------------------------- report


def budget_to_target(rows: list[dict], problem: str, method: str) -> int | None:
    """Smallest cost whose relative error is at most ``TARGET`` (``None``: none reaches it)."""
    reached = [
        r["cost"]
        for r in rows
        if r["problem"] == problem and r["method"] == method and r["rel_error"] <= TARGET
    ]
    return min(reached) if reached else None


def summary_table(rows: list[dict]) -> list[dict]:
    """Per problem and method: error at budget 1, 8 and the largest; cost to reach ``TARGET``."""
    table = []
    for problem in dict.fromkeys(r["problem"] for r in rows):
        for method in METHODS:
            mine = sorted(
                (r for r in rows if r["problem"] == problem and r["method"] == method),
                key=lambda r: r["budget"],
            )
            if not mine:
                continue
            at = {r["budget"]: r["rel_error"] for r in mine}
            reached = budget_to_target(rows, problem, method)
            table.append(
                {
                    "problem": problem,
                    "method": method,
                    "cost unit": mine[0]["cost_unit"],
                    "err@1": at.get(1, "-"),
                    "err@8": at.get(8, "-"),
                    "max budget": mine[-1]["budget"],
                    "err@max": mine[-1]["rel_error"],
                    f"cost to {TARGET:g}": "not reached" if reached is None else reached,
                }
            )
    return table


def summary_rows(rows: list[dict], problems: list[Problem]) -> list[dict]:
    """One README row per method: its cost to reach ``TARGET`` on each problem."""
    out = []
    names = " / ".join(f"{p.name} cond {p.info['hessian_condition']:.3g}" for p in problems)
    for method in METHODS:
        unit = "HVPs" if method in IMPLICIT_METHODS else "steps"
        results = []
        for p in problems:
            reached = budget_to_target(rows, p.name, method)
            largest = max(
                r["cost"] for r in rows if r["problem"] == p.name and r["method"] == method
            )
            results.append(f"> {largest}" if reached is None else str(reached))
        out.append(
            {
                "what": f"{LABELS[method]}: cost to hypergradient error {TARGET:g} "
                f"(power-of-two budgets; {names})",
                "result": f"{' / '.join(results)} {unit}",
                "target": "-",
            }
        )
    return out


def plot(rows: list[dict], problems: list[Problem], path: Path) -> None:
    """Relative error against cost, log-log, one panel per problem, the target as a line."""
    plt = _common.pyplot()
    fig, axes = plt.subplots(
        1, len(problems), figsize=(5.2 * len(problems) + 2.4, 4.4), squeeze=False
    )
    styles = {
        "implicit-cg": dict(ls="-", marker="o", ms=4),
        "implicit-neumann": dict(ls="-", marker="o", ms=4, zorder=3),  # over truncated
        "implicit-gmres": dict(ls="-", marker="^", ms=4),
        "unrolled": dict(ls="--", marker="s", ms=4),
        # Hollow and larger, under Neumann's: on ridge both curves are the same.
        "truncated": dict(ls="--", marker="s", ms=7, mfc="none"),
    }
    for ax, p in zip(axes[0], problems, strict=True):
        for method in METHODS:
            mine = sorted(
                (r for r in rows if r["problem"] == p.name and r["method"] == method),
                key=lambda r: r["cost"],
            )
            if not mine:
                continue
            ax.loglog(
                [max(r["cost"], 1) for r in mine],
                [max(r["rel_error"], 1e-17) for r in mine],
                color=_common.color(method),
                label=LABELS[method],
                **styles[method],
            )
        _common.target_line(ax, TARGET, f"target: relative error {TARGET:g}")
        ax.set_xlabel("cost: HVPs (implicit) or differentiated inner steps (unrolled, truncated)")
        ax.set_ylabel("relative error of the hypergradient")
        ax.set_title(
            f"{p.name}: d={p.log_lam.shape[0]}, Hessian condition "
            f"{p.info['hessian_condition']:.3g}",
            fontsize=10,
        )
        ax.grid(True, which="both", alpha=0.3)
        if p.name == "ridge":
            ax.text(
                0.03,
                0.03,
                "truncated K = Neumann K on ridge\n"
                r"(the same series, step $1/\lambda_{max}$)",
                transform=ax.transAxes,
                fontsize=8,
                color=_common.color("truncated"),
            )
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    fig.suptitle("Hypergradient accuracy against cost (float64, reference: exact hypergradient)")
    _common.save_figure(fig, path, dpi=110)


def main(argv=None):
    parser = _common.make_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="ridge: training examples")
    parser.add_argument("--d", type=int, default=50, help="ridge: features")
    parser.add_argument("--cond", type=float, default=100.0, help="ridge: Hessian condition")
    parser.add_argument("--lam", type=float, default=1e-2, help="logistic: L2 penalty per feature")
    parser.add_argument(
        "--problems",
        default=",".join(PROBLEMS),
        help=f"comma-separated problems to run, from {PROBLEMS}",
    )
    parser.add_argument(
        "--max-iters",
        type=int,
        default=128,
        help="largest budget (maxiter/steps) of the linear solvers; budgets 1, 2, 4, ...",
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        default=8192,
        help="largest T (unrolled) and K (truncated); budgets 1, 2, 4, ...",
    )
    parser.add_argument(
        "--truncated-total",
        type=int,
        default=16384,
        help="inner steps T of the truncated runs (>= --max-steps)",
    )
    parser.add_argument(
        "--fd-eps", type=float, default=1e-4, help="logistic: finite-difference step of the check"
    )
    args = parser.parse_args(argv)
    problem_names = _common.parse_choices(parser, args.problems, PROBLEMS, "problem")
    if not problem_names:
        parser.error("--problems names no problem; choose from " + ",".join(PROBLEMS))
    if args.smoke:
        args.n, args.d, args.cond = 40, 10, 20.0
        args.max_iters, args.max_steps, args.truncated_total = 32, 32, 256
    if args.truncated_total < args.max_steps:
        parser.error(
            f"--truncated-total ({args.truncated_total}) must be >= --max-steps ({args.max_steps})"
        )
    t_start = time.perf_counter()
    out = _common.results_dir(args)
    iters = powers_of_two(args.max_iters)
    steps = powers_of_two(args.max_steps)
    budgets = {m: iters for m in IMPLICIT_METHODS} | {"unrolled": steps, "truncated": steps}
    per_program = PER_PROGRAM
    if args.smoke:  # each budget lengthens compilation: the largest, and 1 for unrolled
        budgets = {m: b[-1:] for m, b in budgets.items()} | {"unrolled": [1, steps[-1]]}
        per_program = 100  # the implicit methods in one program, unrolled and truncated in one
    quiet = args.no_progress

    with jax.enable_x64(True):
        problems = []
        if "ridge" in problem_names:
            _common.phase("ridge: data and the closed-form reference", quiet=quiet)
            problems.append(ridge_problem(args.n, args.d, args.cond, args.seed))
        if "logistic" in problem_names:
            _common.phase(
                "logistic: Newton reference and its finite-difference check (compiling)",
                quiet=quiet,
            )
            problems.append(logistic_problem(args.lam, args.seed, args.fd_eps))
        _common.phase(
            f"compiling and running up to {per_program} (method, budget) pairs per program; "
            "the bar counts pairs",
            quiet=quiet,
        )
        programs = [  # (problem, rows function, [(method, budget), ...])
            (p, rows_fn, work)
            for p in problems
            for rows_fn, methods in ((implicit_rows, IMPLICIT_METHODS), (argmin_rows, ARGMIN))
            for work in chunks([(m, k) for m in methods for k in budgets[m]], per_program)
        ]
        rows = []
        bar = _common.progress(
            total=sum(len(work) for _, _, work in programs), desc=NAME, disable=quiet
        )
        for p, rows_fn, work in programs:
            bar.set_postfix_str(f"{p.name}: {', '.join(f'{m} {k}' for m, k in work)}")
            extra = (args.truncated_total,) if rows_fn is argmin_rows else ()
            rows += rows_fn(p, work, *extra)
            bar.update(len(work))
        bar.set_postfix_str("")
        bar.close()

    table = summary_table(rows)
    summary = summary_rows(rows, problems)
    infos = {p.name: p.info for p in problems}
    _common.save_json(
        out / f"{NAME}.json",
        {
            "config": dict(vars(args)),
            "dtype": "float64",
            "target_rel_error": TARGET,
            "budgets": budgets,
            "truncated_total_steps": args.truncated_total,
            "problems": infos,
            "rows": rows,
            "summary": table,
        },
    )
    _common.save_csv(out / f"{NAME}.csv", rows)
    plot(rows, problems, out / f"{NAME}.png")

    for p in problems:
        i = p.info
        line = (
            f"{p.name}: {i['data']}; Hessian eigenvalues [{i['hessian_eig_min']:.3g}, "
            f"{i['hessian_eig_max']:.3g}] (condition {i['hessian_condition']:.3g}); "
            f"gradient-descent step {i['gd_step']:.3g}; reference: {i['reference']}"
        )
        if "fd_vs_reference_rel_diff" in i:
            line += (
                f", agrees with central finite differences (eps {i['fd_eps']:g}) to "
                f"{i['fd_vs_reference_rel_diff']:.2g} (relative)"
            )
        print(line)
    _common.print_table(
        table,
        title=(
            f"Relative error of the hypergradient (float64) by budget; cost to {TARGET:g} = "
            f"smallest power-of-two budget reaching it (truncated: T={args.truncated_total})"
        ),
    )
    wall = time.perf_counter() - t_start
    _common.write_summary(out, NAME, summary, seconds=wall, smoke=args.smoke)
    _common.done(out, wall)
    return {"problems": infos, "rows": rows, "summary": table, "summary_rows": summary}


if __name__ == "__main__":
    main()
