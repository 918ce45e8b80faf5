"""Benchmarks of the hypergradient solvers: implicit differentiation against jaxopt, checkpointed unrolling.

(a) Implicit hypergradient time, ``solvers.custom_root`` over ``jaxopt.implicit_diff.custom_root``:
    ridge regression (default n=1000, d=2000, float32, per-feature log-penalty, small penalty so
    that the Hessian is ill-conditioned). Both decorate the same solver, which only returns a
    precomputed inner solution, and both run exactly 30 CG iterations (``tol=0``) on the adjoint
    system: ours with ``solvers.cg(maxiter=30, tol=0)`` (``symmetric=True`` and ``False``), jaxopt
    with ``jaxopt.linear_solve.solve_cg(maxiter=30, tol=0)`` (``jax.scipy.sparse.linalg.cg``,
    whose ``atol`` defaults to 0). The hypergradient is ``jax.grad`` of the validation loss w.r.t.
    the log-penalty, jitted; timings are interleaved rounds. Target: ours / jaxopt <= 1.05.
(b) Unrolled hypergradient over T=1000 gradient-descent steps of a logistic regression (d=256):
    ``solvers.Unrolled()`` against ``solvers.Unrolled(checkpoint_every=32)``: temporary memory
    of the compiled program (XLA's buffer assignment, ``memory_analysis().temp_size_in_bytes``)
    and time. Target: at least 10x less memory for at most 1.6x the time.

Every program is compiled before the timing rounds; the bar counts the rounds of (a) and (b).
A time ratio is the median over the rounds of the ratio within a round (the two calls run back to
back, under the same load): on a shared machine it is steadier than a ratio of medians.
``--smoke`` compiles with XLA's fast-compile options (``_common.FAST_COMPILE``): its timings say
nothing about speed.

    python -m experiments.bench_solvers            # default
    python -m experiments.bench_solvers --smoke    # seconds, for the test suite
"""

from __future__ import annotations

import math
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import solvers
from experiments import _common
from experiments._common import (
    logistic_inner,
    logistic_val,
    rel_error,
    ridge_inner,
    ridge_val,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # jaxopt says it is unmaintained
    from jaxopt import implicit_diff as jaxopt_implicit_diff
    from jaxopt import linear_solve as jaxopt_linear_solve

NAME = "bench_solvers"
TARGETS = {"implicit_ratio": "<= 1.05", "memory_ratio": ">= 10", "time_ratio": "<= 1.6"}
OURS_SYM, OURS_NONSYM, JAXOPT = (
    "implicit (ours, symmetric=True)",
    "implicit (ours, symmetric=False)",
    "jaxopt",
)
PLAIN = "unrolled"


# ----------------------------------------------------------------------------- (a) implicit


ridge_optimality = jax.grad(ridge_inner)


def precomputed_solution(init_params, log_lam, X, y):
    """The "solver" both libraries decorate: it returns the solution it is given."""
    del log_lam, X, y
    return init_params


def implicit_setup(n: int, d: int, lam: float, iters: int, seed: int, options: dict):
    """Compile ours (two variants) and jaxopt's implicit hypergradient; check they agree.

    Returns:
      ``(fns, info)``: zero-argument jitted calls by method, and the problem and agreement
      numbers (Hessian condition, CG residuals, differences between the hypergradients).
    """
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
        OURS_SYM: solvers.custom_root(
            ridge_optimality, linear_solver=ours_cg, symmetric=True, warn=False
        )(precomputed_solution),
        OURS_NONSYM: solvers.custom_root(
            ridge_optimality, linear_solver=ours_cg, symmetric=False, warn=False
        )(precomputed_solution),
        JAXOPT: jaxopt_implicit_diff.custom_root(ridge_optimality, solve=jaxopt_cg)(
            precomputed_solution
        ),
    }

    def hypergradient(solver):
        def outer(log_lam, w_star, X, y, Xv, yv):
            return ridge_val(solver(w_star, log_lam, X, y), Xv, yv)

        return jax.jit(jax.grad(outer), compiler_options=options)

    args = (log_lam, w_star, X, y, Xv, yv)
    compiled = {name: hypergradient(s).lower(*args).compile() for name, s in decorated.items()}
    grads = {name: jax.block_until_ready(c(*args)) for name, c in compiled.items()}

    # The adjoint system both solve: H u = grad_w val(w*), with H the Hessian at w*.
    cotangent = jax.grad(ridge_val)(w_star, Xv, yv)
    hvp = lambda v: jax.jvp(lambda w: ridge_optimality(w, log_lam, X, y), (w_star,), (v,))[1]

    @partial(jax.jit, compiler_options=options)
    def both_cgs(b):
        u, stats = ours_cg(hvp, b)
        u_scipy, _ = jax.scipy.sparse.linalg.cg(hvp, b, maxiter=iters, tol=0.0, atol=0.0)
        return u, stats, u_scipy, hvp(u), hvp(u_scipy)

    u, stats, u_scipy, hu, hu_scipy = both_cgs(cotangent)
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
        "solvers_cg_true_residual": rel_error(hu, cotangent),
        "jax_scipy_cg_true_residual": rel_error(hu_scipy, cotangent),
        "cg_solution_rel_diff_ours_vs_jax_scipy": rel_error(u, u_scipy),
        "hypergrad_rel_diff_vs_jaxopt": {
            name: rel_error(g, grads[JAXOPT]) for name, g in grads.items()
        },
        "hypergrad_norm": {name: float(jnp.linalg.norm(g)) for name, g in grads.items()},
    }
    return {name: partial(c, *args) for name, c in compiled.items()}, info


