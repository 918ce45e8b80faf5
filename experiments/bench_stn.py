"""Benchmark: wall time per epoch of a Self-Tuning Network vs the same plain network.

An epoch is ``--batches`` minibatches of ``--batch-size`` (default 40 x 128). The STN epoch runs
them as ``batches / 5`` cycles of ``Trainer.step`` (5 train steps at per-example perturbed
hyperparameters + 1 hyper step each, i.e. 20% extra validation steps); the plain epoch runs the
same train steps on the same MLP built from ``nnx.Linear``, with the same dropout and input noise
at fixed rates. Every epoch is one jitted ``lax.scan``, compiled beforehand, timed interleaved
(the order rotates from round to round); the ratio of medians is printed. PRNG keys are JAX's
default (threefry), as in user code.

Where the time goes: for every response kernel in ``--ranks`` (the full ``W_r``, and a rank-8
``W_r = P Q`` by default) three programs are timed: ``Trainer.fit`` (one chunk per epoch, what a
user runs), the same cycles as one jitted scan of ``sample_batches`` + ``step`` (no host loop), and
the cycles' train steps alone. Their differences split the STN epoch, in plain epochs, into the
perturbed train steps, the hyper steps and ``fit``'s host loop (table, stacked-bar plot).
A fourth program is ``Trainer.fit`` with ``sampler=bilevel.epoch_minibatches``: the default
sampler (``bilevel.minibatches``) shuffles the whole training set once per cycle (a sort, eight
per epoch here) where the plain loop shuffles it once per epoch; in epoch order no cycle sorts.
A per-example full response layer does two matmuls (``W_e`` and ``W_r``) where a plain layer does
one, so about 2x is expected (target <= 2.2x); rank 8 replaces the second by ``r (in + out)``
multiply-adds (target <= 1.5x). On a shared CPU the ratios move by about 0.1 from run to run.

    python -m experiments.bench_stn               # MLP 64-256-256-10, full and rank-8 responses
    python -m experiments.bench_stn --ranks full  # the full response only
    python -m experiments.bench_stn --model cnn   # the stn_mnist_cnn network (full response)
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import bilevel
from bilevel import stn
from experiments import _common

NAME = "bench_stn"
TARGET = 2.2  # STN epoch / plain epoch
TARGET_LOW_RANK = 1.5  # with low-rank responses


def _mlp_sizes(width, smoke=False):
    """The MLP's layer sizes: 64-width-width-10; under ``--smoke`` one hidden layer (each program
    compiles about a fifth faster)."""
    return (64, width, 10) if smoke else (64, width, width, 10)


def _models(kind, width, response_rank=None, smoke=False):
    """``(make_stn, make_plain, input_shape, space, losses, plain_loss)`` for ``--model``."""
    if kind == "mlp":
        sizes = _mlp_sizes(width, smoke)
        return (
            (lambda rngs: _common.StnMlp(sizes, 3, response_rank=response_rank, rngs=rngs)),
            (lambda rngs: _common.PlainMlp(sizes, rngs=rngs)),
            (64,),
            _common.digits_space(),
            _common.digits_losses(),
            _common.digits_plain_loss,
        )
    return (
        (lambda rngs: _common.StnCnn(4, width=width, rngs=rngs)),
        (lambda rngs: _common.PlainCnn(width=width, rngs=rngs)),
        (28, 28, 1),
        _common.cnn_space(),
        _common.cnn_losses(),
        _common.cnn_plain_loss,
    )


def _stn_programs(trainer, data, val, batch_size, cycles, seed):
    """Three timed epochs of one trainer, each a callable that advances its own state.

    ``fit``: ``Trainer.fit`` with one chunk per epoch (what a user runs); ``scan``: the same
    cycles of ``sample_batches`` + ``step`` as one jitted ``lax.scan`` (no host loop);
    ``inner``: only the cycles' train steps (``Trainer.warmup``, no hyper step). The
    differences attribute the epoch: train steps, hyper steps, the host side of ``fit``.
    """

    def inner_only(state):  # Trainer.warmup: the cycle's train steps, no hyper step
        inner_batches, _ = trainer.sample_batches(state, data, val, batch_size)
        return trainer.warmup(state, inner_batches)[0]

    def full_cycle(state):
        return trainer.step(state, *trainer.sample_batches(state, data, val, batch_size))[0]

    def scanned(cycle):
        @jax.jit
        def epoch(state):
            return jax.lax.scan(lambda s, _: (cycle(s), None), state, None, length=cycles)[0]

        return epoch

    def fit_epoch(state):
        return trainer.fit(
            state, data, val, steps=cycles, batch_size=batch_size, chunk=cycles, progress=False
        )[0]

    programs = {}
    for part, fn in (
        ("fit", fit_epoch),
        ("scan", scanned(full_cycle)),
        ("inner", scanned(inner_only)),
    ):
        box = [trainer.init(key=jax.random.key(seed))]

        def run(fn=fn, box=box):
            box[0] = jax.block_until_ready(fn(box[0]))

        programs[part] = run
    return programs


def _layer_profile(args, ranks, x, y):
    """The gradient of the network alone (no regularizer, no optimizer), batch ``--batch-size``:
    plain, and per response kernel the STN network with one ``hnet`` shared by the batch and
    with a ``hnet`` per example. Rows: milliseconds per gradient and the ratio to plain
    (medians over interleaved rounds)."""
    xb, yb = x[: args.batch_size], y[: args.batch_size]
    hnet = jax.random.normal(jax.random.key(args.seed), (args.batch_size, 3), jnp.float32)
    sizes = _mlp_sizes(args.width, args.smoke)

    def gradient(graphdef, params, *call):
        loss = lambda p: _common.xent(nnx.merge(graphdef, p)(xb, *call), yb)
        return jax.jit(lambda p: jax.grad(loss)(p)), params

    fns = {"plain network": gradient(*nnx.split(_common.PlainMlp(sizes, rngs=nnx.Rngs(0))))}
    for rank in ranks:
        label = "full" if rank is None else f"rank {rank}"
        model = _common.StnMlp(sizes, 3, response_rank=rank, rngs=nnx.Rngs(0))
        fns[f"STN {label}, shared hnet"] = gradient(*nnx.split(model), hnet[0])
        fns[f"STN {label}, per-example hnet"] = gradient(*nnx.split(model), hnet)
    for f, p in fns.values():
        jax.block_until_ready(f(p))
    times = {name: [] for name in fns}
    for _ in range(args.reps):  # announced by a phase line: the script's one bar is done
        for name, (f, p) in fns.items():
            t0 = time.perf_counter()
            for _ in range(10):
                out = f(p)
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - t0) / 10)
    plain = statistics.median(times["plain network"])
    return [
        {
            "gradient of": name,
            "ms": 1e3 * statistics.median(t),
            "x_plain": statistics.median(t) / plain,
        }
        for name, t in times.items()
    ]


def main(argv=None):
    wall = time.perf_counter()
    parser = _common.make_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp", help="network")
    parser.add_argument("--width", type=int, default=256, help="hidden units (mlp) / channels")
    parser.add_argument("--batch-size", type=int, default=128, help="examples per train step")
    parser.add_argument("--batches", type=int, default=40, help="train steps per epoch")
    parser.add_argument("--reps", type=int, default=15, help="timed epochs of each program")
    parser.add_argument(
        "--ranks",
        default=None,
        help="comma-separated response kernels to time: full, or a rank r (W_r = P Q; mlp only)"
        " (default: full,8 for mlp, full for cnn)",
    )
    parser.add_argument(
        "--layers",
        action="store_true",
        help="also profile the network's gradient alone: plain vs STN with a shared and with a "
        "per-example hnet (mlp only)",
    )
    args = parser.parse_args(argv)
    if args.layers and args.model != "mlp":
        parser.error("--layers applies to --model mlp only")
    if args.ranks is None:
        args.ranks = "full,8" if args.model == "mlp" else "full"
    ranks = []
    for item in (t.strip() for t in args.ranks.split(",") if t.strip()):
        if item == "full":
            ranks.append(None)
        elif item.isdigit() and int(item) > 0:
            ranks.append(int(item))
        else:
            parser.error(f"--ranks: {item!r} is neither 'full' nor a positive integer")
    if not ranks:
        parser.error("--ranks names no response kernel")
    if args.model != "mlp" and any(r is not None for r in ranks):
        parser.error("--ranks: low-rank responses apply to --model mlp only (use --ranks full)")
    if args.smoke:  # one response kernel (its programs and the plain one), one hidden layer
        args.width, args.batches, args.reps, ranks = 32, 5, 3, ranks[:1]
    if args.batches % 5:
        parser.error("--batches must be a multiple of 5 (train steps per STN cycle)")
    out = _common.results_dir(args)
    quiet = args.no_progress

    n = args.batches * args.batch_size
    rs = np.random.RandomState(args.seed)
    shape = (64,) if args.model == "mlp" else (28, 28, 1)
    x = jnp.asarray(rs.rand(n, *shape), jnp.float32)
    y = jnp.asarray(rs.randint(0, 10, n), jnp.int32)
    val = (x[: 4 * args.batch_size], y[: 4 * args.batch_size])
    cycles = args.batches // 5

    # --- STN programs, one set per response kernel: Trainer.fit, one chunk = one epoch.
    programs = {}
    labels = {}
    for rank in ranks:
        make_stn, make_plain, _, space, losses, plain_loss = _models(
            args.model, args.width, rank, args.smoke
        )

        def make_trainer(sampler, make_stn=make_stn, space=space, losses=losses):
            return stn.Trainer(
                make_stn(nnx.Rngs(jax.random.key(args.seed))),
                *losses,
                space=space,
                inner_optimizer=optax.adam(1e-3),
                outer_optimizer=optax.adam(3e-3),
                inner_steps=5,
                sampler=sampler,
            )

        trainer = make_trainer(bilevel.minibatches)
        label = "full" if rank is None else f"rank {rank}"
        labels[label] = rank
        for part, run in _stn_programs(
            trainer, (x, y), val, args.batch_size, cycles, args.seed
        ).items():
            programs[(label, part)] = run
        # the same trainer drawing its batches in epoch order (no per-cycle shuffle)
        epoch_trainer = make_trainer(bilevel.epoch_minibatches)
        epoch_fit = _stn_programs(epoch_trainer, (x, y), val, args.batch_size, cycles, args.seed)
        programs[(label, "fit_epoch")] = epoch_fit["fit"]

    # --- plain network, same regularizers at fixed rates.
    graphdef, params = nnx.split(make_plain(nnx.Rngs(jax.random.key(args.seed))))
    tx = optax.adam(1e-3)
    # The STN's initial values, fixed.
    rates = {
        k: float(v)
        for k, v in bilevel.hparams.constrain(space, bilevel.hparams.init(space)).items()
    }

    def loss_fn(p, batch, key):
        xb, yb = batch
        return plain_loss(nnx.merge(graphdef, p), rates, xb, yb, key)

    @jax.jit
    def plain_epoch_fn(carry):
        p, s, key, step = carry
        batches = bilevel.minibatches((x, y), key, step, args.batch_size, args.batches)

        def body(c, xs):
            p, s = c
            batch, i = xs
            g = jax.grad(loss_fn)(p, batch, jax.random.fold_in(jax.random.fold_in(key, step), i))
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (p, s), _ = jax.lax.scan(body, (p, s), (batches, jnp.arange(args.batches)))
        return p, s, key, step + 1

    plain_box = [(params, tx.init(params), jax.random.key(args.seed), jnp.int32(0))]

    def plain_epoch():
        plain_box[0] = jax.block_until_ready(plain_epoch_fn(plain_box[0]))

    programs[("plain", "plain")] = plain_epoch
    names = list(programs)
    _common.phase(f"compiling {len(names)} {args.model} epoch programs", quiet=quiet)
    for name in names:
        programs[name]()
    times = {name: [] for name in names}
    for rep in _common.progress(range(args.reps), desc=NAME, unit="rep", disable=quiet):
        k = rep % len(names)  # rotate the order so that load changes hit every program alike
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            programs[name]()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    plain = med[("plain", "plain")]
    setup = f"{args.model} (width {args.width}), epoch of {args.batches} x {args.batch_size}"
    variants, rows = {}, []
    for label in labels:
        fit_t, scan_t, inner_t = (med[(label, p)] for p in ("fit", "scan", "inner"))
        epoch_t = med[(label, "fit_epoch")]
        v = {
            "epoch_order_seconds": times[(label, "fit_epoch")],
            "epoch_order_median": epoch_t,
            "epoch_order_ratio": epoch_t / plain,  # sampler=bilevel.epoch_minibatches
            "sampling": (fit_t - epoch_t) / plain,  # the per-cycle shuffle of the default
            "epoch_seconds": times[(label, "fit")],
            "median": fit_t,
            "ratio": fit_t / plain,
            "train_steps": inner_t / plain,  # the five perturbed train steps of each cycle
            "hyper_steps": (scan_t - inner_t) / plain,  # the hyper step of each cycle
            "fit_host": (fit_t - scan_t) / plain,  # Trainer.fit's host loop and history
            "scan_ratio": scan_t / plain,
            "target": TARGET if labels[label] is None else TARGET_LOW_RANK,
        }
        variants[label] = v
        rows.append(
            {
                "response": label,
                "ms_per_epoch": 1e3 * fit_t,
                "x_plain": v["ratio"],
                "train_steps_x": v["train_steps"],
                "hyper_steps_x": v["hyper_steps"],
                "fit_host_x": v["fit_host"],
                "epoch_order_x": v["epoch_order_ratio"],
                "target": f"<= {v['target']:g}",
            }
        )
    rows.append(
        {
            "response": "plain network",
            "ms_per_epoch": 1e3 * plain,
            "x_plain": 1.0,
            "train_steps_x": 1.0,
            "hyper_steps_x": 0.0,
            "fit_host_x": 0.0,
            "epoch_order_x": 1.0,
            "target": "-",
        }
    )
    first = variants[next(iter(labels))]
    record = {
        "model": args.model,
        "width": args.width,
        "batch_size": args.batch_size,
        "batches_per_epoch": args.batches,
        "stn_epoch_seconds": first["epoch_seconds"],
        "plain_epoch_seconds": times[("plain", "plain")],
        "stn_median": first["median"],
        "plain_median": plain,
        "ratio": first["ratio"],
        "target": TARGET,
        "variants": variants,
        "program_seconds": {" ".join(k): v for k, v in times.items()},
        "device": str(jax.devices()[0]),
    }
    if args.layers:
        _common.phase("profiling the network's gradient alone (--layers)", quiet=quiet)
        record["layer_profile"] = _layer_profile(args, ranks, x, y)
    _common.save_json(out / f"{NAME}.json", record)
    _common.save_csv(out / f"{NAME}.csv", rows)
    plot(out / f"{NAME}.png", variants, plain, args.model, setup)
    _common.print_table(
        rows,
        title=(
            "wall time per epoch (median of interleaved runs) and where it goes, in plain epochs: "
            "train steps (5 per cycle, perturbed), hyper steps (1 per cycle), Trainer.fit's host "
            "loop"
        ),
    )
    if args.layers:
        _common.print_table(
            record["layer_profile"],
            title=f"gradient of the network alone, batch {args.batch_size} (median of "
            "interleaved rounds of 10 calls): where the STN layers' time goes",
        )
    summary = []
    for label, v in variants.items():
        what = "STN epoch / plain epoch" + ("" if labels[label] is None else f", {label} responses")
        summary.append(
            {
                "what": f"{what}, {setup}",
                "result": (
                    f"{v['ratio']:.2f}x ({1e3 * v['median']:.0f} ms / {1e3 * plain:.0f} ms): "
                    f"train steps {v['train_steps']:.2f}x + hyper steps {v['hyper_steps']:.2f}x "
                    f"+ fit loop {v['fit_host']:.2f}x"
                ),
                "target": f"<= {v['target']:g}x",
            }
        )
        summary.append(
            {
                "what": f"{what}, batches in epoch order (sampler=bilevel.epoch_minibatches), "
                f"{setup}",
                "result": (
                    f"{v['epoch_order_ratio']:.2f}x ({1e3 * v['epoch_order_median']:.0f} ms / "
                    f"{1e3 * plain:.0f} ms): the default's per-cycle shuffle costs "
                    f"{v['sampling']:.2f}x"
                ),
                "target": f"<= {v['target']:g}x",
            }
        )
        print(
            f"STN ({label}) / plain ratio: {v['ratio']:.2f}x, in epoch order "
            f"{v['epoch_order_ratio']:.2f}x (target <= {v['target']:g}x)"
        )
    wall = time.perf_counter() - wall
    _common.write_summary(out, NAME, summary, seconds=wall, smoke=args.smoke)
    _common.done(out, wall)
    return record


def plot(path, variants, plain, model, setup) -> None:
    """Stacked bars: each STN epoch in plain epochs (train steps, hyper steps, fit loop), targets, and the
    epoch with batches in epoch order."""
    plt = _common.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    labels = ["plain network", *[f"STN, {k} response" for k in variants]]
    xs = np.arange(len(labels))
    ax.bar(xs[0], 1.0, color=_common.color("baseline"), alpha=0.7, label="plain epoch (1x)")
    parts = (
        ("train_steps", "train steps (5 per cycle, perturbed)", "tab:red"),
        ("hyper_steps", "hyper steps (1 per cycle)", "tab:orange"),
        ("fit_host", "Trainer.fit host loop", "tab:purple"),
    )
    bottom = np.zeros(len(variants))
    for key, text, c in parts:
        heights = np.array([max(v[key], 0.0) for v in variants.values()])
        ax.bar(xs[1:], heights, bottom=bottom, color=c, alpha=0.8, label=text)
        bottom += heights
    for x, v in zip(xs[1:], variants.values(), strict=True):
        ax.text(x, bottom[x - 1] + 0.03, f"{v['ratio']:.2f}x", ha="center", va="bottom")
    ax.scatter(
        xs[1:],
        [v["epoch_order_ratio"] for v in variants.values()],
        marker="_",
        s=900,
        color="k",
        zorder=3,
        label="whole epoch, batches in epoch order (epoch_minibatches)",
    )
    for x, v in zip(xs[1:], variants.values(), strict=True):
        ax.text(
            x + 0.3,
            v["epoch_order_ratio"],
            f"{v['epoch_order_ratio']:.2f}x",
            va="center",
            fontsize=8,
        )
    for target, ls in sorted({(v["target"], "--") for v in variants.values()}):
        ax.axhline(target, color="k", ls=ls, lw=1)
        ax.text(xs[0] - 0.4, target, f"target {target:g}x", va="bottom", ha="left", fontsize=8)
    ax.set_xticks(xs, labels, fontsize=9)
    ax.set(
        ylabel="wall time per epoch (plain epochs)",
        ylim=(0, 1.6 * max(bottom.max(), max(v["target"] for v in variants.values()))),
        title=f"Self-Tuning Network epoch vs plain ({model}; plain {1e3 * plain:.0f} ms)\n{setup}",
    )
    ax.legend(loc="upper left", frameon=False, fontsize=8)
    _common.save_figure(fig, path, dpi=120)


if __name__ == "__main__":
    main()
