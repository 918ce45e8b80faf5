"""Quickstart: tune one L2 penalty per feature of a logistic regression by implicit hypergradients.

Data: scikit-learn's breast cancer set (569 x 30), split 300 train / 135 validation / 134 test and
standardized with training statistics. The inner problem fits a logistic regression with penalty
``0.5 * sum_j exp(h_j) w_j^2`` by L-BFGS; the outer problem minimizes the validation cross-entropy
over the 30 log-penalties ``h`` with Adam, using the implicit-function-theorem hypergradient
(``solvers.argmin`` with ``solvers.Implicit(solvers.cg())``), the inner solve warm-started from the
previous solution. Baseline: the best single shared penalty from a grid of 20 values, chosen on the
validation set.

    python -m experiments.quickstart            # about a minute on a laptop CPU
    python -m experiments.quickstart --smoke    # a few seconds
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import solvers
from experiments import _common


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


def main(argv=None):
    parser = _common.make_parser("quickstart", __doc__.split("\n\n")[0])
    parser.add_argument("--outer-steps", type=int, default=100, help="hypergradient steps")
    parser.add_argument("--outer-lr", type=float, default=0.1, help="Adam step on log-penalties")
    parser.add_argument("--inner-steps", type=int, default=200, help="max L-BFGS steps per solve")
    parser.add_argument("--init-penalty", type=float, default=1e-2, help="initial penalty")
    args = parser.parse_args(argv)
    if args.smoke:
        args.outer_steps, args.inner_steps = 10, 50
    out = _common.results_dir(args)

    data = _common.load_breast_cancer(seed=args.seed)
    Xtr, ytr = jnp.asarray(data.x_train), jnp.asarray(data.y_train, jnp.float32)
    Xva, yva = jnp.asarray(data.x_val), jnp.asarray(data.y_val, jnp.float32)
    d = Xtr.shape[1]
    zeros = (jnp.zeros(d), jnp.zeros(()))

    # --- baseline: best shared penalty from a grid of 20, all fitted at once with vmap.
    grid = np.logspace(-4, 1, 20)
    t0 = time.perf_counter()
    fits = jax.jit(
        jax.vmap(lambda lam: fit(jnp.full(d, jnp.log(lam)), zeros, Xtr, ytr, args.inner_steps))
    )(jnp.asarray(grid, jnp.float32))
    grid_val = np.asarray(jax.vmap(lambda p: bce(*p, Xva, yva))(fits))
    best = int(np.argmin(grid_val))
    grid_time = time.perf_counter() - t0
    grid_params = jax.tree.map(lambda a: a[best], fits)

    # --- implicit hypergradient descent on one penalty per feature.
    outer_opt = optax.adam(args.outer_lr)

    @jax.jit
    def outer_step(log_lam, opt_state, params):
        def val(log_lam):
            p, info = fit(log_lam, params, Xtr, ytr, args.inner_steps, return_info=True)
            return bce(*p, Xva, yva), (p, info)

        (loss, (p, info)), g = jax.value_and_grad(val, has_aux=True)(log_lam)
        updates, opt_state = outer_opt.update(g, opt_state, log_lam)
        return optax.apply_updates(log_lam, updates), opt_state, p, loss, info

    def tune(shape, desc):
        log_lam = jnp.full(shape, jnp.log(args.init_penalty), jnp.float32)
        opt_state = outer_opt.init(log_lam)
        params = zeros
        history = []
        t0 = time.perf_counter()
        for step in _common.progress(range(args.outer_steps), desc=desc, disable=args.no_progress):
            new_log_lam, opt_state, params, loss, info = outer_step(log_lam, opt_state, params)
            history.append(
                {
                    "step": step,
                    "val_loss": float(loss),
                    "inner_steps": int(info.steps),
                    "inner_status": int(info.status),
                    "mean_log10_penalty": float(jnp.mean(log_lam) / np.log(10)),
                }
            )
            log_lam = new_log_lam
        params = fit(log_lam, params, Xtr, ytr, args.inner_steps)
        return log_lam, params, history, time.perf_counter() - t0

    shared_log_lam, shared_params, shared_history, shared_time = tune((), "shared penalty")
    log_lam, params, history, tuned_time = tune((d,), "per-feature penalties")
    rows = [
        {
            "method": f"best shared penalty ({grid[best]:.2g}, grid of 20)",
            **evaluate(grid_params, data),
            "seconds": grid_time,
        },
        {
            "method": f"shared penalty ({float(jnp.exp(shared_log_lam)):.2g}, implicit HO)",
            **evaluate(shared_params, data),
            "seconds": shared_time,
        },
        {
            "method": "per-feature penalties (implicit HO)",
            **evaluate(params, data),
            "seconds": tuned_time,
        },
    ]
    penalties = np.exp(np.asarray(log_lam))
    _common.save_json(
        out / "quickstart.json",
        {
            "config": vars(args),
            "results": rows,
            "grid": grid,
            "grid_val_loss": grid_val,
            "penalties": penalties,
            "history": history,
            "shared_history": shared_history,
        },
    )
    _common.save_csv(out / "history.csv", history)

    plt = _common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot([h["val_loss"] for h in history], label="per-feature penalties (implicit HO)")
    axes[0].plot([h["val_loss"] for h in shared_history], label="shared penalty (implicit HO)")
    axes[0].axhline(grid_val[best], color="k", ls="--", label="best shared penalty (grid)")
    axes[0].set(
        xlabel="outer step",
        ylabel="validation cross-entropy",
        title="Validation loss over hypergradient steps",
    )
    axes[0].legend()
    axes[1].bar(np.arange(d), np.log10(penalties))
    axes[1].axhline(np.log10(grid[best]), color="k", ls="--", label="best shared penalty")
    axes[1].set(xlabel="feature", ylabel="log10 penalty", title="Tuned penalties")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out / "quickstart.png", dpi=120)
    plt.close(fig)

    _common.print_table(
        rows,
        ["method", "val_loss", "val_acc", "test_loss", "test_acc", "seconds"],
        title="Logistic regression on breast cancer: tuned L2 penalties",
    )
    print(
        "\nNote: one penalty per feature is 30 hyperparameters tuned on 135 validation examples;"
        "\nit lowers the validation loss well below the best shared penalty, but on this small"
        "\nset that gain does not reliably carry over to the test split (validation overfitting)."
    )
    print(f"\nresults in {out}/ (quickstart.json, history.csv, quickstart.png)")
    return rows


if __name__ == "__main__":
    main()
