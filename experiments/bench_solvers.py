"""Benchmarks of the hypergradient solvers: implicit differentiation against jaxopt, checkpointed unrolling.

(a) Implicit hypergradient time, ``solvers.custom_root`` over ``jaxopt.implicit_diff.custom_root``:
    ridge regression (default n=1000, d=2000, float32, per-feature log-penalty, small penalty so
    that the Hessian is ill-conditioned). Both decorate the same solver, which only returns a
    precomputed inner solution, and both run exactly 30 CG iterations (``tol=0``) on the adjoint
    system: ours with ``solvers.cg(maxiter=30, tol=0)`` (``symmetric=True`` and ``False``), jaxopt
    with ``jaxopt.linear_solve.solve_cg(maxiter=30, tol=0)`` (``jax.scipy.sparse.linalg.cg``,
    whose ``atol`` defaults to 0). The hypergradient is ``jax.grad`` of the validation loss w.r.t.
    the log-penalty, jitted; timings are medians of interleaved runs. Target: ours / jaxopt <= 1.05.
(b) Unrolled hypergradient over T=1000 gradient-descent steps of a logistic regression (d=256):
    ``solvers.Unrolled()`` against ``solvers.Unrolled(checkpoint_every=32)``: peak temporary memory
    of the compiled program (``memory_analysis().temp_size_in_bytes``) and median time. Target: at
    least 10x less memory for at most 1.6x the time.

    python -m experiments.bench_solvers            # default (well under a minute on CPU)
    python -m experiments.bench_solvers --smoke    # seconds, for the test suite
"""

from __future__ import annotations

