"""Benchmark of the online bilevel optimizer: step overhead, warm starts, population throughput.

Model: a small MLP 64-32-10 (batch 32) on scikit-learn's digits with one weight decay per layer.

(a) overhead: time of one outer step (``inner_steps`` inner steps + one hypergradient step) over
    the time of ``inner_steps`` plain Optax training steps, per method;
(b) warm vs cold implicit solves: CG iterations and time per outer step to the same relative
    residual (1e-4) along one online run, on a convex model (logistic regression) whose Hessian
    CG can solve, from the full training set and from minibatches;
(c) population: ``jax.vmap`` of the step over 32 hyperparameter initializations vs a Python loop
    over the 32 members (same jitted single-member step), throughput ratio.

All timings are medians of interleaved repeats measured in one run.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bilevel
import solvers
from bilevel import hparams as H
from experiments import _common

mlp_init = _common.dense_mlp_init


def inner_loss(params, h, batch):
    x, y = batch
    decay = sum(wd * jnp.sum(layer["w"] ** 2) for wd, layer in zip(h["wd"], params, strict=True))
    return _common.dense_mlp_loss(params, x, y) + decay


def outer_loss(params, h, batch):
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


def main(argv=None):
    parser = _common.make_parser("bench_bilevel", __doc__.split("\n\n")[0])
    parser.add_argument("--inner-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--population", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument(
        "--online-steps", type=int, default=60, help="outer steps of the warm-vs-cold run"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.repeats, args.online_steps, args.population, args.hidden = 3, 6, 4, 16
    out = _common.results_dir(args)
    quiet = args.no_progress

    data = _common.load_digits(seed=args.seed)
    x_tr, y_tr = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    val = (jnp.asarray(data.x_val), jnp.asarray(data.y_val))
    sizes = [64, args.hidden, 10]
    params0 = mlp_init(jax.random.PRNGKey(args.seed), sizes)
    space = {"wd": H.log(jnp.full(len(sizes) - 1, 1e-4))}
    n = args.inner_steps
    batches = bilevel.minibatches((x_tr, y_tr), jax.random.PRNGKey(1), 0, args.batch_size, n)
    inner_opt = optax.adam(1e-3)

    # ---------------------------------------------------------------- (a) overhead per method
    methods = {
        "implicit-cg(20)": solvers.Implicit(linear_solver=solvers.cg(maxiter=20, tol=1e-4)),
        "soba (neumann 1)": solvers.Implicit(linear_solver=solvers.neumann(steps=1, scale=0.1)),
        "truncated(2)": solvers.Truncated(steps=2),
        f"unrolled({n})": solvers.Unrolled(),
        "forward": bilevel.Forward(),
    }
    if args.smoke:  # compile fewer programs
        methods = {
            k: v for k, v in methods.items() if k in ("implicit-cg(20)", "truncated(2)", "forward")
        }
    h0 = H.constrain(space, H.init(space))

    @jax.jit
    def plain(params, opt_state, batches):
        def body(carry, batch):
            p, s = carry
            g = jax.grad(inner_loss)(p, h0, batch)
            u, s = inner_opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(body, (params, opt_state), batches)[0]

    opt_state0 = inner_opt.init(params0)
    fns = {"plain": lambda: plain(params0, opt_state0, batches)}
    for name, method in methods.items():
        opt = make_optimizer(space, method, inner_opt, n)
        state = opt.init(params0)
        step = jax.jit(opt.step)
        fns[name] = lambda step=step, state=state: step(state, batches, val)
    times = _common.timeit(fns, args.repeats, disable=quiet)  # compiles in its warm-up
    plain_ms = times["plain"]["median_ms"]
    overhead_rows = [
        {
            "method": name,
            "ms_per_outer_step": t["median_ms"],
            "ratio_vs_plain": t["median_ms"] / plain_ms,
        }
        for name, t in times.items()
    ]

    # ---------------------------------------------------------------- (b) warm vs cold
    # Implicit CG needs a positive-definite Hessian: a multinomial logistic regression (convex),
    # with the Hessian from the full training set (systems change slowly between outer steps)
    # and from minibatches of 256 (they change with the batch).
    lin_sizes = [64, 10]
    lin_space = {"wd": H.log(jnp.full(1, 1e-2))}
    lin_params = mlp_init(jax.random.PRNGKey(args.seed), lin_sizes)
    warm_rows = []
    for hessian_batch in ("full",) if args.smoke else ("full", 256):
        for warm in (True, False):
            method = solvers.Implicit(
                linear_solver=solvers.cg(maxiter=500, tol=1e-4), warm_start=warm
            )
            opt = make_optimizer(lin_space, method, inner_opt, n)
            state = opt.init(lin_params)
            step = jax.jit(opt.step)
            iters, secs, resid = [], [], []
            for t in _common.progress(range(args.online_steps), desc=f"warm={warm}", disable=quiet):
                if hessian_batch == "full":
                    b = (
                        jnp.broadcast_to(x_tr, (n, *x_tr.shape)),
                        jnp.broadcast_to(y_tr, (n, *y_tr.shape)),
                    )
                else:
                    b = bilevel.minibatches(
                        (x_tr, y_tr), jax.random.PRNGKey(2), t, hessian_batch, n
                    )
                t0 = time.perf_counter()
                state, m = jax.block_until_ready(step(state, b, val))
                secs.append(time.perf_counter() - t0)
                iters.append(int(m["linear_iterations"]))
                resid.append(float(m["linear_residual"]))
            skip = max(1, len(iters) // 5)  # after compilation and the first transient
            warm_rows.append(
                {
                    "hessian_batch": hessian_batch,
                    "warm_start": warm,
                    "mean_cg_iterations": float(np.mean(iters[skip:])),
                    "median_ms_per_outer_step": 1e3 * float(np.median(secs[skip:])),
                    "max_relative_residual": float(np.max(resid[skip:])),
                }
            )

    # ---------------------------------------------------------------- (c) population
    p = args.population
    wds = np.logspace(-6, -2, p)
    pop_rows = []
    for name in ("implicit-cg(20)",) if args.smoke else ("implicit-cg(20)", "soba (neumann 1)"):
        opt = make_optimizer(space, methods[name], inner_opt, n)
        members = [
            opt.init(
                mlp_init(jax.random.PRNGKey(i), sizes),
                hparams=H.unconstrain(space, {"wd": jnp.full(len(sizes) - 1, wd)}),
            )
            for i, wd in enumerate(wds)
        ]
        population = jax.tree.map(lambda *a: jnp.stack(a), *members)
        step = jax.jit(opt.step)
        vstep = jax.jit(jax.vmap(opt.step, in_axes=(0, None, None)))

        def loop(step=step, members=members):
            return [step(s, batches, val) for s in members]

        pop_times = _common.timeit(
            {
                "loop": loop,
                "vmap": lambda vstep=vstep, population=population: vstep(population, batches, val),
            },
            max(3, args.repeats // 3),
            disable=quiet,
        )
        loop_ms, vmap_ms = pop_times["loop"]["median_ms"], pop_times["vmap"]["median_ms"]
        pop_rows.append(
            {
                "method": name,
                "members": p,
                "loop_ms": loop_ms,
                "vmap_ms": vmap_ms,
                "throughput_ratio": loop_ms / vmap_ms,
            }
        )

    results = {
        "config": vars(args),
        "overhead": overhead_rows,
        "warm_vs_cold": warm_rows,
        "population": pop_rows,
        "device": str(jax.devices()[0]),
    }
    _common.save_json(out / "bench_bilevel.json", results)
    _common.save_csv(out / "overhead.csv", overhead_rows)

    plt = _common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["method"] for r in overhead_rows]
    axes[0].barh(names, [r["ratio_vs_plain"] for r in overhead_rows])
    axes[0].set(xlabel=f"time of one outer step / {n} plain steps", title="Overhead per method")
    xs = np.arange(len(pop_rows))
    axes[1].bar(xs - 0.2, [r["loop_ms"] for r in pop_rows], 0.4, label="loop")
    axes[1].bar(xs + 0.2, [r["vmap_ms"] for r in pop_rows], 0.4, label="vmap")
    axes[1].set_xticks(xs, [r["method"] for r in pop_rows])
    axes[1].set(
        ylabel="ms per outer step of the whole population", title=f"Population of {p} tuners"
    )
    axes[1].legend()
    _common.save_figure(fig, out / "bench_bilevel.png", dpi=120)

    _common.print_table(overhead_rows, title=f"(a) one outer step vs {n} plain Adam steps")
    _common.print_table(warm_rows, title="(b) warm-started vs cold implicit CG (tol 1e-4)")
    _common.print_table(pop_rows, title="(c) population: vmap vs loop (target >= 8x at 32)")
    return results


if __name__ == "__main__":
    main()