def implicit_rows(times: dict, info: dict) -> list[dict]:
    """Table (a): time per hypergradient and ratio to jaxopt, per method."""
    return [
        {
            "method": name,
            "median_ms": t["median_ms"],
            "min_ms": t["min_ms"],
            "max_ms": t["max_ms"],
            "ratio_vs_jaxopt": _common.paired_ratio(times, name, JAXOPT),
            "hypergrad_rel_diff_vs_jaxopt": info["hypergrad_rel_diff_vs_jaxopt"][name],
        }
        for name, t in times.items()
    ]


# ----------------------------------------------------------------------------- (b) unrolled


MEMORY_FIELDS = {  # CompiledMemoryStats field -> column name
    "argument_size_in_bytes": "arguments",
    "output_size_in_bytes": "outputs",
    "alias_size_in_bytes": "aliased",
    "temp_size_in_bytes": "temporaries",
    "generated_code_size_in_bytes": "generated code",
}


def memory_fields(compiled) -> dict[str, int]:
    """The integer byte counts of ``compiled.memory_analysis()`` (``{}`` if it has none)."""
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    fields = {}
    for name in dir(stats):
        value = getattr(stats, name)
        if not name.startswith("_") and isinstance(value, int) and not isinstance(value, bool):
            fields[name] = value
    return fields


def unrolled_setup(n: int, d: int, steps: int, every: int, lam: float, seed: int, options):
    """Compile the unrolled hypergradient plain and checkpointed; measure memory; compare.

    Returns:
      ``(fns, memory, info)``: zero-argument jitted calls by method, the memory analysis of each
      compiled program, and the difference between the two hypergradients.
    """
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

        return jax.jit(jax.grad(outer), compiler_options=options)

    args = (log_lam, X, y, Xv, yv)
    adjoints = {
        PLAIN: solvers.Unrolled(),
        checkpointed_name(every): solvers.Unrolled(checkpoint_every=every),
    }
    compiled = {name: hypergradient(a).lower(*args).compile() for name, a in adjoints.items()}
    memory = {name: memory_fields(c) for name, c in compiled.items()}
    grads = {name: jax.block_until_ready(c(*args)) for name, c in compiled.items()}
    info = {
        "n": n,
        "d": d,
        "steps": steps,
        "checkpoint_every": every,
        "lam": lam,
        "dtype": "float32",
        "hypergrad_rel_diff": rel_error(grads[checkpointed_name(every)], grads[PLAIN]),
    }
    return {name: partial(c, *args) for name, c in compiled.items()}, memory, info


def checkpointed_name(every: int) -> str:
    return f"unrolled (checkpoint_every={every})"


def unrolled_rows(times: dict, memory: dict) -> list[dict]:
    """Table (b): temporary memory and time per hypergradient, per method."""
    return [
        {
            "method": name,
            "temp_bytes": memory[name].get("temp_size_in_bytes", -1),
            "temp_memory": _common.format_bytes(memory[name].get("temp_size_in_bytes", 0)),
            "median_ms": t["median_ms"],
            "min_ms": t["min_ms"],
            "max_ms": t["max_ms"],
        }
        for name, t in times.items()
    ]


