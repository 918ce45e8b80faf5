"""STN on scikit-learn digits: tune input/hidden dropout and input noise online, vs fixed and random.

Data: ``load_digits`` (pixels / 16), 1000 train / 400 validation / 397 test. Network: MLP
64-256-256-10 of ``bilevel.stn.StnLinear`` (ReLU), trained with Adam for ``--epochs`` epochs of
batch 128 (7 batches per epoch). Hyperparameters: input dropout, hidden dropout (init 0.05) and the
standard deviation of Gaussian input noise (init 0.05), tuned by a Self-Tuning Network (5 train
steps, 1 hyper step per cycle). Baselines on the same plain MLP (``nnx.Linear``) and schedule:
fixed dropout 0 / 0.2 / 0.5 (no noise), and a random search whose number of trials matches the
STN run's wall time. Reported: the validation cross-entropy at the end and the best one seen
during training (evaluated every few epochs), test accuracy, the final hyperparameters.

    python -m experiments.stn_digits              # a few minutes on a laptop CPU
    python -m experiments.stn_digits --smoke
"""

from __future__ import annotations

import itertools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from bilevel import hparams, stn
from experiments import _common

NAMES = ("drop_in", "drop_hidden", "noise")


class StnMlp(nnx.Module):
    """MLP of best-response layers with per-example input/hidden dropout."""

    def __init__(self, sizes, num_hparams, *, rngs):
        self.layers = nnx.List(
            [stn.StnLinear(a, b, num_hparams, rngs=rngs) for a, b in itertools.pairwise(sizes)]
        )

    def __call__(self, x, hnet, drop_in=None, drop_hidden=None, key=None):
        if drop_in is not None:
            x = stn.dropout(x, drop_in, jax.random.fold_in(key, 0))
        for i, layer in enumerate(self.layers):
            x = layer(x, hnet)
            if i < len(self.layers) - 1:
                x = jax.nn.relu(x)
                if drop_hidden is not None:
                    x = stn.dropout(x, drop_hidden, jax.random.fold_in(key, i + 1))
        return x


class PlainMlp(nnx.Module):
    """The same MLP with ``nnx.Linear`` layers (baselines and benchmark)."""

    def __init__(self, sizes, *, rngs):
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(sizes)])

    def __call__(self, x, drop_in=None, drop_hidden=None, key=None):
        if drop_in is not None:
            x = stn.dropout(x, drop_in, jax.random.fold_in(key, 0))
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = jax.nn.relu(x)
                if drop_hidden is not None:
                    x = stn.dropout(x, drop_hidden, jax.random.fold_in(key, i + 1))
        return x


