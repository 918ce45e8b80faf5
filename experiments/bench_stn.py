"""Benchmark: wall time per epoch of a Self-Tuning Network vs the same plain network.

An epoch is ``--batches`` minibatches of ``--batch-size`` (default 40 x 128). The STN epoch runs
them as ``batches / 5`` cycles of ``Trainer.step`` (5 train steps at per-example perturbed
hyperparameters + 1 hyper step each, i.e. 20% extra validation steps); the plain epoch runs the
same train steps on the same MLP built from ``nnx.Linear``, with the same dropout and input noise
at fixed rates. Both are one jitted ``lax.scan`` per epoch, compiled beforehand, timed
interleaved; the ratio of medians is printed. PRNG keys are JAX's default (threefry), as in
user code. A per-example best-response layer does two matmuls (``W_e`` and ``W_r``) where a plain
layer does one, so about 2x is expected; target <= 2.2x. On a shared CPU the ratio moves by about
0.1 from run to run.

    python -m experiments.bench_stn               # MLP 64-256-256-10
    python -m experiments.bench_stn --model cnn   # the stn_mnist_cnn network
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


def _models(kind, width, response_rank=None):
    """``(make_stn, make_plain, input_shape, space, losses, plain_loss)`` for ``--model``."""
    if kind == "mlp":
        sizes = (64, width, width, 10)
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


def main(argv=None):
    wall = time.perf_counter()
    parser = _common.make_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp", help="network")
    parser.add_argument("--width", type=int, default=256, help="hidden units (mlp) / channels")
    parser.add_argument("--batch-size", type=int, default=128, help="examples per train step")
    parser.add_argument("--batches", type=int, default=40, help="train steps per epoch")
    parser.add_argument("--reps", type=int, default=15, help="timed epochs of each network")
    parser.add_argument(
        "--response-rank",
        type=int,
        default=None,
        help="low-rank response kernels W_r = P Q of this rank (mlp only; default: full)",
    )
    args = parser.parse_args(argv)
    if args.response_rank is not None and args.model != "mlp":
        parser.error("--response-rank applies to --model mlp only")
    if args.smoke:
        args.width, args.batches, args.reps = 32, 5, 3
    if args.batches % 5:
        parser.error("--batches must be a multiple of 5 (train steps per STN cycle)")
    out = _common.results_dir(args)
    quiet = args.no_progress
    make_stn, make_plain, shape, space, losses, plain_loss = _models(
        args.model, args.width, args.response_rank
    )

    n = args.batches * args.batch_size
    rs = np.random.RandomState(args.seed)
    x = jnp.asarray(rs.rand(n, *shape), jnp.float32)
    y = jnp.asarray(rs.randint(0, 10, n), jnp.int32)
    val = (x[: 4 * args.batch_size], y[: 4 * args.batch_size])

    # --- STN: Trainer.fit, one chunk = one epoch.
    trainer = stn.Trainer(
        make_stn(nnx.Rngs(jax.random.key(args.seed))),
        *losses,
        space=space,
        inner_optimizer=optax.adam(1e-3),
        outer_optimizer=optax.adam(3e-3),
        inner_steps=5,
    )
    cycles = args.batches // 5
    state = trainer.init(key=jax.random.key(args.seed))

    def stn_epoch(state):
        state, _ = trainer.fit(
            state,
            (x, y),
            val,
            steps=cycles,
            batch_size=args.batch_size,
            chunk=cycles,
            progress=False,
        )
        return jax.block_until_ready(state)

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

    plain = (params, tx.init(params), jax.random.key(args.seed), jnp.int32(0))

    def plain_epoch(carry):
        return jax.block_until_ready(plain_epoch_fn(carry))

    _common.phase(f"compiling the STN and the plain {args.model} epochs", quiet=quiet)
    state = stn_epoch(state)
    plain = plain_epoch(plain)
    t_stn, t_plain = [], []
    for _ in _common.progress(range(args.reps), desc=NAME, unit="rep", disable=quiet):
        t0 = time.perf_counter()
        state = stn_epoch(state)
        t_stn.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        plain = plain_epoch(plain)
        t_plain.append(time.perf_counter() - t0)
    med_stn, med_plain = statistics.median(t_stn), statistics.median(t_plain)
    ratio = med_stn / med_plain
    record = {
        "model": args.model,
        "width": args.width,
        "batch_size": args.batch_size,
        "batches_per_epoch": args.batches,
        "stn_epoch_seconds": t_stn,
        "plain_epoch_seconds": t_plain,
        "stn_median": med_stn,
        "plain_median": med_plain,
        "ratio": ratio,
        "target": TARGET,
        "device": str(jax.devices()[0]),
    }
    _common.save_json(out / f"{NAME}.json", record)
    setup = f"{args.model} (width {args.width}), epoch of {args.batches} x {args.batch_size}"
    rows = [
        {
            "model": setup,
            "plain_ms_per_epoch": 1e3 * med_plain,
            "stn_ms_per_epoch": 1e3 * med_stn,
            "ratio": ratio,
            "target": f"<= {TARGET:g}",
        }
    ]
    _common.save_csv(out / f"{NAME}.csv", rows)
    plot(out / f"{NAME}.png", t_plain, t_stn, args.model, setup)
    _common.print_table(rows, title="wall time per epoch (median of interleaved runs)")
    print(f"STN / plain ratio: {ratio:.2f}x (target <= {TARGET:g}x)")
    summary = [
        {
            "what": f"STN epoch / plain epoch, {setup}",
            "result": f"{ratio:.2f}x ({1e3 * med_stn:.0f} ms / {1e3 * med_plain:.0f} ms)",
            "target": f"<= {TARGET:g}x",
        }
    ]
    wall = time.perf_counter() - wall
    _common.write_summary(out, NAME, summary, seconds=wall, smoke=args.smoke)
    _common.done(out, wall)
    return record


def plot(path, t_plain, t_stn, model, setup) -> None:
    """Per-epoch wall times of both networks, with the target line at 2.2x the plain median."""
    plt = _common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ms_plain, ms_stn = np.array(t_plain) * 1e3, np.array(t_stn) * 1e3
    box = ax.boxplot(
        [ms_plain, ms_stn],
        widths=0.5,
        patch_artist=True,
        showfliers=False,  # every epoch is drawn as a dot
        medianprops=dict(color="k", lw=2),
    )
    for patch, name in zip(box["boxes"], ("baseline", "stn"), strict=True):
        patch.set(facecolor=_common.color(name), alpha=0.5)
    for k, ms in enumerate((ms_plain, ms_stn), start=1):
        ax.plot(np.full(len(ms), k) + np.linspace(-0.1, 0.1, len(ms)), ms, "k.", ms=3)
    target = TARGET * float(np.median(ms_plain))
    ax.axhline(target, color=_common.color("oracle"), ls="--", label=f"target: {TARGET:g}x plain")
    ax.set_xticks([1, 2], ["plain network", "STN"])
    ax.plot([], [], "k.", label="one timed epoch (box: quartiles, bar: median)")
    ratio = float(np.median(ms_stn) / np.median(ms_plain))
    ax.set(
        ylabel="wall time per epoch (ms)",
        ylim=(0, 1.15 * max(ms_stn.max(), target)),
        title=f"STN / plain = {ratio:.2f}x ({model})\n{setup}",
    )
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False, fontsize=9)
    _common.save_figure(fig, path, dpi=120)


if __name__ == "__main__":
    main()