# ----------------------------------------------------------------------------- report


def tick_label(method: str) -> str:
    """Short two-line bar labels: ``ours\nsymmetric=True``, ``unrolled\nno checkpoints``."""
    if method.startswith("implicit (ours, "):
        return "ours\n" + method.removeprefix("implicit (ours, ").rstrip(")")
    if method == PLAIN:
        return "unrolled\nno checkpoints"
    return method.replace(" (", "\n(")


def plot(implicit, unrolled, ratios, path: Path, machine: str) -> None:
    """(a) time per method with jaxopt and the target; (b) memory and time, plain vs checkpointed."""
    plt = _common.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.6))

    def bars(ax, rows, values, fastest=False):
        xs = np.arange(len(rows))
        for x, r, v in zip(xs, rows, values, strict=True):
            hatched = "symmetric=False" in r["method"] or "checkpoint" in r["method"]
            ax.bar(
                x,
                v,
                0.6,
                color=_common.color(r["method"]),
                hatch="//" if hatched else None,
                edgecolor="black",
                lw=0.5,
            )
        if fastest:
            ax.plot(xs, [r["min_ms"] for r in rows], "kv", ms=6, label="fastest round")
        ax.set_xticks(xs, [tick_label(r["method"]) for r in rows], fontsize=8)

    time_label = "ms per hypergradient (bars: median of the rounds)"
    ax = axes[0]
    bars(ax, implicit, [r["median_ms"] for r in implicit], fastest=True)
    ref = next(r["median_ms"] for r in implicit if r["method"] == JAXOPT)
    ax.axhline(ref, color="grey", ls="--", lw=1, label=f"jaxopt (baseline): {ref:.3g} ms")
    _common.target_line(ax, 1.05 * ref, "target: 1.05 x jaxopt")
    ax.set_ylim(0, 1.45 * max(1.05 * ref, *(r["median_ms"] for r in implicit)))
    ax.set(ylabel=time_label)
    ax.set_title(f"(a) implicit, {ratios['cg_iterations']} CG iterations\nours / jaxopt "
                 f"(median per-round ratio): {ratios['implicit'].replace('symmetric=', '')}",
                 fontsize=9)  # fmt: skip
    ax.legend(loc="upper center", fontsize=8, ncol=1)

    ax = axes[1]
    mib = [r["temp_bytes"] / 2**20 for r in unrolled]
    bars(ax, unrolled, mib)
    ax.set_yscale("log")
    _common.target_line(ax, mib[0] / 10, "target: plain / 10")
    ax.set_ylim(min(mib[1], mib[0] / 10) / 3, mib[0] * 10)
    ax.set(ylabel="temporary memory (MiB)")
    ax.set_title(f"(b) unrolled T={ratios['steps']}: memory\nplain / checkpointed = "
                 f"{_common.format_ratio(ratios['memory'])}", fontsize=10)  # fmt: skip
    ax.legend(loc="upper right", fontsize=8)

    ax = axes[2]
    bars(ax, unrolled, [r["median_ms"] for r in unrolled], fastest=True)
    plain_ms = unrolled[0]["median_ms"]
    _common.target_line(ax, 1.6 * plain_ms, "target: 1.6 x plain")
    ax.set_ylim(0, 1.4 * max(1.6 * plain_ms, *(r["median_ms"] for r in unrolled)))
    ax.set(ylabel=time_label)
    ax.set_title(f"(b) unrolled T={ratios['steps']}: time\ncheckpointed / plain "
                 f"(median per-round ratio) = {_common.format_ratio(ratios['time'])}",
                 fontsize=9)  # fmt: skip
    ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(f"Hypergradient solver benchmarks, float32, {machine}")
    _common.save_figure(fig, path, dpi=110)


