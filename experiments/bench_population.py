"""Population throughput: a vmapped population of tuners vs a Python loop vs one tuner.

Model: an MLP 64-32-10 (batch 32) on scikit-learn's digits with one weight decay per layer, tuned
by ``bilevel.BilevelOptimizer`` (Adam(1e-3) inner, 10 inner steps, Adam(0.05) on the
hyperparameters) with ``--method`` (SOBA, one Neumann step, by default; ``implicit``: CG 20).
A population of ``P`` tuners differs in its initial weights and decays. Throughput is
``members x outer steps / second``:

- **vmap**: ``jax.jit(jax.vmap(opt.step))`` over the population (one program per size ``P``);
- **loop**: a Python loop calling the single-member jitted step ``P`` times (measured up to
  ``--loop-max`` members; a loop's throughput does not depend on ``P``);
- **one**: the vmapped program of the smallest size, per member, the unit of the growth
  (a single call timed alone pays the host's dispatch and synchronization, which a loop of
  calls overlaps: it is not a fair unit for either).

On a CPU each member's step already uses the cores, so vmap gains little over the loop (the
issue's figure is 1.7-2.3x at 32 members on 2 cores): that is the right answer there. On an
accelerator (``--device gpu``) a small model leaves the device idle and vmap's throughput grows
nearly linearly with ``P`` until the device is busy (target: >= 8x over the loop at 32 members).
Every round times the sizes back to back, so load changes hit them alike; a figure is the
median over ``--repeats`` rounds. The vmapped population's first member equals the loop's
(checked, printed).

    python -m experiments.bench_population                   # CPU, sizes 1 .. 256
    python -m experiments.bench_population --device gpu      # on a GPU
    python -m experiments.bench_population --smoke           # seconds, for the test suite
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

NAME = "bench_population"
TARGET = 8.0  # vmap / loop at 32 members on an accelerator
SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SIZES_TEXT = ",".join(map(str, SIZES))


def make_tuner(method: str, inner_steps: int) -> bilevel.BilevelOptimizer:
    """The benchmarked tuner: per-layer weight decay of the MLP, ``method``'s hypergradient."""

    def inner_loss(params, h, batch):
        decay = sum(wd * jnp.sum(p["w"] ** 2) for wd, p in zip(h["wd"], params, strict=True))
        return _common.dense_mlp_loss(params, *batch) + decay

    def outer_loss(params, h, batch):
        return _common.dense_mlp_loss(params, *batch)

    linear = (
        solvers.cg(maxiter=20, tol=1e-4)
        if method == "implicit"
        else solvers.neumann(steps=1, scale=0.1)
    )
    return bilevel.BilevelOptimizer(
        inner_loss,
        outer_loss,
        inner_optimizer=optax.adam(1e-3),
        outer_optimizer=optax.adam(0.05),
        space={"wd": H.log(np.full(2, 1e-4))},
        method=solvers.Implicit(linear_solver=linear),
        inner_steps=inner_steps,
    )


def population(opt, size: int, device) -> bilevel.BilevelState:
    """``size`` tuners stacked on a leading axis: other initial weights and decays each."""
    keys = jax.random.split(jax.random.key(0), size)
    wds = np.logspace(-6, -2, size) if size > 1 else np.array([1e-4])
    members = [
        opt.init(
            _common.dense_mlp_init(k, [64, 32, 10]),
            hparams=H.unconstrain(opt.space, {"wd": np.full(2, wd)}),
            key=k,
        )
        for k, wd in zip(keys, wds, strict=True)
    ]
    return jax.device_put(jax.tree.map(lambda *a: jnp.stack(a), *members), device)


