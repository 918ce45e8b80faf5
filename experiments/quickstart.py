"""Quickstart: hyperparameters tuned by hypergradients, in four short demonstrations.

1. ``l2``: one L2 penalty per feature of a logistic regression, by implicit hypergradients
   through an L-BFGS fit (``solvers.argmin`` with ``solvers.Implicit``).
2. ``nnx``: per-layer weight decay of a Flax NNX MLP on digits, tuned online in one training run
   by ``bilevel.BilevelOptimizer``.
3. ``hd``: ``bilevel.hd_adam`` against ``optax.adam`` from a learning rate 100x too small.
4. ``stn``: a short Self-Tuning Network run (``bilevel.stn.Trainer``) tuning dropout rates and
   input noise on digits, with its hyperparameter schedule (the full experiment is
   ``experiments.stn_digits``).

Each section compiles its jitted functions once, ahead of time (announced), and reuses them for
every run it compares; then one progress bar covers all the training, and the tables follow.

Section 1. scikit-learn's breast cancer set (569 x 30), split 300 train / 135 validation / 134
test and standardized with training statistics. The inner problem fits a logistic regression with
penalty ``0.5 * sum_j exp(h_j) w_j^2`` by L-BFGS, warm-started from the previous solution; the
outer problem minimizes the validation cross-entropy over the 30 log-penalties ``h`` with Adam,
along the implicit-function-theorem hypergradient. Baselines: one shared penalty tuned the same
way, and the best shared penalty of a grid chosen on the validation set.

Section 2. Digits (1000 train / 400 validation / 397 test), MLP 64-128-128-10 (ReLU). The inner
loss is the cross-entropy plus ``sum_l lambda_l ||W_l||^2`` (one decay per layer, in
``bilevel.hparams.log``); 10 Adam steps per outer step, then one implicit hypergradient step
(damped conjugate gradient, warm-started) on the log-decays by plain SGD, which moves each
log-decay in proportion to its own hypergradient (Adam would move every coordinate by about its
learning rate whatever their sizes). Baseline: the same run with the decays held at their initial
value (same compiled step, outer learning rate 0, same minibatches).

Section 3. Logistic regression on digits, minibatches of 50, from a learning rate of 1e-5:
``optax.adam`` stays there, ``bilevel.hd_adam`` adapts it; reference: ``optax.adam(1e-2)``. The
three optimizers train side by side in one compiled epoch function.

Section 4. Digits MLP 64-128-128-10 of best-response layers; input dropout, hidden dropout and
input-noise scale start at 0.05 and are tuned online by the STN's hyper steps (Adam).

    python -m experiments.quickstart                    # every section
    python -m experiments.quickstart --sections l2 hd   # some of them
    python -m experiments.quickstart --smoke            # the test suite's short run
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import solvers
from experiments import _common


class Section(NamedTuple):
    """A section whose jitted functions are compiled; ``run(bar, out)`` does the training.

    ``run`` advances ``bar`` by ``units`` in all, saves the section's plot under ``out`` and
    returns a dict with ``rows`` (its table), ``columns``, ``notes`` (lines printed under the
    table), ``summary`` (its headline rows for ``summary.json``) and ``data`` (saved in
    ``quickstart.json``).
    """

    title: str
    units: int
    run: Callable[[Any, Any], dict]


# ----------------------------------------------------------------------------- 1. L2 penalties


def bce(w, b, X, y):
    logits = X @ w + b
    return jnp.mean(jnp.logaddexp(0.0, logits) - y * logits)


def accuracy(w, b, X, y):
    return jnp.mean(((X @ w + b) > 0) == (y > 0.5))


def inner_loss(params, log_lam, X, y):
    w, b = params
    return bce(w, b, X, y) + 0.5 * jnp.sum(jnp.exp(log_lam) * w**2)


def fit(log_lam, init, X, y, steps, adjoint=None, return_info=False):
    """The inner solution w*(log_lam) by L-BFGS, differentiable by the implicit function theorem."""
    return solvers.argmin(
        inner_loss,
        init,
        log_lam,
        X,
        y,
        optimizer=optax.lbfgs(),
        steps=steps,
        tol=1e-6,
        adjoint=adjoint or solvers.Implicit(linear_solver=solvers.cg(maxiter=100, tol=1e-6)),
        return_info=return_info,
    )


def evaluate(params, data):
    w, b = params
    out = {}
    for split, X, y in (("val", data.x_val, data.y_val), ("test", data.x_test, data.y_test)):
        out[f"{split}_loss"] = float(bce(w, b, X, y))
        out[f"{split}_acc"] = float(accuracy(w, b, X, y))
    return out


def prepare_l2(args) -> Section:
    """Per-feature L2 penalties of a logistic regression (breast cancer) by implicit HO.

    One compiled function serves all three methods: ``outer_step(log_lam, opt_state, params,
    shared)`` fits the model at the penalties (at their mean when ``shared``: Adam then moves
    every coordinate alike, as it would move one scalar) and takes one Adam step along the
    implicit hypergradient; the grid only uses its fit and validation loss.
    """
    data = _common.load_breast_cancer(seed=args.seed)
    Xtr, ytr = jnp.asarray(data.x_train), jnp.asarray(data.y_train, jnp.float32)
    Xva, yva = jnp.asarray(data.x_val), jnp.asarray(data.y_val, jnp.float32)
    d = Xtr.shape[1]
    zeros = (jnp.zeros(d), jnp.zeros(()))
    outer_opt = optax.adam(args.outer_lr)

    def outer_step(log_lam, opt_state, params, shared):
        def val(log_lam):
            h = jnp.where(shared, jnp.mean(log_lam), log_lam)
            p, info = fit(h, params, Xtr, ytr, args.inner_steps, return_info=True)
            return bce(*p, Xva, yva), (p, info)

        (loss, (p, info)), g = jax.value_and_grad(val, has_aux=True)(log_lam)
        updates, opt_state = outer_opt.update(g, opt_state, log_lam)
        return optax.apply_updates(log_lam, updates), opt_state, p, loss, info

    log_lam0 = jnp.full(d, np.log(args.init_penalty), jnp.float32)
    opt0 = outer_opt.init(log_lam0)
    step = jax.jit(outer_step).lower(log_lam0, opt0, zeros, jnp.asarray(True)).compile()
    grid = np.logspace(-4, 1, args.grid)

    def tune(shared: bool, bar):
        log_lam, opt_state, params = log_lam0, opt0, zeros
        flag = jnp.asarray(shared)
        history = []
        for i in range(args.outer_steps):
            new, opt_state, params, loss, info = step(log_lam, opt_state, params, flag)
            history.append(
                {
                    "step": i,
                    "val_loss": float(loss),
                    "inner_steps": int(info.steps),
                    "inner_status": int(info.status),
                    "mean_log10_penalty": float(jnp.mean(log_lam) / np.log(10)),
                }
            )
            log_lam = new
            bar.update(1)
        # The fit at the final penalties (this call's hyperparameter step is discarded).
        _, _, params, _, _ = step(log_lam, opt_state, params, flag)
        return np.asarray(log_lam), params, history

    def run(bar, out) -> dict:
        fits, grid_val = [], []
        for lam in grid:
            log_lam = jnp.full(d, np.log(lam), jnp.float32)
            _, _, p, loss, _ = step(log_lam, opt0, zeros, jnp.asarray(True))
            fits.append(p)
            grid_val.append(float(loss))
            bar.update(1)
        best = int(np.argmin(grid_val))
        shared_log_lam, shared_params, shared_history = tune(True, bar)
        log_lam, params, history = tune(False, bar)
        shared_lam = float(np.exp(shared_log_lam[0]))
        rows = [
            {"method": f"best shared penalty ({grid[best]:.2g}, grid of {len(grid)})"}
            | evaluate(fits[best], data),
            {"method": f"shared penalty ({shared_lam:.2g}, implicit HO)"}
            | evaluate(shared_params, data),
            {"method": "per-feature penalties (implicit HO)"} | evaluate(params, data),
        ]
        penalties = np.exp(log_lam)
        plot_l2(
            out / "quickstart.png",
            history,
            shared_history,
            grid_val[best],
            grid[best],
            shared_lam,
            penalties,
        )
        _common.save_csv(out / "history.csv", history)
        grid_row, tuned_row = rows[0], rows[2]
        return {
            "rows": rows,
            "columns": ["method", "val_loss", "val_acc", "test_loss", "test_acc"],
            "notes": [
                f"The per-feature penalties span {penalties.min():.2g} .. {penalties.max():.2g}: "
                f"{d} hyperparameters tuned on {len(data.y_val)} validation examples lower the",
                "validation loss well below the best shared penalty, but on this small set that "
                "gain does not reliably carry",
                "over to the test split (validation overfitting): compare the test_loss column.",
            ],
            "summary": [
                {
                    "what": f"quickstart 1: logistic regression (breast cancer), {d} per-feature "
                    "L2 penalties by implicit hypergradients through L-BFGS, "
                    f"{args.outer_steps} Adam steps",
                    "result": f"val loss {tuned_row['val_loss']:.3g} vs "
                    f"{grid_row['val_loss']:.3g} (best of a {len(grid)}-value shared grid); "
                    f"test loss {tuned_row['test_loss']:.3g} vs {grid_row['test_loss']:.3g}",
                    "target": "val loss below the grid's",
                }
            ],
            "data": {
                "results": rows,
                "grid": grid,
                "grid_val_loss": grid_val,
                "penalties": penalties,
                "history": history,
                "shared_history": shared_history,
            },
        }

    return Section(
        "1. Logistic regression on breast cancer: tuned L2 penalties",
        len(grid) + 2 * args.outer_steps,
        run,
    )


def plot_l2(path, history, shared_history, grid_loss, grid_lam, shared_lam, penalties):
    plt = _common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    per_feature, shared = "per-feature penalties (implicit HO)", "shared penalty (implicit HO)"
    ax = axes[0]
    ax.plot([h["val_loss"] for h in history], color=_common.color("implicit"), label=per_feature)
    ax.plot([h["val_loss"] for h in shared_history], color=_common.color("soba"), label=shared)
    ax.axhline(grid_loss, color=_common.color("grid"), ls="--", label="best shared penalty (grid)")
    ax.set(
        xlabel="outer step (one L-BFGS fit + one Adam step)",
        ylabel="validation cross-entropy (nats)",
        title="Validation loss over hypergradient steps",
    )
    ax.legend(loc="center right", fontsize=8)
    ax = axes[1]
    ax.bar(np.arange(len(penalties)), penalties, color=_common.color("implicit"), label=per_feature)
    ax.axhline(grid_lam, color=_common.color("grid"), ls="--", label="best shared penalty (grid)")
    ax.axhline(shared_lam, color=_common.color("soba"), ls=":", label=shared)
    ax.set(
        yscale="log",
        xlabel="feature index",
        ylabel="L2 penalty exp(h_j)",
        title="Tuned penalties (log scale)",
    )
    ax.legend(loc="upper left", fontsize=8, bbox_to_anchor=(1.0, 1.0))
    _common.save_figure(fig, path, dpi=120)


# ----------------------------------------------------------------------------- 2. NNX online


def prepare_nnx(args) -> Section:
    """Online tuning of per-layer weight decay of a Flax NNX MLP on digits, in one training run.

    ``bilevel.BilevelOptimizer`` alternates 10 Adam steps with one implicit hypergradient step
    (damped CG, warm-started) taken by SGD on the log-decays. One compiled function runs 10
    outer steps (a ``lax.scan``); the fixed-decay baseline runs it with the outer learning rate
    set to 0 in the state (``optax.inject_hyperparams``), on the same minibatches.
    """
    from flax import nnx

    import bilevel
    from bilevel import hparams as H

    data = _common.load_digits(seed=args.seed)
    train = (jnp.asarray(data.x_train), jnp.asarray(data.y_train))
    val = (jnp.asarray(data.x_val), jnp.asarray(data.y_val))
    test = (jnp.asarray(data.x_test), jnp.asarray(data.y_test))
    model = _common.MLP([64, 128, 128, 10], rngs=nnx.Rngs(args.seed))
    apply_fn, params = bilevel.nnx_apply_fn(model)
    n_layers = 3

    def xent(p, batch):
        logits = apply_fn(p, batch[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    def inner(p, h, batch):
        decay = sum(
            h["wd"][i] * jnp.sum(p["layers"][i]["kernel"][...] ** 2) for i in range(n_layers)
        )
        return xent(p, batch) + decay

    def outer(p, h, batch):
        return xent(p, batch)

    opt = bilevel.BilevelOptimizer(
        inner,
        outer,
        inner_optimizer=optax.adam(1e-3),
        outer_optimizer=optax.inject_hyperparams(optax.sgd)(learning_rate=args.nnx_outer_lr),
        space={"wd": H.log(jnp.full(n_layers, args.init_wd))},
        method=solvers.Implicit(linear_solver=solvers.cg(maxiter=20, tol=1e-3, ridge=1.0)),
        inner_steps=10,
    )
    chunk = 10

    def run_chunk(state):
        def body(state, _):
            batches = bilevel.minibatches(train, state.key, state.step, 64, 10)
            state, m = opt.step(state, batches, val)
            record = {"wd": m["hparams"]["wd"], "hypergrad": m["hypergrad"]["wd"]}
            return state, record | {"val_loss": m["outer_loss"]}

        return jax.lax.scan(body, state, None, length=chunk)

    @jax.jit
    def losses(p):
        correct = jnp.argmax(apply_fn(p, test[0]), -1) == test[1]
        return xent(p, val), xent(p, test), jnp.mean(correct)

    state0 = opt.init(params, key=jax.random.key(args.seed))
    compiled = jax.jit(run_chunk).lower(state0).compile()
    losses.lower(params).compile()
    chunks = max(1, args.nnx_outer_steps // chunk)
    fixed_name = f"fixed weight decay {args.init_wd:g}"
    tuned_name = "per-layer weight decay, tuned online"

    def run(bar, out) -> dict:
        rows, records = [], {}
        for name, outer_lr in ((fixed_name, 0.0), (tuned_name, args.nnx_outer_lr)):
            hyper = {"learning_rate": jnp.asarray(outer_lr, jnp.float32)}
            state = state0._replace(outer_state=state0.outer_state._replace(hyperparams=hyper))
            parts = []
            for _ in range(chunks):
                state, record = compiled(state)
                parts.append(jax.device_get(record))
                bar.update(chunk)
            records[name] = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            val_loss, test_loss, test_acc = (float(v) for v in losses(opt.params(state)))
            decays = np.asarray(opt.hparams(state)["wd"])
            rows.append(
                {
                    "method": name,
                    "val_loss": val_loss,
                    "test_loss": test_loss,
                    "test_acc": test_acc,
                    "final_weight_decays": " ".join(f"{v:.2g}" for v in decays),
                }
            )
        fixed, tuned = rows
        g0 = records[tuned_name]["hypergrad"][0]
        spread = float(np.max(np.abs(g0)) / np.min(np.abs(g0)))
        plot_nnx(out / "nnx_weight_decay.png", records, fixed_name, tuned_name, args.init_wd)

        def change(key):
            return f"{100 * (tuned[key] / fixed[key] - 1):+.0f}%"

        notes = [
            f"Tuned vs fixed: validation loss {tuned['val_loss']:.4g} vs {fixed['val_loss']:.4g} "
            f"({change('val_loss')}, the tuned objective), test loss {tuned['test_loss']:.4g} "
            f"vs {fixed['test_loss']:.4g} ({change('test_loss')}, held out).",
            "Why the per-layer decays stay together: in a ReLU MLP, scaling one layer by c and "
            "the next by 1/c leaves the",
            "network unchanged, so at the inner optimum the validation loss depends on the decays "
            "only through their product",
            "and the hypergradients w.r.t. the log-decays are equal (first step: "
            + " ".join(f"{g:.3g}" for g in g0)
            + f"; max/min {spread:.2f}). The outer SGD",
            "moves each log-decay in proportion to its own hypergradient, so decays whose "
            "hypergradients differ in size do",
            "separate (Adam would not separate them: it moves every coordinate by about its "
            "learning rate).",
        ]
        return {
            "rows": rows,
            "columns": ["method", "val_loss", "test_loss", "test_acc", "final_weight_decays"],
            "notes": notes,
            "summary": [
                {
                    "what": "quickstart 2: Flax NNX MLP on digits, per-layer weight decay tuned "
                    f"online ({chunks * chunk} outer steps x 10 Adam steps, implicit "
                    "hypergradient, SGD on log-decays)",
                    "result": f"val loss {tuned['val_loss']:.3g} vs {fixed['val_loss']:.3g}, "
                    f"test loss {tuned['test_loss']:.3g} vs {fixed['test_loss']:.3g} "
                    f"(fixed {args.init_wd:g}); decays {tuned['final_weight_decays']}",
                    "target": "val and test loss below fixed",
                }
            ],
            "data": {"results": rows, "first_hypergradients": g0, "records": records},
        }

    return Section(
        "2. Flax NNX MLP on digits: per-layer weight decay tuned online (one run)",
        2 * chunks * chunk,
        run,
    )


LAYER_COLORS = ("#08306b", "#2171b5", "#6baed6")  # shades of the implicit method's blue
LAYER_STYLES = ("-", "--", ":")


def plot_nnx(path, records, fixed_name, tuned_name, init_wd):
    plt = _common.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    tuned = records[tuned_name]
    steps = np.arange(1, len(tuned["wd"]) + 1)
    for i in range(tuned["wd"].shape[1]):
        style = {"color": LAYER_COLORS[i], "ls": LAYER_STYLES[i], "label": f"layer {i + 1}"}
        axes[0].plot(steps, tuned["wd"][:, i], **style)
        axes[1].plot(steps, tuned["hypergrad"][:, i], **style)
    axes[0].axhline(init_wd, color=_common.color("fixed"), ls="--", lw=1, label=fixed_name)
    axes[0].set(
        yscale="log",
        xlabel="outer step (10 Adam steps each)",
        ylabel="weight decay lambda_l",
        title="Per-layer decays (overlapping: equal hypergradients)",
    )
    axes[0].legend(loc="center right", fontsize=8)
    axes[1].axhline(0.0, color="k", lw=0.8)
    axes[1].set_yscale("symlog", linthresh=1e-6)
    axes[1].set(
        xlabel="outer step",
        ylabel="d val loss / d log lambda_l",
        title="Hypergradients per layer (symlog)",
    )
    axes[1].legend(loc="upper right", fontsize=8)
    for name, key in ((fixed_name, "fixed"), (tuned_name, "implicit")):
        axes[2].plot(steps, records[name]["val_loss"], color=_common.color(key), label=name)
    axes[2].set(
        yscale="log",
        xlabel="outer step",
        ylabel="validation cross-entropy (nats)",
        title="Validation loss: tuned vs fixed decay",
    )
    axes[2].legend(loc="upper right", fontsize=8)
    _common.save_figure(fig, path, dpi=120)


# ----------------------------------------------------------------------------- 3. HD-Adam


def prepare_hd(args) -> Section:
    """``bilevel.hd_adam`` vs ``optax.adam`` from a bad learning rate: logistic regression, digits.

    The three optimizers train side by side inside one compiled epoch function.
    """
    import bilevel

    data = _common.load_digits(seed=args.seed)
    x_tr, y_tr = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    x_va, y_va = jnp.asarray(data.x_val), jnp.asarray(data.y_val)
    x_te, y_te = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    lr0, ref_lr, batch = 1e-5, 1e-2, 50
    runs = {
        "Adam": optax.adam(lr0),
        "Adam-HD": bilevel.hd_adam(lr0, hyper_lr=args.hd_beta),
        f"Adam (tuned {ref_lr:g})": optax.adam(ref_lr),
    }
    starts = dict(zip(runs, (lr0, lr0, ref_lr), strict=True))
    params0 = {"w": jnp.zeros((x_tr.shape[1], 10)), "b": jnp.zeros(10)}
    n_batches = x_tr.shape[0] // batch

    def loss_fn(p, x, y):
        return _common.xent(x @ p["w"] + p["b"], y)

    def epoch(carry, key):
        idx = jax.random.permutation(key, x_tr.shape[0])[: n_batches * batch]

        def step(carry, i):
            new, lrs = {}, {}
            for name, tx in runs.items():
                p, s = carry[name]
                g = jax.grad(loss_fn)(p, x_tr[i], y_tr[i])
                updates, s = tx.update(g, s, p)
                new[name] = (optax.apply_updates(p, updates), s)
                lr = optax.tree_utils.tree_get(s, "learning_rate")
                lrs[name] = jnp.asarray(starts[name] if lr is None else lr, jnp.float32)
            return new, lrs

        carry, lrs = jax.lax.scan(step, carry, idx.reshape(n_batches, batch))
        metrics = {
            name: (loss_fn(p, x_va, y_va), _common.accuracy(x_te @ p["w"] + p["b"], y_te))
            for name, (p, _) in carry.items()
        }
        return carry, lrs, metrics

    carry0 = {name: (params0, tx.init(params0)) for name, tx in runs.items()}
    key = jax.random.key(args.seed)
    compiled = jax.jit(epoch).lower(carry0, key).compile()
    epochs = args.hd_epochs

    def run(bar, out) -> dict:
        carry, lr_parts, curves = carry0, [], {name: [] for name in runs}
        for e in range(epochs):
            carry, lrs, metrics = compiled(carry, jax.random.fold_in(key, e))
            lr_parts.append(jax.device_get(lrs))
            for name, (vl, acc) in metrics.items():
                curves[name].append((float(vl), float(acc)))
            bar.update(1)
        lr_paths = {name: np.concatenate([p[name] for p in lr_parts]) for name in runs}
        rows = [
            {
                "method": name,
                "lr0": starts[name],
                "final_lr": float(lr_paths[name][-1]),
                "val_loss": curves[name][-1][0],
                "test_acc": curves[name][-1][1],
            }
            for name in runs
        ]
        plot_hd(out / "hd_vs_adam.png", curves, lr_paths, starts, n_batches)
        adam, hd, ref = rows
        return {
            "rows": rows,
            "columns": ["method", "lr0", "final_lr", "val_loss", "test_acc"],
            "notes": [
                f"Adam-HD raised its learning rate {hd['final_lr'] / lr0:.0f}x by hypergradient "
                f"descent (hyper_lr={args.hd_beta:g}); Adam kept 1e-5 and barely moved in "
                f"{epochs} epochs."
            ],
            "summary": [
                {
                    "what": "quickstart 3: bilevel.hd_adam from a learning rate of 1e-5 "
                    f"(digits logistic regression, {epochs} epochs)",
                    "result": f"val loss {hd['val_loss']:.3g} (final lr {hd['final_lr']:.2g}) vs "
                    f"optax.adam {adam['val_loss']:.3g} at 1e-5, {ref['val_loss']:.3g} at "
                    f"{ref_lr:g}",
                    "target": f"about optax.adam({ref_lr:g})",
                }
            ],
            "data": {"results": rows, "curves": curves, "lr_paths": lr_paths},
        }

    return Section(
        "3. Learning rate 100x too small: Adam vs hypergradient Adam (bilevel.hd_adam)",
        epochs,
        run,
    )


def plot_hd(path, curves, lr_paths, starts, steps_per_epoch):
    plt = _common.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, curve in curves.items():
        key = "hd-adam" if name == "Adam-HD" else "adam"
        ls = "--" if name.startswith("Adam (") else "-"
        label = name if "(" in name else f"{name}, lr0={starts[name]:g}"
        ax1.plot(
            np.arange(1, len(curve) + 1),
            [c[0] for c in curve],
            color=_common.color(key),
            ls=ls,
            label=label,
        )
        lr_path = lr_paths[name]
        ax2.plot(
            np.arange(1, len(lr_path) + 1) / steps_per_epoch,
            lr_path,
            color=_common.color(key),
            ls=ls,
            label=label,
        )
    ax1.set(
        yscale="log",
        xlabel="epoch",
        ylabel="validation cross-entropy (nats)",
        title="Validation loss (dashed: a well-chosen rate)",
    )
    ax1.legend(loc="center right", fontsize=8)
    ax2.set(
        yscale="log",
        xlabel="epoch",
        ylabel="learning rate",
        title="Learning rate (Adam's are constant)",
    )
    ax2.legend(loc="center right", fontsize=8)
    fig.suptitle("Digits, logistic regression: hd_adam recovers from a learning rate of 1e-5")
    _common.save_figure(fig, path, dpi=120)


# ----------------------------------------------------------------------------- 4. STN


def prepare_stn(args) -> Section:
    """A short STN run on digits tuning input/hidden dropout and input noise.

    ``stn.Trainer.fit`` runs 7 tuning cycles (5 epochs) per compiled call; one such call is run
    and discarded here to compile it, the run itself starts from the initial state.
    """
    from flax import nnx

    from bilevel import stn

    data = _common.load_digits(seed=args.seed)
    train = (jnp.asarray(data.x_train), jnp.asarray(data.y_train))
    val = (jnp.asarray(data.x_val), jnp.asarray(data.y_val))
    test = (jnp.asarray(data.x_test), jnp.asarray(data.y_test))
    inner, outer = _common.digits_losses()
    space = _common.digits_space()
    sizes = (64, 128, 10) if args.smoke else (64, 128, 128, 10)  # smoke: a smaller program
    trainer = stn.Trainer(
        _common.StnMlp(sizes, len(space), rngs=nnx.Rngs(args.seed)),
        inner,
        outer,
        space=space,
        inner_optimizer=optax.adam(1e-3),
        outer_optimizer=optax.adam(args.stn_hyper_lr),
        method=stn.STN(),
        inner_steps=5,
        outer_steps=1,
        init_scale=0.5,
        entropy_weight=1e-3,
    )
    batch_size = 128
    per_epoch = train[0].shape[0] // batch_size
    chunk = per_epoch  # cycles of 5 inner steps: 5 epochs per chunk
    chunks = max(1, round(args.stn_epochs / 5))

    @jax.jit
    def losses(state, x, y):
        logits = trainer.model(state)(x, trainer.hnet(state))
        return _common.xent(logits, y), _common.accuracy(logits, y)

    state0 = trainer.init(key=jax.random.key(args.seed))
    kw = {"batch_size": batch_size, "chunk": chunk, "progress": False}
    trainer.fit(state0, train, val, steps=chunk, **kw)  # compiles; result discarded
    losses(state0, *val)
    init = {k: float(v) for k, v in trainer.hparams(state0).items()}
    epochs = chunks * chunk * 5 / per_epoch

    def run(bar, out) -> dict:
        curve = [(0.0, float(losses(state0, *val)[0]))]

        def record(step, state, metrics):
            curve.append((step * 5 / per_epoch, float(losses(state, *val)[0])))
            bar.update(chunk)

        state, history = trainer.fit(
            state0, train, val, steps=chunks * chunk, callbacks=record, **kw
        )
        val_ce, _ = losses(state, *val)
        test_ce, test_acc = losses(state, *test)
        final = {k: float(v) for k, v in trainer.hparams(state).items()}
        schedule = {
            "epoch": history["step"] * 5 / per_epoch,
            **{k: history[f"hparams/{k}"] for k in space},
            **{f"hypergrad/{k}": history[f"hypergrad/{k}"] for k in space},
        }
        plot_stn(out / "stn_digits_schedule.png", schedule, curve, init, epochs)
        rows = [
            {
                "method": f"STN dropout+noise, {epochs:g} epochs (digits MLP)",
                "val_loss": float(val_ce),
                "test_loss": float(test_ce),
                "test_acc": float(test_acc),
                "initial_hparams": _common.fmt_hparams(init),
                "final_hparams": _common.fmt_hparams(final),
            }
        ]
        g = np.stack([schedule[f"hypergrad/{k}"] for k in space], 1)
        first = " ".join(f"{k}={v:.2g}" for k, v in zip(space, g[0], strict=True))
        return {
            "rows": rows,
            "columns": list(rows[0]),
            "notes": [
                "The three hyperparameters move together: their hypergradients are nearly equal "
                f"(first cycle: {first}),",
                "and Adam moves each unconstrained value by about its learning rate "
                f"({args.stn_hyper_lr:g}) per cycle while they keep one sign. The STN's "
                "hypernetwork",
                "reads the unconstrained hyperparameters themselves (all near -2.9 here); "
                "stn.DeltaSTN, which centres them,",
                "separates them (python -m experiments.stn_digits --variant delta).",
            ],
            "summary": [
                {
                    "what": "quickstart 4: Self-Tuning Network on digits, dropout and input "
                    f"noise tuned online ({epochs:g} epochs)",
                    "result": f"val loss {float(val_ce):.3g}, test acc {float(test_acc):.3g}; "
                    f"{_common.fmt_hparams(final)} (from 0.05)",
                    "target": "-",
                }
            ],
            "data": {"results": rows, "schedule": schedule, "val_curve": curve},
        }

    return Section(
        "4. Self-Tuning Network on digits: dropout and input noise tuned online",
        chunks * chunk,
        run,
    )


HPARAM_COLORS = {"drop_in": "#1b9e77", "drop_hidden": "#d95f02", "noise": "#7570b3"}
HPARAM_STYLES = {"drop_in": "-", "drop_hidden": "--", "noise": ":"}


def plot_stn(path, schedule, curve, init, epochs):
    plt = _common.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for k in init:
        style = {"color": HPARAM_COLORS[k], "ls": HPARAM_STYLES[k]}
        ax1.plot(schedule["epoch"], schedule[k], label=k, **style)
    for value in sorted({f"{v:.3g}" for v in init.values()}):
        names = ", ".join(k for k, v in init.items() if f"{v:.3g}" == value)
        ax1.axhline(float(value), color=_common.color("fixed"), lw=1, label=f"initial {names}")
    ax1.set(
        xlabel="epoch",
        ylabel="dropout rate / noise std",
        title=f"STN hyperparameter schedule ({epochs:g} epochs; overlapping)",
    )
    ax1.legend(loc="upper left", fontsize=8, bbox_to_anchor=(1.0, 1.0))
    ax2.plot(
        [c[0] for c in curve],
        [c[1] for c in curve],
        color=_common.color("stn"),
        marker="o",
        label="STN",
    )
    ax2.set(
        yscale="log",
        xlabel="epoch",
        ylabel="validation cross-entropy (nats)",
        title="Validation loss of the STN",
    )
    ax2.legend(loc="upper right", fontsize=8)
    _common.save_figure(fig, path, dpi=120)


# ----------------------------------------------------------------------------- main

SECTIONS = {"l2": prepare_l2, "nnx": prepare_nnx, "hd": prepare_hd, "stn": prepare_stn}
COMPILING = {
    "l2": "L-BFGS fit + implicit hypergradient step (section 1)",
    "nnx": "BilevelOptimizer step of the NNX MLP (section 2)",
    "hd": "Adam / Adam-HD training epoch (section 3)",
    "stn": "Self-Tuning Network cycle (section 4)",
}


def main(argv=None):
    parser = _common.make_parser("quickstart", __doc__.split("\n\n")[0])
    parser.add_argument("--outer-steps", type=int, default=100, help="hypergradient steps (l2)")
    parser.add_argument("--outer-lr", type=float, default=0.1, help="Adam step on log-penalties")
    parser.add_argument("--inner-steps", type=int, default=200, help="max L-BFGS steps per solve")
    parser.add_argument("--init-penalty", type=float, default=1e-2, help="initial penalty (l2)")
    parser.add_argument("--grid", type=int, default=20, help="shared penalties tried (l2)")
    parser.add_argument(
        "--nnx-outer-steps", type=int, default=100, help="outer steps of 10 Adam steps (nnx)"
    )
    parser.add_argument(
        "--nnx-outer-lr",
        type=float,
        default=50.0,
        help="SGD step on the log-decays (nnx; their hypergradients are ~1e-3 at the start)",
    )
    parser.add_argument("--init-wd", type=float, default=1e-3, help="initial weight decay (nnx)")
    parser.add_argument("--hd-epochs", type=int, default=30, help="training epochs (hd)")
    parser.add_argument("--hd-beta", type=float, default=1e-4, help="hyper_lr of hd_adam (hd)")
    parser.add_argument("--stn-epochs", type=int, default=40, help="training epochs (stn)")
    parser.add_argument(
        "--stn-hyper-lr", type=float, default=0.03, help="Adam step of the STN hyper steps (stn)"
    )
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=list(SECTIONS),
        default=list(SECTIONS),
        help="which parts to run",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.outer_steps, args.inner_steps, args.grid = 10, 50, 5
        args.nnx_outer_steps, args.hd_epochs, args.stn_epochs = 20, 3, 5
    t_start = time.perf_counter()
    out = _common.results_dir(args)
    quiet = args.no_progress
    prepared = {}
    for name in args.sections:
        _common.phase(f"compiling the {COMPILING[name]}", quiet=quiet)
        prepared[name] = SECTIONS[name](args)
    bar = _common.progress(
        total=sum(s.units for s in prepared.values()), desc="quickstart", disable=quiet
    )
    outputs = {}
    for name, section in prepared.items():
        bar.set_postfix_str(section.title.split(":")[0])
        outputs[name] = section.run(bar, out)
    bar.close()

    for name, section in prepared.items():
        _common.print_table(outputs[name]["rows"], outputs[name]["columns"], title=section.title)
        for line in outputs[name]["notes"]:
            print(line)
    _common.save_json(
        out / "quickstart.json",
        {"config": vars(args), **{name: o["data"] for name, o in outputs.items()}},
    )
    wall = time.perf_counter() - t_start
    summary = [row for o in outputs.values() for row in o["summary"]]
    _common.write_summary(out, "quickstart", summary, seconds=wall, smoke=args.smoke)
    _common.done(out, wall)
    return {name: o["rows"] for name, o in outputs.items()}


if __name__ == "__main__":
    main()