def xent(logits, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def accuracy(logits, y):
    return jnp.mean(jnp.argmax(logits, -1) == y)


def space(init_dropout=0.05, init_noise=0.05):
    """Input dropout, hidden dropout (in (0, 0.95)) and input-noise std (log scale, <= 2)."""
    return {
        "drop_in": hparams.unit(init_dropout, 0.0, 0.95),
        "drop_hidden": hparams.unit(init_dropout, 0.0, 0.95),
        "noise": hparams.log(init_noise, upper=2.0),
    }


def stn_losses():
    """``(train_loss, val_loss)`` for a model called as ``m(x, hnet, drop_in, drop_hidden, key)``."""

    def train_loss(m, h, batch, key):
        x, y = batch
        x = stn.gaussian_noise(x, h["noise"], jax.random.fold_in(key, 1000))
        logits = h.apply(m, x, drop_in=h["drop_in"], drop_hidden=h["drop_hidden"], key=key)
        return xent(logits, y)

    def val_loss(m, h, batch):
        x, y = batch
        return xent(m(x, h.hnet), y)

    return train_loss, val_loss


def train_stn(
    make_model,
    data,
    *,
    epochs,
    batch_size,
    seed,
    lr=1e-3,
    hyper_lr=3e-3,
    train_steps=5,
    warmup_epochs=5,
    init_scale=0.5,
    entropy_weight=1e-3,
    variant="stn",
    space_=None,
    losses=None,
    eval_every=5,
    desc="STN",
    show_progress=True,
    input_shape=None,
):
    """Train an STN; returns a dict with the final/best validation loss, test accuracy, schedule."""
    space_ = space() if space_ is None else space_
    reshape = (lambda a: a) if input_shape is None else (lambda a: a.reshape(-1, *input_shape))
    train = (jnp.asarray(reshape(data.x_train)), jnp.asarray(data.y_train))
    val = (jnp.asarray(reshape(data.x_val)), jnp.asarray(data.y_val))
    test = (jnp.asarray(reshape(data.x_test)), jnp.asarray(data.y_test))
    model = make_model(nnx.Rngs(seed))
    train_loss, val_loss = stn_losses() if losses is None else losses
    trainer = stn.Trainer(
        model,
        space_,
        train_loss,
        val_loss,
        optimizer=optax.adam(lr),
        hyper_optimizer=optax.adam(hyper_lr),
        train_steps=train_steps,
        val_steps=1,
        init_scale=init_scale,
        entropy_weight=entropy_weight,
        variant=variant,
    )
    per_epoch = train[0].shape[0] // batch_size
    cycles_per_block = max(1, round(eval_every * per_epoch / train_steps))
    blocks = max(1, math.ceil(epochs * per_epoch / train_steps / cycles_per_block))
    warmup = round(warmup_epochs * per_epoch / train_steps)

    @jax.jit
    def evaluate(state, x, y):
        m = trainer.model(state)
        logits = m(x, trainer.hnet(state))
        return xent(logits, y), accuracy(logits, y)

    state = trainer.init(jax.random.key(seed))
    # Compile the chunked loops and the evaluation before timing (results discarded).
    fit = lambda state, cycles, warm: trainer.fit(
        state,
        train,
        val,
        cycles=cycles,
        warmup_cycles=warm,
        batch_size=batch_size,
        chunk=cycles_per_block,
    )
    fit(state, cycles_per_block, warmup)
    evaluate(state, *val)
    bar = _common.progress(total=blocks, desc=desc, disable=not show_progress)
    curve, histories = [], []
    t0 = time.perf_counter()
    state, _ = fit(state, 0, warmup)
    for b in range(blocks):
        state, hist = trainer.fit(
            state,
            train,
            val,
            cycles=cycles_per_block,
            batch_size=batch_size,
            chunk=cycles_per_block,
        )
        histories.append(hist)
        vl, _ = evaluate(state, *val)
        epoch = (warmup + (b + 1) * cycles_per_block) * train_steps / per_epoch
        curve.append({"epoch": epoch, "val_loss": float(vl)})
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - t0
    history = {k: np.concatenate([h[k] for h in histories]) for k in histories[0]}
    val_ce, val_acc = evaluate(state, *val)
    test_ce, test_acc = evaluate(state, *test)
    values = {k: float(v) for k, v in trainer.hparams(state).items()}
    return {
        "val_loss": float(val_ce),
        "best_val_loss": min(c["val_loss"] for c in curve),
        "val_acc": float(val_acc),
        "test_loss": float(test_ce),
        "test_accuracy": float(test_acc),
        "hparams": values,
        "scales": {k: float(v) for k, v in trainer.scales(state).items()},
        "curve": curve,
        "schedule": {
            "epoch": (warmup + np.arange(1, len(history["step"]) + 1)) * train_steps / per_epoch,
            **{k: history[f"hparams/{k}"] for k in space_},
        },
        "train_skipped": int(state.train_skipped),
        "val_skipped": int(state.val_skipped),
        "seconds": seconds,
    }


def train_fixed(
    make_model,
    configs,
    data,
    *,
    epochs,
    batch_size,
    seed,
    lr=1e-3,
    eval_every=5,
    input_shape=None,
    plain_loss=None,
):
    """Train the plain network once per fixed configuration (vmapped); returns per-config results.

    ``configs`` maps each hyperparameter name to an array of shape ``(K,)``; by default the names
    are ``drop_in, drop_hidden, noise``, otherwise ``plain_loss(model, cfg, x, y, key)`` uses them.
    """
    reshape = (lambda a: a) if input_shape is None else (lambda a: a.reshape(-1, *input_shape))
    x_tr, y_tr = jnp.asarray(reshape(data.x_train)), jnp.asarray(data.y_train)
    val = (jnp.asarray(reshape(data.x_val)), jnp.asarray(data.y_val))
    test = (jnp.asarray(reshape(data.x_test)), jnp.asarray(data.y_test))
    graphdef, params0 = nnx.split(make_model(nnx.Rngs(seed)))
    tx = optax.adam(lr)
    n = x_tr.shape[0]
    per_epoch = n // batch_size
    blocks = max(1, math.ceil(epochs / eval_every))

    def loss_fn(params, cfg, x, y, key):
        m = nnx.merge(graphdef, params)
        if plain_loss is not None:
            return plain_loss(m, cfg, x, y, key)
        x = stn.gaussian_noise(x, cfg["noise"], jax.random.fold_in(key, 1000))
        return xent(m(x, cfg["drop_in"], cfg["drop_hidden"], key), y)

    def run_block(params, opt_state, cfg, key, block):
        def epoch(carry, e):
            params, opt_state = carry
            k = jax.random.fold_in(key, block * eval_every + e)
            idx = jax.random.permutation(k, n)[: per_epoch * batch_size].reshape(per_epoch, -1)

            def step(carry, xs):
                params, opt_state = carry
                i, j = xs
                g = jax.grad(loss_fn)(params, cfg, x_tr[i], y_tr[i], jax.random.fold_in(k, j))
                updates, opt_state = tx.update(g, opt_state, params)
                return (optax.apply_updates(params, updates), opt_state), None

            carry, _ = jax.lax.scan(step, (params, opt_state), (idx, jnp.arange(per_epoch)))
            return carry, None

        (params, opt_state), _ = jax.lax.scan(epoch, (params, opt_state), jnp.arange(eval_every))
        m = nnx.merge(graphdef, params)
        return params, opt_state, xent(m(val[0]), val[1])

    k_configs = len(next(iter(configs.values())))
    keys = jax.random.split(jax.random.key(seed + 1), k_configs)
    params = jax.tree.map(lambda a: jnp.broadcast_to(a, (k_configs, *a.shape)), params0)
    opt_state = jax.vmap(tx.init)(params)
    cfg = {k: jnp.asarray(v, jnp.float32) for k, v in configs.items()}
    block_fn = jax.jit(jax.vmap(run_block, in_axes=(0, 0, 0, 0, None)))
    block_fn.lower(params, opt_state, cfg, keys, 0).compile()
    t0 = time.perf_counter()
    curves = []
    for b in range(blocks):
        params, opt_state, vl = block_fn(params, opt_state, cfg, keys, b)
        curves.append(np.asarray(vl))
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0

    @jax.vmap
    def evaluate(p):
        m = nnx.merge(graphdef, p)
        lv, lt = m(val[0]), m(test[0])
        return xent(lv, val[1]), xent(lt, test[1]), accuracy(lt, test[1])

    val_ce, test_ce, test_acc = jax.jit(evaluate)(params)
    curves = np.stack(curves, 1)  # (K, blocks)
    return [
        {
            "val_loss": float(val_ce[i]),
            "best_val_loss": float(curves[i].min()),
            "test_loss": float(test_ce[i]),
            "test_accuracy": float(test_acc[i]),
            "hparams": {k: float(v[i]) for k, v in configs.items()},
            "curve": curves[i],
        }
        for i in range(k_configs)
    ], seconds


def random_configs(rs, k):
    """Random-search draws: dropout rates uniform in [0, 0.8], noise log-uniform in [1e-3, 1]."""
    return {
        "drop_in": rs.uniform(0.0, 0.8, k),
        "drop_hidden": rs.uniform(0.0, 0.8, k),
        "noise": np.exp(rs.uniform(np.log(1e-3), 0.0, k)),
    }


def _fmt(h):
    return " ".join(f"{k}={v:.3g}" for k, v in h.items())


def plot_schedule(path, result, title, names=NAMES):
    plt = _common.pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    sched = result["schedule"]
    for k in names:
        ax[0].plot(sched["epoch"], sched[k], label=k)
    ax[0].set(xlabel="epoch", ylabel="value", title=f"{title}: hyperparameter schedule")
    ax[0].legend()
    ax[1].plot([c["epoch"] for c in result["curve"]], [c["val_loss"] for c in result["curve"]])
    ax[1].set(xlabel="epoch", ylabel="validation cross-entropy", title="validation loss")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def quickstart_section(smoke: bool, seed: int, out, show_progress: bool) -> list[dict]:
    """A short STN run on digits for the quickstart: rows with losses/accuracy and a schedule plot.

    Saves ``stn_digits_schedule.png`` under ``out``.
    """
    data = _common.load_digits(seed=seed)
    sizes = (64, 256, 256, 10)
    epochs = 6 if smoke else 60
    result = train_stn(
        lambda rngs: StnMlp(sizes, 3, rngs=rngs),
        data,
        epochs=epochs,
        batch_size=128,
        seed=seed,
        warmup_epochs=0 if smoke else 3,
        eval_every=2 if smoke else 5,
        desc="STN digits",
        show_progress=show_progress,
    )
    plot_schedule(out / "stn_digits_schedule.png", result, f"STN, digits, {epochs} epochs")
    return [
        {
            "method": f"STN dropout+noise, {epochs} epochs (digits MLP)",
            "val_loss": result["val_loss"],
            "test_loss": result["test_loss"],
            "test_acc": result["test_accuracy"],
            "final_hparams": _fmt(result["hparams"]),
            "seconds": result["seconds"],
        }
    ]


def main(argv=None):
    parser = _common.make_parser("stn_digits", __doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam step on the weights")
    parser.add_argument("--hyper-lr", type=float, default=3e-3, help="Adam step on hparams")
    parser.add_argument("--variant", choices=["stn", "delta"], default="stn")
    parser.add_argument("--entropy-weight", type=float, default=1e-3)
    parser.add_argument("--init-scale", type=float, default=0.5, help="perturbation scale")
    parser.add_argument(
        "--max-trials", type=int, default=64, help="cap on the random-search trials"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.max_trials = 4, 4
    out = _common.results_dir(args)
    data = _common.load_digits(seed=args.seed)
    sizes = (64, 256, 256, 10)
    eval_every = 2 if args.smoke else 5
    show = not args.no_progress

    stn_result = train_stn(
        lambda rngs: StnMlp(sizes, 3, rngs=rngs),
        data,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        lr=args.lr,
        hyper_lr=args.hyper_lr,
        variant=args.variant,
        entropy_weight=args.entropy_weight,
        init_scale=args.init_scale,
        warmup_epochs=0 if args.smoke else 5,
        eval_every=eval_every,
        desc=args.variant,
        show_progress=show,
    )
    plain = lambda rngs: PlainMlp(sizes, rngs=rngs)
    common = dict(
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        lr=args.lr,
        eval_every=eval_every,
    )
    fixed_cfg = {
        "drop_in": np.array([0.0, 0.2, 0.5]),
        "drop_hidden": np.array([0.0, 0.2, 0.5]),
        "noise": np.zeros(3),
    }
    rs = np.random.RandomState(args.seed)
    if args.smoke:
        # One compiled run for the fixed baselines and two random draws.
        trials = 2
        draws = random_configs(rs, trials)
        both = {k: np.concatenate([fixed_cfg[k], draws[k]]) for k in fixed_cfg}
        results, seconds = train_fixed(plain, both, data, **common)
        fixed, search = results[:3], results[3:]
        per_run = seconds / len(results)
        search_seconds = per_run * trials
    else:
        fixed, fixed_seconds = train_fixed(plain, fixed_cfg, data, **common)
        per_run = fixed_seconds / 3
        # As many trials as fit in the STN run's wall time.
        trials = min(args.max_trials, max(2, round(stn_result["seconds"] / max(per_run, 1e-9))))
        search, search_seconds = train_fixed(plain, random_configs(rs, trials), data, **common)
    best = min(search, key=lambda r: r["val_loss"])

    rows = [
        {
            "method": f"{args.variant.upper()} (tuned online)",
            "val_loss": stn_result["val_loss"],
            "best_val_loss": stn_result["best_val_loss"],
            "test_acc": stn_result["test_accuracy"],
            "final_hparams": _fmt(stn_result["hparams"]),
            "seconds": stn_result["seconds"],
        }
    ]
    for p, r in zip((0.0, 0.2, 0.5), fixed, strict=True):
        rows.append(
            {
                "method": f"fixed dropout {p:g}",
                "val_loss": r["val_loss"],
                "best_val_loss": r["best_val_loss"],
                "test_acc": r["test_accuracy"],
                "final_hparams": _fmt(r["hparams"]),
                "seconds": per_run,
            }
        )
    rows.append(
        {
            "method": f"random search ({trials} trials, best by final val)",
            "val_loss": best["val_loss"],
            "best_val_loss": best["best_val_loss"],
            "test_acc": best["test_accuracy"],
            "final_hparams": _fmt(best["hparams"]),
            "seconds": search_seconds,
        }
    )
    record = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "stn": {k: v for k, v in stn_result.items()},
        "val_loss": stn_result["val_loss"],
        "best_val_loss": stn_result["best_val_loss"],
        "test_accuracy": stn_result["test_accuracy"],
        "hparams": stn_result["hparams"],
        "fixed": {f"dropout {p:g}": r for p, r in zip((0.0, 0.2, 0.5), fixed, strict=True)},
        "random_search": {"trials": trials, "best": best, "all": search},
        "reference": {
            "pytorch_stn_val_loss": "about 0.05-0.06",
            "no_dropout_val_loss": "about 0.14",
        },
        "rows": rows,
    }
    _common.save_json(out / "stn_digits.json", record)
    _common.save_csv(out / "stn_digits.csv", rows)
    plot_schedule(out / "stn_digits.png", stn_result, f"{args.variant.upper()} on digits")
    _common.print_table(
        rows, title=f"digits MLP, {args.epochs} epochs (reference: PyTorch STN val CE ~0.05-0.06)"
    )
    return record


if __name__ == "__main__":
    main()
