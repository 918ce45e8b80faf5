"""Per-step time and state size of the hypergradient optimizers against their Optax baselines.

A jitted training step (forward, backward, optimizer update, parameter update; parameters and
state donated) is timed for ``optax.adam`` / ``bilevel.hd_adam`` (exact rule, lagged rule, and
the generic ``hypergradient_lr`` path that stores the previous direction), ``optax.sgd`` /
``bilevel.hd_sgd`` (plain and heavy-ball momentum) and ``bilevel.hyper_adapt`` adapting 1 and 3
hyperparameters of ``inject_hyperparams(optax.adam)``, on two sizes:

- ``mlp``: MLP 784-512-512-10 (0.67M parameters), batch 256: the model's compute dominates;
- ``10m``: MLP 784-2048-2048-2048-10 (10.0M parameters), batch 8: the optimizer's memory
  traffic dominates.

Timing: ``_common.timeit`` once per round, every optimizer timed for ``--steps`` steps in each
round, in an order that rotates from round to round, so that machine noise hits all of them
alike. ``ms/step`` is the median over rounds, and ``ratio`` is the ratio of those medians
(optimizer / baseline), the numbers printed side by side; ``ratio_q25``-``ratio_q75`` is the
spread of the paired per-round ratios. Also reported: the optimizer state in parameter-sized
arrays and bytes per parameter, and the bytes XLA's cost analysis counts for the optimizer
update alone (gradient given) per parameter, whose ratio is what a pure memory-traffic model
predicts for the optimizer's share of the step.

    python -m experiments.bench_optax                 # default: a few minutes on a laptop CPU
    python -m experiments.bench_optax --sizes 10m     # only the memory-bound size
    python -m experiments.bench_optax --smoke         # tiny, for the test suite
"""

from __future__ import annotations

import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bilevel
from experiments import _common

NAME = "bench_optax"