def summary_rows(results: dict[str, Any]) -> list[dict[str, str]]:
    """The README rows of a run from its ``bench_solvers.json`` contents.

    Args:
      results: what :func:`main` saves (``implicit_vs_jaxopt``, ``unrolled_memory``).

    Returns:
      ``{"what", "result", "target"}`` rows: (a) time ours / jaxopt; (b) memory and time ratios.
    """
    a, b = results["implicit_vs_jaxopt"], results["unrolled_memory"]
    by_method = {r["method"]: r for r in a["rows"]}
    plain, ckpt = b["rows"]
    setting = f"unrolled T={b['steps']}, checkpoint_every={b['checkpoint_every']}"
    return [
        {
            "what": f"(a) implicit hypergradient time, ours / jaxopt (ridge n={a['n']}, "
            f"d={a['d']}, {a['cg_iterations']} CG iterations, float32; median per-round ratio)",
            "result": f"{_common.format_ratio(by_method[OURS_SYM]['ratio_vs_jaxopt'])} "
            f"(symmetric=True), {_common.format_ratio(by_method[OURS_NONSYM]['ratio_vs_jaxopt'])} "
            "(symmetric=False)",
            "target": f"{TARGETS['implicit_ratio']}x",
        },
        {
            "what": f"(b) {setting}: temporary memory, plain / checkpointed",
            "result": f"{_common.format_ratio(b['memory_ratio'])} ({plain['temp_memory']} vs "
            f"{ckpt['temp_memory']})",
            "target": f"{TARGETS['memory_ratio']}x",
        },
        {
            "what": f"(b) {setting}: time, checkpointed / plain (median per-round ratio)",
            "result": _common.format_ratio(b["time_ratio"]),
            "target": f"{TARGETS['time_ratio']}x",
        },
    ]