import math
import warnings
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import solvers
from experiments._common import (
    logistic_inner,
    logistic_val,
    make_parser,
    print_table,
    pyplot,
    rel_error,
    results_dir,
    ridge_inner,
    ridge_val,
    save_csv,
    save_figure,
    save_json,
    timeit,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # jaxopt says it is unmaintained
    from jaxopt import implicit_diff as jaxopt_implicit_diff
    from jaxopt import linear_solve as jaxopt_linear_solve


# ----------------------------------------------------------------------------- (a) implicit


ridge_optimality = jax.grad(ridge_inner)


def precomputed_solution(init_params, log_lam, X, y):
    """The "solver" both libraries decorate: it returns the solution it is given."""
    del log_lam, X, y
    return init_params


def implicit_vs_jaxopt(n: int, d: int, lam: float, iters: int, repeats: int, seed: int, quiet):
    rng = np.random.RandomState(seed)
    n_val = max(n // 3, 1)
    X = rng.randn(n, d)
    w_true = rng.randn(d)
    y = X @ w_true + 0.1 * rng.randn(n)
    Xv = rng.randn(n_val, d)
    yv = Xv @ w_true + 0.1 * rng.randn(n_val)
    hess = X.T @ X / n + lam * np.eye(d)
    eigs = np.linalg.eigvalsh(hess)
    w_star = np.linalg.solve(hess, X.T @ y / n)  # exact inner solution (float64), then float32
    X, y, Xv, yv, w_star = (jnp.asarray(a, jnp.float32) for a in (X, y, Xv, yv, w_star))
    log_lam = jnp.full(d, math.log(lam), jnp.float32)

    ours_cg = solvers.cg(maxiter=iters, tol=0.0)
    jaxopt_cg = partial(jaxopt_linear_solve.solve_cg, maxiter=iters, tol=0.0)
    # Exactly ``iters`` CG iterations by design (tol=0): no convergence warning (a host callback).
    decorated = {
        "ours (symmetric=True)": solvers.custom_root(
            ridge_optimality, linear_solver=ours_cg, symmetric=True, warn=False
        )(precomputed_solution),
        "ours (symmetric=False)": solvers.custom_root(
            ridge_optimality, linear_solver=ours_cg, symmetric=False, warn=False
        )(precomputed_solution),
        "jaxopt": jaxopt_implicit_diff.custom_root(ridge_optimality, solve=jaxopt_cg)(
            precomputed_solution
        ),
    }

    def hypergradient(solver):
        def outer(log_lam, w_star, X, y, Xv, yv):
            return ridge_val(solver(w_star, log_lam, X, y), Xv, yv)

        return jax.jit(jax.grad(outer))

    args = (log_lam, w_star, X, y, Xv, yv)
    compiled = {name: hypergradient(s).lower(*args).compile() for name, s in decorated.items()}
    grads = {name: jax.block_until_ready(c(*args)) for name, c in compiled.items()}

    # The adjoint system both solve: H u = grad_w val(w*), with H the Hessian at w*.
    cotangent = jax.grad(ridge_val)(w_star, Xv, yv)
    hvp = lambda v: jax.jvp(lambda w: ridge_optimality(w, log_lam, X, y), (w_star,), (v,))[1]
    u, stats = jax.jit(lambda b: ours_cg(hvp, b))(cotangent)
    u_scipy, _ = jax.jit(
        lambda b: jax.scipy.sparse.linalg.cg(hvp, b, maxiter=iters, tol=0.0, atol=0.0)
    )(cotangent)
    scipy_residual = rel_error(hvp(u_scipy), cotangent)
    ours_residual = rel_error(hvp(u), cotangent)

    fns = {name: partial(c, *args) for name, c in compiled.items()}
    times = timeit(fns, repeats, disable=quiet, desc="(a) implicit vs jaxopt")
    ref = times["jaxopt"]["median_ms"]
    rows = [
        {
            "method": name,
            "median_ms": t["median_ms"],
            "min_ms": t["min_ms"],
            "ratio_vs_jaxopt": t["median_ms"] / ref,
            "hypergrad_rel_diff_vs_jaxopt": rel_error(grads[name], grads["jaxopt"]),
        }
        for name, t in times.items()
    ]
    info = {
        "n": n,
        "d": d,
        "n_val": n_val,
        "lam": lam,
        "dtype": "float32",
        "cg_iterations": iters,
        "hessian_condition": float(eigs[-1] / eigs[0]),
        "solvers_cg_stats": {
            "iterations": int(stats.iterations),
            "residual": float(stats.residual),
            "converged": bool(stats.converged),
        },
        "solvers_cg_true_residual": ours_residual,
        "jax_scipy_cg_true_residual": scipy_residual,
        "cg_solution_rel_diff_ours_vs_jax_scipy": rel_error(u, u_scipy),
        "hypergrad_norm": {name: float(jnp.linalg.norm(g)) for name, g in grads.items()},
        "repeats": repeats,
    }
    return rows, info


# ----------------------------------------------------------------------------- (b) unrolled


def memory_fields(compiled) -> dict[str, int]:
    """Every integer field of ``compiled.memory_analysis()``."""
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    fields = {}
    for name in dir(stats):
        if name.startswith("_"):
            continue
        value = getattr(stats, name)
        if isinstance(value, int) and not isinstance(value, bool):
            fields[name] = value
    return fields


def unrolled_memory(n: int, d: int, steps: int, every: int, lam: float, repeats, seed, quiet):
    rng = np.random.RandomState(seed)
    w_true = rng.randn(d)
    X = rng.randn(n, d) / math.sqrt(d)
    y = (X @ w_true + 0.3 * rng.randn(n) > 0).astype(np.float32)
    Xv = rng.randn(n // 2, d) / math.sqrt(d)
    yv = (Xv @ w_true + 0.3 * rng.randn(n // 2) > 0).astype(np.float32)
    lipschitz = float(np.linalg.eigvalsh(X.T @ X).max() / (4 * n) + lam)
    X, y, Xv, yv = (jnp.asarray(a, jnp.float32) for a in (X, y, Xv, yv))
    log_lam = jnp.full(d, math.log(lam), jnp.float32)

    def hypergradient(adjoint):
        def outer(log_lam, X, y, Xv, yv):
            w = solvers.argmin(
                logistic_inner,
                jnp.zeros(d, jnp.float32),
                log_lam,
                X,
                y,
                optimizer=optax.sgd(1.0 / lipschitz),
                steps=steps,
                adjoint=adjoint,
            )
            return logistic_val(w, Xv, yv)

        return jax.jit(jax.grad(outer))

    args = (log_lam, X, y, Xv, yv)
    adjoints = {
        "unrolled": solvers.Unrolled(),
        f"unrolled (checkpoint_every={every})": solvers.Unrolled(checkpoint_every=every),
    }
    compiled = {name: hypergradient(a).lower(*args).compile() for name, a in adjoints.items()}
    memory = {name: memory_fields(c) for name, c in compiled.items()}
    grads = {name: jax.block_until_ready(c(*args)) for name, c in compiled.items()}
    times = timeit(
        {name: partial(c, *args) for name, c in compiled.items()},
        repeats,
        disable=quiet,
        desc="(b) unrolled memory",
    )
    plain, ckpt = list(adjoints)
    rows = [
        {
            "method": name,
            "temp_bytes": memory[name].get("temp_size_in_bytes", -1),
            "median_ms": times[name]["median_ms"],
            "min_ms": times[name]["min_ms"],
        }
        for name in adjoints
    ]
    info = {
        "n": n,
        "d": d,
        "steps": steps,
        "checkpoint_every": every,
        "lam": lam,
        "dtype": "float32",
        "memory_analysis_fields": memory,
        "hypergrad_rel_diff": rel_error(grads[ckpt], grads[plain]),
        "memory_ratio": rows[0]["temp_bytes"] / max(rows[1]["temp_bytes"], 1),
        "time_ratio": rows[1]["median_ms"] / rows[0]["median_ms"],
        "repeats": repeats,
    }
    return rows, info


# ----------------------------------------------------------------------------- main


def plot(implicit_rows, unrolled_rows, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    names = [r["method"] for r in implicit_rows]
    axes[0].bar(names, [r["median_ms"] for r in implicit_rows], color=["C0", "C1", "C2"])
    axes[0].set_ylabel("ms per hypergradient (median)")
    axes[0].set_title("(a) implicit, 30 CG iterations")
    names = ["plain", "checkpointed"]
    axes[1].bar(names, [r["temp_bytes"] / 2**20 for r in unrolled_rows], color=["C3", "C4"])
    axes[1].set_ylabel("temporary memory (MiB)")
    axes[1].set_title("(b) unrolled: memory")
    axes[2].bar(names, [r["median_ms"] for r in unrolled_rows], color=["C3", "C4"])
    axes[2].set_ylabel("ms per hypergradient (median)")
    axes[2].set_title("(b) unrolled: time")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8, rotation=10)
    save_figure(fig, path, dpi=110)


def main(argv=None):
    parser = make_parser("bench_solvers", __doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="(a) ridge training examples")
    parser.add_argument("--d", type=int, default=2000, help="(a) ridge features")
    parser.add_argument("--lam", type=float, default=1e-4, help="(a) ridge penalty per feature")
    parser.add_argument("--cg-iters", type=int, default=30, help="(a) CG iterations (tol=0)")
    parser.add_argument("--unroll-steps", type=int, default=1000, help="(b) inner steps T")
    parser.add_argument("--unroll-n", type=int, default=512, help="(b) training examples")
    parser.add_argument("--unroll-d", type=int, default=256, help="(b) features")
    parser.add_argument(
        "--checkpoint-every", type=int, default=None, help="(b) segment length (default ~sqrt(T))"
    )
    parser.add_argument("--repeats", type=int, default=30, help="interleaved timing rounds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.n, args.d, args.repeats = 100, 200, 3
        args.unroll_steps, args.unroll_n, args.unroll_d = 64, 64, 32
    every = args.checkpoint_every or max(1, round(math.sqrt(args.unroll_steps)))
    out = results_dir(args)
    quiet = args.no_progress

    implicit_rows, implicit_info = implicit_vs_jaxopt(
        args.n, args.d, args.lam, args.cg_iters, args.repeats, args.seed, quiet
    )
    unrolled_rows, unrolled_info = unrolled_memory(
        args.unroll_n, args.unroll_d, args.unroll_steps, every, 1e-3, args.repeats, args.seed, quiet
    )
    results = {
        "config": vars(args),
        "implicit_vs_jaxopt": {"rows": implicit_rows, **implicit_info},
        "unrolled_memory": {"rows": unrolled_rows, **unrolled_info},
        "targets": {
            "implicit_ratio_max": 1.05,
            "unrolled_memory_ratio_min": 10.0,
            "unrolled_time_ratio_max": 1.6,
        },
    }
    save_json(out / "bench_solvers.json", results)
    save_csv(
        out / "bench_solvers.csv",
        [{"part": "a", **r} for r in implicit_rows] + [{"part": "b", **r} for r in unrolled_rows],
    )
    plot(implicit_rows, unrolled_rows, out / "bench_solvers.png")

    a, b = implicit_info, unrolled_info
    stats = a["solvers_cg_stats"]
    print_table(
        implicit_rows,
        title=(
            f"(a) implicit hypergradient, ridge n={a['n']} d={a['d']} float32, "
            f"{a['cg_iterations']} CG iterations (target: ours / jaxopt <= 1.05)"
        ),
    )
    print(
        f"Hessian condition {a['hessian_condition']:.3g}; adjoint system after "
        f"{stats['iterations']} iterations: solvers.cg residual {stats['residual']:.3g} "
        f"(converged={stats['converged']}, recomputed {a['solvers_cg_true_residual']:.3g}), "
        f"jax.scipy.sparse.linalg.cg residual {a['jax_scipy_cg_true_residual']:.3g}; "
        f"solutions differ by {a['cg_solution_rel_diff_ours_vs_jax_scipy']:.3g} (relative)"
    )
    print_table(
        unrolled_rows,
        title=(
            f"(b) unrolled hypergradient, T={b['steps']} steps, logistic d={b['d']} float32 "
            "(target: memory ratio >= 10, time ratio <= 1.6)"
        ),
    )
    print(
        f"memory ratio plain / checkpointed = {b['memory_ratio']:.3g}, "
        f"time ratio checkpointed / plain = {b['time_ratio']:.3g}, "
        f"hypergradients differ by {b['hypergrad_rel_diff']:.3g} (relative)"
    )
    for name, fields in b["memory_analysis_fields"].items():
        print(f"memory_analysis() [{name}]: {fields}")
    print(f"results in {out}")
    return results


if __name__ == "__main__":
    main()
