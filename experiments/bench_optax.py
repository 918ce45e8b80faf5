"""Per-step cost of the hypergradient optimizers against their Optax baselines.

A jitted training step (forward, backward, optimizer update, parameter update) of an MLP
784-512-512-10 on a batch of 256 is timed for ``optax.adam`` / ``bilevel.hd_adam``,
``optax.sgd`` / ``bilevel.hd_sgd`` and ``bilevel.hyper_adapt`` adapting 1 and 3 hyperparameters of
``inject_hyperparams(optax.adam)``. The optimizers are run interleaved (round-robin, in a rotating
order, in one process) so that machine noise hits all of them alike; each round times a block of
steps per optimizer, and a ratio is the median over rounds of the paired per-round ratios.

    python -m experiments.bench_optax            # default: a minute or two on a laptop CPU
    python -m experiments.bench_optax --smoke    # tiny, for the test suite
"""

from __future__ import annotations

import time

import jax
import numpy as np
import optax

import bilevel
from experiments._common import (
    dense_mlp_init,
    dense_mlp_loss,
    make_parser,
    print_table,
    progress,
    pyplot,
    results_dir,
    save_csv,
    save_figure,
    save_json,
)

# (name, baseline name or None, factory)
OPTIMIZERS = {
    "adam": (None, lambda: optax.adam(1e-3)),
    "hd_adam": ("adam", lambda: bilevel.hd_adam(1e-3, hyper_lr=1e-7)),
    "sgd": (None, lambda: optax.sgd(1e-2)),
    "hd_sgd": ("sgd", lambda: bilevel.hd_sgd(1e-2, hyper_lr=1e-3)),
    "inject_adam": ("adam", lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)),
    "hyper_adapt_1": (
        "adam",
        lambda: bilevel.hyper_adapt(
            optax.inject_hyperparams(optax.adam)(learning_rate=1e-3), {"learning_rate": 1e-7}
        ),
    ),
    "hyper_adapt_3": (
        "adam",
        lambda: bilevel.hyper_adapt(
            optax.inject_hyperparams(optax.adam)(learning_rate=1e-3),
            {"learning_rate": 1e-7, "b1": 1e-7, "b2": 1e-9},
        ),
    ),
}


init_mlp = dense_mlp_init


def make_step(tx):
    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(dense_mlp_loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def benchmark(names, sizes, batch, rounds, steps, seed=0, show_progress=True):
    """Median seconds per step of each optimizer and paired per-round ratios."""
    key = jax.random.key(seed)
    kx, ky, kp = jax.random.split(key, 3)
    x = jax.random.normal(kx, (batch, sizes[0]))
    y = jax.random.randint(ky, (batch,), 0, sizes[-1])
    runners = {}
    for name in names:
        tx = OPTIMIZERS[name][1]()
        params = init_mlp(kp, sizes)
        state = tx.init(params)
        step = make_step(tx)
        for _ in range(3):  # compile and warm up
            params, state, loss = step(params, state, x, y)
        jax.block_until_ready(loss)
        runners[name] = [step, params, state]

    times = {name: [] for name in names}
    for r in progress(range(rounds), desc="rounds", disable=not show_progress):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            step, params, state = runners[name]
            t0 = time.perf_counter()
            for _ in range(steps):
                params, state, loss = step(params, state, x, y)
            jax.block_until_ready((params, state, loss))
            times[name].append((time.perf_counter() - t0) / steps)
            runners[name][1:] = [params, state]
    return {name: np.asarray(t) for name, t in times.items()}


def main(argv=None):
    parser = make_parser("bench_optax", __doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256, help="batch size")
    parser.add_argument(
        "--hidden", type=int, nargs="+", default=[512, 512], help="hidden layer widths"
    )
    parser.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=20, help="steps timed per round")
    parser.add_argument(
        "--optimizers",
        nargs="+",
        default=list(OPTIMIZERS),
        choices=list(OPTIMIZERS),
        help="which optimizers to time (a ratio needs its baseline)",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.hidden, args.rounds, args.steps = 8, [16], 3, 2
    out = results_dir(args)
    sizes = [784, *args.hidden, 10]
    names = list(args.optimizers)
    times = benchmark(
        names, sizes, args.batch, args.rounds, args.steps, args.seed, not args.no_progress
    )

    rows = []
    for name in names:
        base = OPTIMIZERS[name][0]
        row = {
            "optimizer": name,
            "ms_per_step": 1e3 * float(np.median(times[name])),
            "ms_iqr": 1e3 * float(np.subtract(*np.percentile(times[name], [75, 25]))),
            "baseline": base or "",
            "ratio": "",
            "ratio_q25": "",
            "ratio_q75": "",
        }
        if base in times:
            paired = times[name] / times[base]
            row["ratio"] = float(np.median(paired))
            row["ratio_q25"], row["ratio_q75"] = (float(q) for q in np.percentile(paired, [25, 75]))
        rows.append(row)

    device = jax.devices()[0]
    meta = {
        "device": f"{device.platform}:{device.device_kind}",
        "mlp": sizes,
        "batch": args.batch,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "jax": jax.__version__,
        "optax": optax.__version__,
    }
    save_json(
        out / "bench_optax.json",
        {"meta": meta, "rows": rows, "times_s": {k: v for k, v in times.items()}},
    )
    save_csv(out / "bench_optax.csv", rows)

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ratio_rows = [r for r in rows if r["ratio"] != ""]
    if ratio_rows:
        labels = [f"{r['optimizer']}\n/ {r['baseline']}" for r in ratio_rows]
        ax.bar(labels, [r["ratio"] for r in ratio_rows], color="tab:blue")
        ax.errorbar(
            labels,
            [r["ratio"] for r in ratio_rows],
            yerr=[
                [r["ratio"] - r["ratio_q25"] for r in ratio_rows],
                [r["ratio_q75"] - r["ratio"] for r in ratio_rows],
            ],
            fmt="none",
            color="k",
        )
        ax.axhline(1.05, color="tab:red", ls="--", lw=1, label="1.05")
        ax.axhline(1.0, color="k", lw=0.5)
        ax.legend()
    ax.set_ylabel("time per step / baseline")
    ax.set_title(f"MLP {'-'.join(map(str, sizes))}, batch {args.batch}, {meta['device']}")
    save_figure(fig, out / "bench_optax.png", dpi=120)

    print_table(
        rows,
        ["optimizer", "baseline", "ms_per_step", "ratio", "ratio_q25", "ratio_q75"],
        title=f"Per-step time, median of {args.rounds} interleaved rounds x {args.steps} steps "
        f"({meta['device']}, MLP {'-'.join(map(str, sizes))}, batch {args.batch})",
    )
    print(f"results in {out}")
    return rows


if __name__ == "__main__":
    main()