def _global_sync() -> optax.GradientTransformation:
    """The gradient times ``1 + 0 * sum(g^2)``: unchanged, but no entry of the update can be
    computed before a reduction over every gradient has finished. ``optax.adam`` behind it is
    the floor of any exact hypergradient rule (its rate needs ``<g_t, d_{t-1}>`` first)."""

    def update(updates, state, params=None):
        del params
        total = sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(updates))
        return jax.tree.map(lambda g: g * (1 + 0 * total).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


# (name, baseline name or None, factory)
OPTIMIZERS = {
    "adam": (None, lambda: optax.adam(1e-3)),
    "hd_adam": ("adam", lambda: bilevel.hd_adam(1e-3)),
    "hd_adam_lagged": ("adam", lambda: bilevel.hd_adam(1e-3, lagged=True)),
    "hd_adam_stored": (
        "adam",
        lambda: bilevel.hypergradient_lr(
            optax.scale_by_adam(), 1e-3, bilevel.DEFAULT_HYPER_LR, multiplicative=True
        ),
    ),
    "adam_global_sync": ("adam", lambda: optax.chain(_global_sync(), optax.adam(1e-3))),
    "sgd": (None, lambda: optax.sgd(1e-2)),
    "hd_sgd": ("sgd", lambda: bilevel.hd_sgd(1e-2)),
    "sgd_momentum": (None, lambda: optax.sgd(1e-2, momentum=0.9)),
    "hd_sgd_momentum": ("sgd_momentum", lambda: bilevel.hd_sgd(1e-2, momentum=0.9)),
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
DESCRIPTION = {
    "hd_adam": "exact rule, d_{t-1} recomputed from Adam's moments",
    "hd_adam_lagged": "lagged=True: rate from the previous step's hypergradient",
    "hd_adam_stored": "generic hypergradient_lr(scale_by_adam()): stores d_{t-1}",
    "adam_global_sync": "optax.adam waiting for one global sum of g^2: an exact rule's floor",
    "hd_sgd": "plain SGD: stores g_{t-1}",
    "hd_sgd_momentum": "heavy ball: d_{t-1} is the momentum buffer",
}
# size -> (hidden widths, batch)
SIZES = {"mlp": ([512, 512], 256), "10m": ([2048, 2048, 2048], 8), "tiny": ([16], 8)}
SMOKE_OPTIMIZERS = ["adam", "hd_adam", "hd_adam_lagged"]


def make_step(tx):
    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(_common.dense_mlp_loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def make_update(tx):
    """The optimizer alone: (grads, state, params) -> (new params, new state)."""

    def update(grads, state, params):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(update, donate_argnums=(1, 2))


def state_size(state, params):
    """Parameter-shaped leaves of ``state``: (arrays per parameter leaf, bytes per parameter)."""
    shapes = [tuple(p.shape) for p in jax.tree.leaves(params)]
    n = sum(int(np.prod(s)) for s in shapes)
    leaves = [
        x for x in jax.tree.leaves(state) if np.ndim(x) > 0 and tuple(np.shape(x)) in set(shapes)
    ]
    return len(leaves) / len(shapes), sum(x.nbytes for x in leaves) / n


def _bytes(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("bytes accessed", float("nan")))


def prepare(size, names, steps, seed):
    """Compile and warm up every optimizer's training step on one size.

    Returns ``(fns, info, meta)``: zero-argument functions that run ``steps`` steps each, the
    state sizes and XLA byte counts per optimizer, and the model's description.
    """
    hidden, batch = SIZES[size]
    sizes = [784, *hidden, 10]
    kx, ky, kp = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (batch, sizes[0]))
    y = jax.random.randint(ky, (batch,), 0, sizes[-1])
    n_params = sum(a * b + b for a, b in itertools.pairwise(sizes))
    fns, info = {}, {}
    for name in names:
        tx = OPTIMIZERS[name][1]()
        params = _common.dense_mlp_init(kp, sizes)
        state = tx.init(params)
        arrays, nbytes = state_size(state, params)
        step = make_step(tx).lower(params, state, x, y).compile()
        grads = jax.tree.map(jnp.ones_like, params)
        update = make_update(tx).lower(grads, state, params).compile()
        info[name] = {
            "state_arrays": arrays,
            "state_bytes_per_param": nbytes,
            "step_bytes_per_param": _bytes(step) / n_params,
            "update_bytes_per_param": _bytes(update) / n_params,
        }
        box = [params, state]

        def run(step=step, box=box):
            params, state = box
            for _ in range(steps):
                params, state, loss = step(params, state, x, y)
            box[:] = [params, state]
            return loss

        jax.block_until_ready(run())  # warm up (first call, allocations)
        fns[name] = run
    return fns, info, {"mlp": sizes, "batch": batch, "parameters": n_params}


def time_rounds(fns, rounds, steps, bar):
    """Seconds per step of every function, per round (``_common.timeit``, rotating order)."""
    names = list(fns)
    times = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names)
        order = names[k:] + names[:k]
        timed = _common.timeit({name: fns[name] for name in order}, 1, warmup=0)
        for name in names:
            times[name].append(timed[name]["median_ms"] / steps)
        bar.update(1)
    return {name: np.asarray(t) for name, t in times.items()}


def table_rows(size, times, info):
    """Rows of one size's table: median ms per step, ratios to the baseline, state sizes."""
    names = list(times)
    rows = []
    for name in names:
        base = OPTIMIZERS[name][0]
        t = np.asarray(times[name])
        row = {
            "size": size,
            "optimizer": name,
            "baseline": base or "-",
            "ms_per_step": float(np.median(t)),
            "ratio": "-",
            "ratio_min": "-",
            "ratio_q25": "-",
            "ratio_q75": "-",
            **info[name],
            "update_bytes_ratio": "-",
            "step_bytes_ratio": "-",
        }
        if base in times:
            tb = np.asarray(times[base])
            paired = t / tb
            row["ratio"] = float(np.median(t) / np.median(tb))
            row["ratio_min"] = float(np.min(t) / np.min(tb))
            row["ratio_q25"], row["ratio_q75"] = (float(q) for q in np.percentile(paired, [25, 75]))
            row["update_bytes_ratio"] = (
                info[name]["update_bytes_per_param"] / info[base]["update_bytes_per_param"]
            )
            row["step_bytes_ratio"] = (
                info[name]["step_bytes_per_param"] / info[base]["step_bytes_per_param"]
            )
        rows.append(row)
    return rows


def plot(rows, metas, path):
    plt = _common.pyplot()
    sizes = list(metas)
    fig, axes = plt.subplots(1, len(sizes), figsize=(6.5 * len(sizes), 4.2), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        rs = [r for r in rows if r["size"] == size and r["ratio"] != "-"]
        labels = [f"{r['optimizer']}\n/ {r['baseline']}" for r in rs]
        pos = np.arange(len(rs))
        colors = [_common.color(r["optimizer"].replace("_", "-")) for r in rs]
        hatches = [
            "//" if "lagged" in r["optimizer"] else ("xx" if "stored" in r["optimizer"] else "")
            for r in rs
        ]
        bars = ax.bar(pos, [r["ratio"] for r in rs], color=colors)
        for b, h in zip(bars, hatches, strict=True):
            b.set_hatch(h)
        ax.add_patch(
            plt.Rectangle(
                (0, 0),
                0,
                0,
                color="0.6",
                label="measured: ratio of medians (hatched: lagged, stored)",
            )
        )
        ax.errorbar(
            pos,
            [r["ratio"] for r in rs],
            yerr=[
                [max(r["ratio"] - r["ratio_q25"], 0) for r in rs],
                [max(r["ratio_q75"] - r["ratio"], 0) for r in rs],
            ],
            fmt="none",
            color="k",
            capsize=3,
            label="IQR of per-round ratios",
        )
        ax.plot(
            pos,
            [r["update_bytes_ratio"] for r in rs],
            "D",
            color="k",
            mfc="w",
            label="memory model: optimizer bytes ratio (XLA)",
        )
        ax.plot(
            pos,
            [r["step_bytes_ratio"] for r in rs],
            "^",
            color="k",
            mfc="w",
            label="memory model: whole-step bytes ratio (XLA)",
        )
        ax.axhline(1.0, color=_common.color("baseline"), lw=1, label="baseline (= 1)")
        ax.axhline(1.05, color="tab:red", ls="--", lw=1, label="target 1.05")
        ax.set_xticks(pos, labels, fontsize=7, rotation=45, ha="right")
        ax.set_ylabel("time per step / baseline's")
        meta = metas[size]
        ax.set_title(
            f"{size}: MLP {'-'.join(map(str, meta['mlp']))} "
            f"({meta['parameters'] / 1e6:.2f}M), batch {meta['batch']}",
            fontsize=9,
        )
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=8)
    fig.suptitle(f"Per-step time relative to the Optax baseline ({_common.machine_description()})")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    parser = _common.make_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", nargs="+", default=["mlp", "10m"], choices=list(SIZES), help="model sizes"
    )
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=5, help="steps timed per optimizer and round")
    parser.add_argument(
        "--optimizers",
        nargs="+",
        default=list(OPTIMIZERS),
        choices=list(OPTIMIZERS),
        help="which optimizers to time (a ratio needs its baseline)",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.rounds, args.steps = ["tiny"], 3, 2
        args.optimizers = SMOKE_OPTIMIZERS
    out = _common.results_dir(args)
    t0 = time.perf_counter()
    names = list(args.optimizers)

    prepared, metas = {}, {}
    for size in args.sizes:
        _common.phase(
            f"{size}: compiling {len(names)} training steps and optimizer updates",
            quiet=args.no_progress,
        )
        fns, info, metas[size] = prepare(size, names, args.steps, args.seed)
        prepared[size] = (fns, info)
    bar = _common.progress(total=len(args.sizes) * args.rounds, desc=NAME, disable=args.no_progress)
    rows, times = [], {}
    for size, (fns, info) in prepared.items():
        bar.set_postfix_str(size)
        times[size] = time_rounds(fns, args.rounds, args.steps, bar)
        rows += table_rows(size, times[size], info)
    bar.close()

    device = jax.devices()[0]
    config = {
        "device": f"{device.platform}:{device.device_kind}",
        "machine": _common.machine_description(),
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "sizes": metas,
        "jax": jax.__version__,
        "optax": optax.__version__,
    }
    _common.save_json(out / "bench_optax.json", {"meta": config, "rows": rows, "times_s": times})
    _common.save_csv(out / "bench_optax.csv", rows)
    plot(rows, metas, out / "bench_optax.png")

    for size in args.sizes:
        meta = metas[size]
        _common.print_table(
            [r for r in rows if r["size"] == size],
            [
                "optimizer",
                "baseline",
                "ms_per_step",
                "ratio",
                "ratio_min",
                "ratio_q25",
                "ratio_q75",
                "state_arrays",
                "state_bytes_per_param",
                "update_bytes_per_param",
                "update_bytes_ratio",
                "step_bytes_ratio",
            ],
            title=f"{size}: MLP {'-'.join(map(str, meta['mlp']))} ({meta['parameters']:,} "
            f"parameters), batch {meta['batch']}; ms_per_step = median over {args.rounds} "
            f"interleaved rounds x {args.steps} steps; ratio = ms_per_step / baseline's "
            "ms_per_step (ratio_min: of the fastest rounds; q25/q75: of the paired per-round "
            "ratios); state_arrays = parameter-sized arrays per parameter leaf; "
            "update_bytes = XLA cost analysis of the optimizer update alone (step_bytes: of the "
            "whole training step); their ratios = a pure memory-traffic model's prediction",
        )
    summary = summary_rows(rows, metas)
    _common.print_table(summary, ["what", "result", "target"], title="Summary")
    wall = time.perf_counter() - t0
    _common.write_summary(out, NAME, summary, seconds=wall, smoke=args.smoke)
    _common.done(out, wall)
    return rows


def summary_rows(rows, metas):
    """The headline rows of ``summary.json``: ratios and state sizes."""
    by = {(r["size"], r["optimizer"]): r for r in rows}
    out = []
    for size, meta in metas.items():
        setting = (
            f"MLP {'-'.join(map(str, meta['mlp']))} ({meta['parameters'] / 1e6:.2f}M params), "
            f"batch {meta['batch']}"
        )
        names = ("hd_adam", "hd_adam_lagged", "hd_adam_stored", "hd_sgd_momentum", "hd_sgd")
        for name in (*names, "adam_global_sync"):
            r = by.get((size, name))
            if r is None or r["ratio"] == "-":
                continue
            if name == "adam_global_sync":
                out.append(
                    {
                        "what": f"per-step time adam behind one global gradient sum / adam "
                        f"({setting}): the floor of an exact rate rule",
                        "result": f"{r['ratio']:.3f} (IQR {r['ratio_q25']:.3f}.."
                        f"{r['ratio_q75']:.3f})",
                        "target": "-",
                    }
                )
                continue
            out.append(
                {
                    "what": f"per-step time {name} / {r['baseline']} ({setting}; ratio of "
                    "medians over interleaved rounds)",
                    "result": f"{r['ratio']:.3f} (IQR {r['ratio_q25']:.3f}..{r['ratio_q75']:.3f}; "
                    f"memory model: update {r['update_bytes_ratio']:.2f}, step "
                    f"{r['step_bytes_ratio']:.2f}); state "
                    f"{r['state_arrays']:g} arrays = {r['state_bytes_per_param']:g} B/param",
                    "target": "<= 1.05",
                }
            )
    return out


if __name__ == "__main__":
    main()