def main(argv=None):
    parser = _common.make_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="(a) ridge training examples")
    parser.add_argument("--d", type=int, default=2000, help="(a) ridge features")
    parser.add_argument("--lam", type=float, default=1e-4, help="(a) ridge penalty per feature")
    parser.add_argument(
        "--cg-iters", type=int, default=30, help="(a) CG iterations of every method (tol=0)"
    )
    parser.add_argument("--unroll-steps", type=int, default=1000, help="(b) inner steps T")
    parser.add_argument("--unroll-n", type=int, default=512, help="(b) training examples")
    parser.add_argument("--unroll-d", type=int, default=256, help="(b) features")
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        help="(b) steps per checkpointed segment (default: round(sqrt(T)))",
    )
    parser.add_argument(
        "--repeats", type=int, default=30, help="interleaved timing rounds of (a) and of (b)"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.n, args.d, args.repeats = 100, 200, 3
        args.unroll_steps, args.unroll_n, args.unroll_d = 64, 64, 32
    for name in ("n", "d", "cg_iters", "unroll_steps", "unroll_n", "unroll_d", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    every = args.checkpoint_every or max(1, round(math.sqrt(args.unroll_steps)))
    t_start = time.perf_counter()
    out = _common.results_dir(args)
    quiet = args.no_progress
    options = _common.compiler_options(args.smoke)
    machine = _common.machine_description()

    _common.phase(
        f"(a) compiling the implicit hypergradient (ridge n={args.n}, d={args.d}): ours twice, "
        "jaxopt",
        quiet=quiet,
    )
    implicit_fns, implicit_info = implicit_setup(
        args.n, args.d, args.lam, args.cg_iters, args.seed, options
    )
    _common.phase(
        f"(b) compiling the unrolled hypergradient (T={args.unroll_steps}): plain, checkpointed",
        quiet=quiet,
    )
    unrolled_fns, memory, unrolled_info = unrolled_setup(
        args.unroll_n, args.unroll_d, args.unroll_steps, every, 1e-3, args.seed, options
    )
    bar = _common.progress(total=2 * args.repeats, desc=NAME, disable=quiet)
    bar.set_postfix_str("(a) implicit vs jaxopt")
    implicit_times = _common.timeit(implicit_fns, args.repeats, bar=bar)
    bar.set_postfix_str("(b) unrolled, plain vs checkpointed")
    unrolled_times = _common.timeit(unrolled_fns, args.repeats, bar=bar)
    bar.set_postfix_str("")
    bar.close()

    implicit = implicit_rows(implicit_times, implicit_info)
    unrolled = unrolled_rows(unrolled_times, memory)
    by_method = {r["method"]: r for r in implicit}
    plain, ckpt = unrolled
    memory_ratio = plain["temp_bytes"] / max(ckpt["temp_bytes"], 1)
    time_ratio = _common.paired_ratio(unrolled_times, ckpt["method"], plain["method"])
    implicit_ratio = (
        f"{_common.format_ratio(by_method[OURS_SYM]['ratio_vs_jaxopt'])} (symmetric=True), "
        f"{_common.format_ratio(by_method[OURS_NONSYM]['ratio_vs_jaxopt'])} (symmetric=False)"
    )
    unrolled_info |= {"memory_ratio": memory_ratio, "time_ratio": time_ratio}
    results: dict[str, Any] = {
        "config": vars(args),
        "machine": machine,
        "compiler_options": options,
        "implicit_vs_jaxopt": {"rows": implicit, "repeats": args.repeats, **implicit_info},
        "unrolled_memory": {
            "rows": unrolled,
            "memory_analysis_fields": memory,
            "repeats": args.repeats,
            **unrolled_info,
        },
        "targets": {
            "implicit_ratio_max": 1.05,
            "unrolled_memory_ratio_min": 10.0,
            "unrolled_time_ratio_max": 1.6,
        },
    }
    _common.save_json(out / f"{NAME}.json", results)
    _common.save_csv(
        out / f"{NAME}.csv",
        [{"part": "a", **r} for r in implicit] + [{"part": "b", **r} for r in unrolled],
    )
    plot(
        implicit,
        unrolled,
        {
            "implicit": implicit_ratio,
            "cg_iterations": args.cg_iters,
            "steps": args.unroll_steps,
            "memory": memory_ratio,
            "time": time_ratio,
        },
        out / f"{NAME}.png",
        machine,
    )

    a, b = implicit_info, unrolled_info
    stats = a["solvers_cg_stats"]
    _common.print_table(
        implicit,
        [
            "method",
            "min_ms",
            "median_ms",
            "max_ms",
            "ratio_vs_jaxopt",
            "hypergrad_rel_diff_vs_jaxopt",
        ],
        title=(
            f"(a) implicit hypergradient, ridge n={a['n']} d={a['d']} float32, "
            f"{a['cg_iterations']} CG iterations (target: ours / jaxopt {TARGETS['implicit_ratio']}; "
            "ratio: median over the rounds of the per-round ratio)"
        ),
    )
    print(
        f"Hessian condition {a['hessian_condition']:.3g}; the adjoint system after "
        f"{stats['iterations']} iterations (not converged by design): solvers.cg residual "
        f"{stats['residual']:.3g} (recomputed {a['solvers_cg_true_residual']:.3g}), "
        f"jax.scipy.sparse.linalg.cg {a['jax_scipy_cg_true_residual']:.3g}; the solutions differ "
        f"by {a['cg_solution_rel_diff_ours_vs_jax_scipy']:.3g} (relative)"
    )
    _common.print_table(
        unrolled,
        ["method", "temp_memory", "min_ms", "median_ms", "max_ms"],
        title=(
            f"(b) unrolled hypergradient, T={b['steps']} steps, logistic d={b['d']} float32 "
            f"(target: memory ratio {TARGETS['memory_ratio']}, time ratio "
            f"{TARGETS['time_ratio']})"
        ),
    )
    _common.print_table(
        [
            {
                "program": name,
                **{col: _common.format_bytes(f.get(key, 0)) for key, col in MEMORY_FIELDS.items()},
            }
            for name, f in memory.items()
        ],
        title="(b) XLA memory analysis of the compiled programs",
    )
    print(
        f"checkpointed: {_common.format_ratio(memory_ratio)} less temporary memory "
        f"(target {TARGETS['memory_ratio']}x: {_common.verdict(memory_ratio, TARGETS['memory_ratio'])}"
        f"), {_common.format_ratio(time_ratio)} the time "
        f"(target {TARGETS['time_ratio']}x: {_common.verdict(time_ratio, TARGETS['time_ratio'])}); "
        f"hypergradients differ by {b['hypergrad_rel_diff']:.3g} (relative)"
    )
    if args.smoke:
        print("--smoke: compiled for fast compilation, so the timings say nothing about speed")

    rows = summary_rows(results)
    wall = time.perf_counter() - t_start
    _common.write_summary(out, NAME, rows, seconds=wall, smoke=args.smoke)
    _common.done(out, wall)
    return results


if __name__ == "__main__":
    main()
