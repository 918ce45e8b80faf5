"""Benchmark of the online bilevel optimizer: step overhead, warm starts, population throughput.

Model: a small MLP 64-32-10 (batch 32) on scikit-learn's digits with one weight decay per layer,
tuned by ``bilevel.BilevelOptimizer`` (Adam(1e-3) inner, Adam(0.05) on the hyperparameters).

(a) overhead: time of one outer step (``inner_steps`` inner steps + one hypergradient step) over
    the time of ``inner_steps`` plain Optax training steps, per method: implicit CG (20
    iterations), SOBA (one Neumann step), truncated (2 steps), unrolled, forward mode;
(b) warm vs cold implicit solves: CG iterations and time per outer step to the same relative
    residual (1e-4) along one online run, on a convex model (multinomial logistic regression)
    whose Hessian CG can solve, from the full training set and from minibatches of 256;
    ``solvers.Implicit(warm_start=True)`` against ``warm_start=False``;
(c) population: ``jax.vmap`` of the step over 32 hyperparameter initializations vs a Python loop
    over the 32 members (the same jitted single-member step), throughput ratio (target >= 8x, an
    accelerator's figure: on a CPU the loop's members already share the cores).

Every program is compiled first (one line each); then one bar counts the timing rounds of (a),
the online steps of (b) and the rounds of (c). Timings are interleaved (the runs of (b) advance in
lockstep); a ratio of (a) or (c) is the median over the rounds of the ratio within a round (the
calls run back to back, under the same load): on a shared machine, steadier than a ratio of
medians.
``--smoke`` runs one method and compiles with XLA's fast-compile options
(``_common.FAST_COMPILE``): its timings say nothing about speed.

    python -m experiments.bench_bilevel            # default
    python -m experiments.bench_bilevel --smoke    # seconds, for the test suite
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bilevel
import solvers
from bilevel import hparams as H
from experiments import _common

NAME = "bench_bilevel"
POPULATION_TARGET = ">= 8"
CG_TOL = 1e-4  # relative residual of the warm-vs-cold solves


def mlp_init(seed: int, sizes: list[int]) -> list[dict]:
    """He-initialized ``[{"w", "b"}, ...]`` for :func:`_common.dense_mlp`, drawn with NumPy
    (eager ``jax.random`` would compile a kernel per shape)."""
    rng = np.random.RandomState(seed)
    return [
        {
            "w": jnp.asarray(rng.randn(a, b).astype(np.float32) * np.sqrt(2.0 / a)),
            "b": jnp.zeros(b, jnp.float32),
        }
        for a, b in itertools.pairwise(sizes)
    ]


def sample_batches(x: np.ndarray, y: np.ndarray, seed: int, batch_size: int, num: int):
    """``num`` minibatches of ``batch_size`` rows, shaped ``(num, batch, ...)``: drawn without
    replacement together when ``num * batch_size <= len(x)``, otherwise each on its own."""
    rng = np.random.RandomState(seed)
    if num * batch_size <= len(x):
        idx = rng.permutation(len(x))[: num * batch_size].reshape(num, batch_size)
    else:
        idx = np.stack([rng.permutation(len(x))[:batch_size] for _ in range(num)])
    return jnp.asarray(x[idx]), jnp.asarray(y[idx])


def inner_loss(params, h, batch):
    """Cross-entropy plus one weight decay per layer: ``sum_l wd_l ||W_l||^2``."""
    x, y = batch
    decay = sum(wd * jnp.sum(layer["w"] ** 2) for wd, layer in zip(h["wd"], params, strict=True))
    return _common.dense_mlp_loss(params, x, y) + decay


def outer_loss(params, h, batch):
    """Validation cross-entropy."""
    return _common.dense_mlp_loss(params, *batch)


def make_optimizer(space, method, inner_opt, inner_steps):
    """The benchmarked tuner: Adam(0.05) on the hyperparameters of ``space``."""
    return bilevel.BilevelOptimizer(
        inner_loss,
        outer_loss,
        inner_optimizer=inner_opt,
        outer_optimizer=optax.adam(0.05),
        space=space,
        method=method,
        inner_steps=inner_steps,
    )


def all_methods(inner_steps: int) -> dict[str, solvers.AbstractMethod]:
    """The methods of (a), by the name printed in the tables."""
    return {
        "implicit-cg(20)": solvers.Implicit(linear_solver=solvers.cg(maxiter=20, tol=1e-4)),
        "soba (neumann 1)": solvers.Implicit(linear_solver=solvers.neumann(steps=1, scale=0.1)),
        "truncated(2)": solvers.Truncated(steps=2),
        f"unrolled({inner_steps})": solvers.Unrolled(),
        "forward": bilevel.Forward(),
    }


def stack_floats(*leaves):
    """The floating ``leaves`` stacked in NumPy; for other leaves (PRNG keys, counters) the first."""
    if jnp.issubdtype(leaves[0].dtype, jnp.inexact):
        return np.stack([np.asarray(leaf) for leaf in leaves])
    return leaves[0]


def max_abs_diff(a, b) -> float:
    """Largest absolute difference between the floating leaves of two pytrees (in NumPy)."""
    diffs = [
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        if jnp.issubdtype(x.dtype, jnp.inexact) and x.size
    ]
    return max(diffs, default=0.0)


class Compiler:
    """Compiles (by a first call, result discarded) with one announced line per program."""

    def __init__(self, total: int, quiet: bool):
        self.total, self.done, self.quiet = total, 0, quiet

    def __call__(self, what: str, fn, *args):
        self.done += 1
        _common.phase(f"compiling {self.done}/{self.total}: {what}", quiet=self.quiet)
        jax.block_until_ready(fn(*args))


def main(argv=None):
    parser = _common.make_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument(
        "--inner-steps", type=int, default=10, help="inner training steps per outer step"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="rows per inner minibatch")
    parser.add_argument("--hidden", type=int, default=32, help="hidden units of the MLP")
    parser.add_argument(
        "--population", type=int, default=32, help="(c) tuners in the vmapped population"
    )
    parser.add_argument(
        "--repeats", type=int, default=100, help="(a) interleaved timing rounds ((c): a third)"
    )
    parser.add_argument(
        "--online-steps",
        type=int,
        default=60,
        help="(b) outer steps of each warm/cold run (the first fifth is not measured)",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.repeats, args.online_steps, args.population, args.hidden = 3, 6, 4, 16
    for name in ("inner_steps", "batch_size", "hidden", "population", "repeats", "online_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    t_start = time.perf_counter()
    out = _common.results_dir(args)
    quiet = args.no_progress
    options = _common.compiler_options(args.smoke)
    machine = _common.machine_description()

    _common.phase("loading scikit-learn's digits", quiet=quiet)
    data = _common.load_digits(seed=args.seed)
    val = (jnp.asarray(data.x_val), jnp.asarray(data.y_val))
    sizes = [64, args.hidden, 10]
    params0 = mlp_init(args.seed, sizes)
    space = {"wd": H.log(np.full(len(sizes) - 1, 1e-4))}
    n = args.inner_steps
    batches = sample_batches(data.x_train, data.y_train, args.seed + 1, args.batch_size, n)
    inner_opt = optax.adam(1e-3)

    methods = all_methods(n)
    population_methods = ["implicit-cg(20)", "soba (neumann 1)"]
    hessian_batches: list[str | int] = ["full", 256]
    if args.smoke:  # compile fewer programs
        methods = {k: v for k, v in methods.items() if k == "implicit-cg(20)"}
        population_methods, hessian_batches = ["implicit-cg(20)"], ["full"]
    compile_ = Compiler(
        1 + len(methods) + 2 * len(hessian_batches) + len(population_methods), quiet
    )

    # ---------------------------------------------------------------- (a) compile
    h0 = H.constrain(space, H.init(space))

    def plain(params, opt_state, batches):
        def body(carry, batch):
            p, s = carry
            g = jax.grad(inner_loss)(p, h0, batch)
            u, s = inner_opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(body, (params, opt_state), batches)[0]

    plain = jax.jit(plain, compiler_options=options)
    opt_state0 = inner_opt.init(params0)
    fns = {"plain": lambda: plain(params0, opt_state0, batches)}
    compile_(f"(a) {n} plain Optax Adam steps", fns["plain"])
    optimizers, steps = {}, {}
    for name, method in methods.items():
        optimizers[name] = make_optimizer(space, method, inner_opt, n)
        steps[name] = jax.jit(optimizers[name].step, compiler_options=options)
        state = optimizers[name].init(params0)
        fns[name] = lambda step=steps[name], state=state: step(state, batches, val)
        compile_(f"(a) one outer step, {name}", fns[name])

    # ---------------------------------------------------------------- (b) compile
    # Implicit CG needs a positive-definite Hessian: a multinomial logistic regression (convex),
    # with the Hessian from the full training set (systems change slowly between outer steps)
    # and from minibatches of 256 (they change with the batch).
    lin_space = {"wd": H.log(np.full(1, 1e-2))}
    lin_params = mlp_init(args.seed, [64, 10])
    full_batch = (jnp.asarray(data.x_train[None]), jnp.asarray(data.y_train[None]))

    def inner_batches(hessian_batch, t):
        if hessian_batch == "full":  # one batch, reused by every inner step
            return full_batch
        return sample_batches(data.x_train, data.y_train, 1000 + t, hessian_batch, n)

    warm_runs = {}
    for hessian_batch in hessian_batches:
        for warm in (True, False):
            method = solvers.Implicit(
                linear_solver=solvers.cg(maxiter=500, tol=CG_TOL), warm_start=warm
            )
            opt = make_optimizer(lin_space, method, inner_opt, n)
            step = jax.jit(opt.step, compiler_options=options)
            state = opt.init(lin_params)
            label = f"Hessian batch {hessian_batch}, {'warm' if warm else 'cold'}"
            compile_(
                f"(b) logistic regression, {label}",
                step,
                state,
                inner_batches(hessian_batch, 0),
                val,
            )
            warm_runs[(hessian_batch, warm)] = (step, state)

    # ---------------------------------------------------------------- (c) compile
    p = args.population
    wds = np.logspace(-6, -2, p)
    populations = {}
    for name in population_methods:
        opt = optimizers[name]
        members = [
            opt.init(
                mlp_init(i, sizes),
                hparams=H.unconstrain(space, {"wd": np.full(len(sizes) - 1, wd)}),
            )
            for i, wd in enumerate(wds)
        ]
        population = jax.tree.map(lambda *a: jnp.stack(a), *members)
        vstep = jax.jit(jax.vmap(opt.step, in_axes=(0, None, None)), compiler_options=options)
        compile_(f"(c) vmap of {name} over {p} tuners", vstep, population, batches, val)
        populations[name] = (steps[name], vstep, members, population)

    # ---------------------------------------------------------------- measured work
    pop_repeats = max(3, args.repeats // 3)
    bar = _common.progress(
        total=args.repeats + len(warm_runs) * args.online_steps + len(populations) * pop_repeats,
        desc=NAME,
        disable=quiet,
    )
    bar.set_postfix_str("(a) overhead")
    times = _common.timeit(fns, args.repeats, bar=bar)
    overhead_rows = [
        {
            "method": name,
            "median_ms": t["median_ms"],
            "min_ms": t["min_ms"],
            "ratio_vs_plain": _common.paired_ratio(times, name, "plain"),
        }
        for name, t in times.items()
    ]

    # The runs advance in lockstep (one step of each in turn), so that a change of machine load
    # hits them alike.
    skip = max(1, args.online_steps // 5)  # the first solves start from zero either way
    logs = {key: {"iters": [], "secs": [], "resid": [], "status": []} for key in warm_runs}
    states = {key: state for key, (_, state) in warm_runs.items()}
    bar.set_postfix_str("(b) warm and cold runs, in lockstep")
    for t in range(args.online_steps):
        for key, (step, _) in warm_runs.items():
            b = inner_batches(key[0], t)
            t0 = time.perf_counter()
            states[key], m = jax.block_until_ready(step(states[key], b, val))
            logs[key]["secs"].append(time.perf_counter() - t0)
            logs[key]["iters"].append(int(m["linear_iterations"]))
            logs[key]["resid"].append(float(m["linear_residual"]))
            logs[key]["status"].append(solvers.Status(int(m["status"])).name)
            bar.update()
    warm_rows = [
        {
            "hessian_batch": hessian_batch,
            "warm_start": warm,
            "mean_cg_iterations": float(np.mean(log["iters"][skip:])),
            "median_ms_per_outer_step": 1e3 * float(np.median(log["secs"][skip:])),
            "max_relative_residual": float(np.max(log["resid"][skip:])),
            "all_success": all(s == "SUCCESS" for s in log["status"]),
            "cg_iterations": log["iters"],
        }
        for (hessian_batch, warm), log in logs.items()
    ]

    pop_rows = []
    for name, (step, vstep, members, population) in populations.items():
        bar.set_postfix_str(f"(c) population, {name}")

        def loop(step=step, members=members):
            return [step(s, batches, val) for s in members]

        def vmapped(vstep=vstep, population=population):
            return vstep(population, batches, val)

        pop_times = _common.timeit({"loop": loop, "vmap": vmapped}, pop_repeats, bar=bar)
        looped_states = jax.tree.map(stack_floats, *[s for s, _ in loop()])
        pop_rows.append(
            {
                "method": name,
                "members": p,
                "loop_median_ms": pop_times["loop"]["median_ms"],
                "vmap_median_ms": pop_times["vmap"]["median_ms"],
                "throughput_ratio": _common.paired_ratio(pop_times, "loop", "vmap"),
                "vmap_vs_loop_max_abs_diff": max_abs_diff(vmapped()[0], looped_states),
            }
        )
    bar.set_postfix_str("")
    bar.close()

    # ---------------------------------------------------------------- report
    results: dict[str, Any] = {
        "config": vars(args),
        "machine": machine,
        "device": str(jax.devices()[0]),
        "compiler_options": options,
        "overhead": overhead_rows,
        "warm_vs_cold": warm_rows,
        "population": pop_rows,
        "population_target": POPULATION_TARGET,
    }
    _common.save_json(out / f"{NAME}.json", results)
    _common.save_csv(out / "overhead.csv", overhead_rows)
    plot(overhead_rows, warm_rows, pop_rows, n, p, machine, out / f"{NAME}.png")

    _common.print_table(
        overhead_rows,
        title=f"(a) one outer step vs {n} plain Adam steps (MLP {'-'.join(map(str, sizes))}, "
        f"batch {args.batch_size}); ratio: median over the rounds of the per-round ratio (the "
        "medians of longer calls suffer more from other jobs)",
    )
    _common.print_table(
        [{k: v for k, v in r.items() if k != "cg_iterations"} for r in warm_rows],
        title=f"(b) warm-started vs cold implicit CG to relative residual {CG_TOL:g} "
        f"(logistic regression; outer steps {skip + 1}-{args.online_steps})",
    )
    _common.print_table(
        pop_rows,
        title=f"(c) population of {p}: vmap vs loop (target {POPULATION_TARGET}x; ratio: median "
        "per-round ratio)",
    )
    for r in pop_rows:
        ratio = r["throughput_ratio"]
        print(
            f"(c) {r['method']}: vmap gives {_common.format_ratio(ratio)} the loop's throughput "
            f"on {machine} (target {POPULATION_TARGET}x: {_common.verdict(ratio, POPULATION_TARGET)})"
            f"; vmapped and looped states differ by at most {r['vmap_vs_loop_max_abs_diff']:.2g}"
        )
    rows = summary_rows(results)
    if args.smoke:
        print("--smoke: compiled for fast compilation, so the timings say nothing about speed")
    wall = time.perf_counter() - t_start
    _common.write_summary(out, NAME, rows, seconds=wall, smoke=args.smoke)
    _common.done(out, wall)
    return results


def summary_rows(results: dict[str, Any]) -> list[dict[str, str]]:
    """The README rows of a run from its ``bench_bilevel.json`` contents.

    Args:
      results: what :func:`main` saves (``config``, ``machine``, ``overhead``, ``warm_vs_cold``,
        ``population``).

    Returns:
      ``{"what", "result", "target"}`` rows: overhead per method, warm / cold CG iterations per
      Hessian batch, population throughput per method.
    """
    cfg, machine = results["config"], results["machine"]
    model = f"MLP 64-{cfg['hidden']}-10, batch {cfg['batch_size']}"
    rows = [
        {
            "what": f"(a) one outer step / {cfg['inner_steps']} plain Adam steps, {r['method']} "
            f"({model}; median per-round ratio)",
            "result": _common.format_ratio(r["ratio_vs_plain"]),
            "target": "-",
        }
        for r in results["overhead"][1:]
    ]
    warm_rows = results["warm_vs_cold"]
    for hessian_batch in dict.fromkeys(r["hessian_batch"] for r in warm_rows):
        warm_r, cold_r = (
            next(
                r for r in warm_rows if r["hessian_batch"] == hessian_batch and r["warm_start"] is w
            )
            for w in (True, False)
        )
        fewer = cold_r["mean_cg_iterations"] / max(warm_r["mean_cg_iterations"], 1e-9)
        rows.append(
            {
                "what": f"(b) CG iterations per outer step, warm / cold start (logistic "
                f"regression, Hessian batch {hessian_batch}, tol {CG_TOL:g})",
                "result": f"{warm_r['mean_cg_iterations']:.3g} / "
                f"{cold_r['mean_cg_iterations']:.3g} ({_common.format_ratio(fewer)} fewer)",
                "target": "-",
            }
        )
    for r in results["population"]:
        ratio = r["throughput_ratio"]
        rows.append(
            {
                "what": f"(c) vmap of {r['members']} tuners / Python loop over them: throughput, "
                f"{r['method']}",
                "result": f"{_common.format_ratio(ratio)} on {machine} "
                f"({_common.verdict(ratio, POPULATION_TARGET)})",
                "target": f"{POPULATION_TARGET}x",
            }
        )
    return rows


def plot(overhead_rows, warm_rows, pop_rows, n, p, machine, path) -> None:
    """(a) overhead per method, (b) warm vs cold CG iterations, (c) population throughput."""
    plt = _common.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), gridspec_kw={"width_ratios": [1.3, 1, 1]})

    ax = axes[0]
    rows = overhead_rows[1:]
    ys = np.arange(len(rows))[::-1]
    ax.barh(
        ys,
        [r["ratio_vs_plain"] for r in rows],
        color=[_common.color(r["method"]) for r in rows],
        edgecolor="black",
        lw=0.5,
    )
    for y, r in zip(ys, rows, strict=True):
        ax.text(r["ratio_vs_plain"], y, f" {r['ratio_vs_plain']:.2g}x", va="center", fontsize=8)
    ax.set_yticks(ys, [r["method"] for r in rows], fontsize=8)
    ax.axvline(1.0, color="grey", ls="--", lw=1, label=f"{n} plain Optax Adam steps (= 1)")
    ax.set_xlim(0, 1.25 * max(r["ratio_vs_plain"] for r in rows))
    ax.set(xlabel=f"time of one outer step / time of {n} plain steps (median ratio)")
    ax.set_title("(a) overhead of one outer step", fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=8, frameon=False)

    ax = axes[1]
    groups = list(dict.fromkeys(r["hessian_batch"] for r in warm_rows))
    xs = np.arange(len(groups))
    for offset, warm in ((-0.2, True), (0.2, False)):
        values = [
            next(
                r["mean_cg_iterations"]
                for r in warm_rows
                if r["hessian_batch"] == g and r["warm_start"] is warm
            )
            for g in groups
        ]
        ax.bar(
            xs + offset,
            values,
            0.4,
            color=_common.color("implicit-cg"),
            hatch=None if warm else "//",
            edgecolor="black",
            lw=0.5,
            label="warm start (previous solution)" if warm else "cold start (zero)",
        )
        for x, v in zip(xs + offset, values, strict=True):
            ax.text(x, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(xs, [f"Hessian batch: {g}" for g in groups])
    ax.set_ylim(0, 1.25 * max(r["mean_cg_iterations"] for r in warm_rows))
    ax.set(ylabel=f"CG iterations per outer step (mean), tol {CG_TOL:g}")
    ax.set_title("(b) implicit CG, warm vs cold (logistic regression)", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)

    ax = axes[2]
    xs = np.arange(len(pop_rows))
    ratios = [r["throughput_ratio"] for r in pop_rows]
    ax.bar(xs, ratios, 0.5, color=[_common.color(r["method"]) for r in pop_rows], edgecolor="black")
    for x, v in zip(xs, ratios, strict=True):
        ax.text(x, v, f"{v:.2g}x", ha="center", va="bottom", fontsize=8)
    ax.axhline(1.0, color="grey", ls="--", lw=1, label="Python loop over the tuners (= 1)")
    _common.target_line(ax, float(POPULATION_TARGET.split()[1]), f"target {POPULATION_TARGET}x")
    ax.set_xticks(xs, [r["method"] for r in pop_rows], fontsize=8)
    ax.set_ylim(0, 1.3 * max(*ratios, float(POPULATION_TARGET.split()[1])))
    ax.set(ylabel="throughput, vmap / loop (median ratio)")
    ax.set_title(f"(c) population of {p} tuners", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(f"Online bilevel optimizer (bilevel.BilevelOptimizer), {machine}")
    _common.save_figure(fig, path, dpi=110)


if __name__ == "__main__":
    main()