def main(argv=None):
    parser = _common.make_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", default=SIZES_TEXT, help=f"population sizes, comma-separated ({SIZES_TEXT})"
    )
    parser.add_argument(
        "--method", choices=("soba", "implicit"), default="soba", help="hypergradient method"
    )
    parser.add_argument(
        "--device", choices=("cpu", "gpu"), default="cpu", help="where the populations run"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timing rounds")
    parser.add_argument(
        "--loop-max", type=int, default=32, help="largest population timed as a Python loop"
    )
    parser.add_argument("--inner-steps", type=int, default=10, help="inner steps per outer step")
    args = parser.parse_args(argv)
    try:
        sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    except ValueError:
        parser.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
    if not sizes or sizes[0] < 1:
        parser.error(f"--sizes must be positive integers, got {args.sizes!r}")
    if args.repeats < 1 or args.loop_max < 1 or args.inner_steps < 1:
        parser.error("--repeats, --loop-max and --inner-steps must be >= 1")
    if args.smoke:
        sizes, args.repeats, args.loop_max, args.inner_steps = [1, 4], 2, 4, 2
    try:
        device = jax.devices(args.device)[0]
    except RuntimeError:
        parser.error(f"--device {args.device}: JAX sees no such device here ({jax.devices()})")
    t_start = time.perf_counter()
    out = _common.results_dir(args)
    quiet = args.no_progress
    options = _common.compiler_options(args.smoke)

    split = _common.load_digits(seed=args.seed)
    rng = np.random.RandomState(args.seed)
    idx = rng.randint(0, len(split.x_train), (args.inner_steps, 32))
    inner = jax.device_put(
        (jnp.asarray(split.x_train[idx]), jnp.asarray(split.y_train[idx])), device
    )
    val = jax.device_put((jnp.asarray(split.x_val), jnp.asarray(split.y_val)), device)
    opt = make_tuner(args.method, args.inner_steps)

    step = jax.jit(opt.step, compiler_options=options)
    vstep = jax.jit(jax.vmap(opt.step, in_axes=(0, None, None)), compiler_options=options)
    pops = {}
    for i, p in enumerate(sizes):
        _common.phase(f"compiling {i + 1}/{len(sizes)}: vmap over {p}", quiet=quiet)
        pops[p] = population(opt, p, device)
        jax.block_until_ready(vstep(pops[p], inner, val))
    loop_size = min(args.loop_max, sizes[-1])
    members = [jax.tree.map(lambda a, i=i: a[i], pops[sizes[-1]]) for i in range(loop_size)]
    _common.phase("compiling the single-member step", quiet=quiet)
    jax.block_until_ready(step(members[0], inner, val))

    def loop():
        return [step(m, inner, val) for m in members]

    fns = {f"vmap {p}": (lambda p=p: vstep(pops[p], inner, val)) for p in sizes}
    fns["loop"] = loop
    bar = _common.progress(total=args.repeats, desc=NAME, disable=quiet)
    times = _common.timeit(fns, args.repeats, bar=bar)
    bar.close()

    # The vmapped population's members equal the loop's (float32 round-off).
    looped, _ = step(members[0], inner, val)
    batched, _ = vstep(pops[sizes[-1]], inner, val)
    diff = max(
        float(np.max(np.abs(np.asarray(a[0]) - np.asarray(b))))
        for a, b in zip(
            jax.tree.leaves(batched.params), jax.tree.leaves(looped.params), strict=True
        )
    )

    one_s = times[f"vmap {sizes[0]}"]["median_ms"] / 1e3 / sizes[0]
    loop_tp = loop_size / (times["loop"]["median_ms"] / 1e3)
    rows = []
    for p in sizes:
        t = times[f"vmap {p}"]["median_ms"] / 1e3
        rows.append(
            {
                "members": p,
                "vmap_ms": 1e3 * t,
                "vmap_throughput": p / t,
                "loop_throughput": loop_tp,
                "vmap_vs_loop": (p / t) / loop_tp,
                "vmap_vs_smallest": (p / t) * one_s,
            }
        )
    machine = (
        f"{device.device_kind} ({args.device})"
        if args.device == "gpu"
        else _common.machine_description()
    )
    at32 = next((r for r in rows if r["members"] == 32), None)
    _common.save_json(
        out / f"{NAME}.json",
        {
            "config": {**vars(args), "sizes": sizes},
            "machine": machine,
            "rows": rows,
            "loop_members": loop_size,
            "vmap_vs_loop_max_abs_diff": diff,
            "times": times,
        },
    )
    _common.save_csv(out / f"{NAME}.csv", rows)
    plot(rows, loop_tp, 1 / one_s, machine, args, out / f"{NAME}.png")
    _common.print_table(
        [
            {
                "members": r["members"],
                "vmap ms / step": f"{r['vmap_ms']:.1f}",
                "vmap members x steps / s": f"{r['vmap_throughput']:.0f}",
                "vmap / loop": _common.format_ratio(r["vmap_vs_loop"]),
                f"vmap / vmap {sizes[0]} (per member)": _common.format_ratio(r["vmap_vs_smallest"]),
            }
            for r in rows
        ],
        title=(
            f"{args.method}, MLP 64-32-10, {args.inner_steps} inner steps per outer step, on "
            f"{machine}; loop of {loop_size}: {loop_tp:.0f} members x steps / s"
        ),
    )
    print(f"vmapped member 0 vs the loop's: max |difference| of the parameters {diff:.2g}")
    summary = [
        {
            "what": f"vmap / Python loop, throughput at 32 members ({args.method}, MLP 64-32-10, "
            f"{machine})",
            "result": _common.format_ratio(at32["vmap_vs_loop"]) if at32 else "not measured",
            "target": f">= {TARGET:g}x on a GPU",
        },
        {
            "what": f"vmap throughput at {sizes[-1]} members / at {sizes[0]} ({machine})",
            "result": _common.format_ratio(rows[-1]["vmap_vs_smallest"]),
            "target": "near-linear in the members until the device is busy",
        },
    ]
    _common.write_summary(
        out, NAME, summary, seconds=time.perf_counter() - t_start, smoke=args.smoke
    )
    _common.done(out, time.perf_counter() - t_start)
    return rows


def plot(rows, loop_tp, one_tp, machine, args, path) -> None:
    """Throughput against the population size, log-log, with the loop and linear growth."""
    plt = _common.pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    p = np.array([r["members"] for r in rows])
    ax.plot(
        p,
        [r["vmap_throughput"] for r in rows],
        "o-",
        color=_common.color(args.method),
        label="vmap over the population",
    )
    ax.axhline(loop_tp, color=_common.color("baseline"), ls="--", label="Python loop")
    ax.plot(p, one_tp * p, ls=":", color="black", label=f"linear growth from {p[0]} member(s)")
    ax.axhline(
        TARGET * loop_tp, color=_common.color("oracle"), lw=0.8, ls="-.",
        label=f"target at 32 members on a GPU ({TARGET:g}x the loop)",
    )  # fmt: skip
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="population size (tuners)",
        ylabel="throughput (members x outer steps / s)",
        title=f"Population throughput, {args.method}, MLP 64-32-10 ({machine})",
    )
    ax.legend(loc="upper left", fontsize=8)
    _common.save_figure(fig, path)


if __name__ == "__main__":
    main()
