"""Benchopt-style comparison of the bilevel methods on three problems, against time and oracle calls.

Seeds move the initial hyperparameters (``N(0, 0.5^2)`` in unconstrained units; seed 0 is the
space's initial value) on one instance of each problem.

Problems (all offline, deterministic full-batch inner problems):

- ``quadratic``: inner ``g(w, x) = 0.5 w^T A w - w^T B x`` (``A`` SPD, 40 x 40, condition 10),
  outer ``f(w, x) = 0.5 ||w - c||^2 + 0.5 mu ||x||^2`` with ``x`` in R^10: the bilevel optimum is
  a linear solve, so the value gap ``F(x_t) - F*`` is exact;
- ``logreg``: one L2 penalty per feature (``bilevel.hparams.log``) of a logistic regression on
  scikit-learn's breast cancer data (300 train / 135 validation, 30 features; penalties in
  ``(0, 1]``); ``--ijcnn`` replaces it by an
  ``ijcnn1``-like synthetic set (``make_classification``, 50 000 x 22); the value is the
  validation loss at the exact inner solution (L-BFGS to 1e-7), the gap is to the best value any
  run reached (benchopt's convention);
- ``cleaning``: data hyper-cleaning, one weight per training example of a linear classifier on
  the MNIST-5k subset (3000 train, 70% of the labels replaced by wrong ones); the value is the
  test error of the current weights.

Methods (``bilevel.BilevelOptimizer`` unless noted): implicit (warm-started CG, 20 iterations),
SOBA (one Neumann step of ``1 / L`` on the adjoint), Nystrom (``solvers.nystrom(rank=10, rho)``,
``rho`` 1 on the quadratic whose Hessian spectrum is ``[1, 10]``, 0.1 elsewhere), truncated
(``K = 2``), forward (RTHO; quadratic and logreg only: one tangent per hyperparameter), BO-REP
(with ``bilevel.normalized_momentum``), and MAID (``bilevel.MAID``, its own adaptive accuracies;
quadratic and logreg) when available. Oracle calls = inner gradients + Hessian-vector products
(a reverse or forward pass through one step counts as one). Reported: median and quartiles over
the seeds of the gap (or test error) against wall time and against oracle calls, one PNG per
problem, and a table of each method's median value at a quarter, half and all of the budget.

Context (not rerun here): benchopt's bilevel benchmark reports for data cleaning on the full MNIST
at 70% noise a median test error at 100 s of 14.4% (SABA), 14.6% (SOBA), 14.9% (AmIGO) and 16.1%
(StocBiO).

    python -m experiments.bench_bilevel_methods              # a few minutes on a 2-core CPU
    python -m experiments.bench_bilevel_methods --smoke
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bilevel
import solvers
from bilevel import hparams as H
from experiments import _common

PROBLEMS = ("quadratic", "logreg", "cleaning")
METHODS = ("implicit", "soba", "nystrom", "truncated", "forward", "borep", "maid")
DETERMINISTIC_ONLY = {"forward", "maid"}  # too many hyperparameters / full-batch method


# ----------------------------------------------------------------------------- problems


def quadratic_problem(seed: int) -> dict:
    rng = np.random.RandomState(seed)
    dw, dx, mu = 40, 10, 0.1
    Q, _ = np.linalg.qr(rng.randn(dw, dw))
    A = Q @ np.diag(np.logspace(0, 1, dw)) @ Q.T
    B = rng.randn(dw, dx)
    c = rng.randn(dw)
    # F(x) = 0.5 ||A^-1 B x - c||^2 + 0.5 mu ||x||^2: a least-squares problem in x.
    M = np.linalg.solve(A, B)
    x_star = np.linalg.solve(M.T @ M + mu * np.eye(dx), M.T @ c)
    f_star = 0.5 * np.sum((M @ x_star - c) ** 2) + 0.5 * mu * np.sum(x_star**2)
    A32, B32, c32 = (jnp.asarray(a, jnp.float32) for a in (A, B, c))

    def value(x):
        x = np.asarray(x, np.float64)
        return 0.5 * np.sum((M @ x - c) ** 2) + 0.5 * mu * np.sum(x**2) - f_star

    return {
        "inner": lambda w, h, b: 0.5 * w @ A32 @ w - w @ (B32 @ h["x"]),
        "outer": lambda w, h, b: 0.5 * jnp.sum((w - c32) ** 2) + 0.5 * mu * jnp.sum(h["x"] ** 2),
        "space": {"x": H.real(jnp.zeros(dx))},
        "params": jnp.zeros(dw),
        "inner_optimizer": optax.sgd(1.0 / 10),
        "outer_lr": 0.05,
        "inner_batch": jnp.zeros((1, 1)),
        "outer_batch": jnp.zeros(1),
        "value": lambda state, opt: value(opt.hparams(state)["x"]),
        "gap": value,
        "value_name": "F(x) - F*",
        "hvp_scale": 1.0 / 10,
        "nystrom_rho": 1.0,  # the Hessian's spectrum is [1, 10]: the dropped modes are >= 1
    }


def logreg_problem(seed: int, ijcnn: bool = False) -> dict:
    if ijcnn:
        from sklearn.datasets import make_classification

        X, y = make_classification(
            60_000, 22, n_informative=10, weights=[0.9], flip_y=0.05, random_state=seed
        )
        X = (X - X.mean(0)) / X.std(0)
        split = _common.Split(X[:50_000], y[:50_000], X[50_000:], y[50_000:], X[:1], y[:1])
    else:
        split = _common.load_breast_cancer(seed=seed)
    X, y = jnp.asarray(split.x_train, jnp.float32), jnp.asarray(split.y_train, jnp.float32)
    Xv, yv = jnp.asarray(split.x_val, jnp.float32), jnp.asarray(split.y_val, jnp.float32)
    d = X.shape[1]
    inner = lambda w, h, b: _common.logistic_inner(w, jnp.log(h["lam"]), X, y)
    outer = lambda w, h, b: _common.logistic_loss(w, Xv, yv)

    @jax.jit
    def exact_value(lam):
        w = solvers.argmin(
            lambda w, t: _common.logistic_inner(w, t, X, y), jnp.zeros(d), jnp.log(lam),
            optimizer=optax.lbfgs(), steps=300, tol=1e-7,
        )  # fmt: skip
        return _common.logistic_loss(w, Xv, yv)

    # Penalties are bounded by 1 so that the inner step 1 / L stays stable for every value.
    lmax = float(jnp.linalg.eigvalsh(X.T @ X / X.shape[0])[-1]) / 4 + 1.0
    return {
        "inner": inner,
        "outer": outer,
        "space": {"lam": H.log(jnp.full(d, 1e-2), upper=1.0)},
        "params": jnp.zeros(d),
        "inner_optimizer": optax.sgd(1.0 / lmax),
        "outer_lr": 0.05,
        "inner_batch": jnp.zeros((1, 1)),
        "outer_batch": jnp.zeros(1),
        "value": lambda state, opt: float(exact_value(opt.hparams(state)["lam"])),
        "value_name": "validation loss - best",
        "hvp_scale": 1.0 / lmax,
        "nystrom_rho": 0.1,
    }


def cleaning_problem(seed: int, noise: float = 0.7, n_train: int = 3000) -> dict:
    from experiments.hyper_cleaning import corrupt_labels

    split = _common.load_mnist5k(seed=seed, n_train=n_train)
    y_noisy, _ = corrupt_labels(split.y_train, noise, seed)
    X, y = jnp.asarray(split.x_train), jnp.asarray(y_noisy)
    Xv, yv = jnp.asarray(split.x_val), jnp.asarray(split.y_val)
    Xt, yt = jnp.asarray(split.x_test), jnp.asarray(split.y_test)
    apply = lambda p, x: x @ p["w"] + p["b"]
    l2 = 1e-3

    def inner(p, h, b):
        ce = optax.softmax_cross_entropy_with_integer_labels(apply(p, X), y)
        return jnp.mean(h["weight"] * ce) + l2 * (jnp.sum(p["w"] ** 2) + jnp.sum(p["b"] ** 2))

    def outer(p, h, b):
        return optax.softmax_cross_entropy_with_integer_labels(apply(p, Xv), yv).mean()

    test_error = jax.jit(lambda p: jnp.mean(jnp.argmax(apply(p, Xt), -1) != yt))
    return {
        "inner": inner,
        "outer": outer,
        "space": {"weight": H.unit(jnp.full(len(y), 0.5))},
        "params": {"w": jnp.zeros((784, 10)), "b": jnp.zeros(10)},
        "inner_optimizer": optax.sgd(0.5),
        "outer_lr": 0.1,
        "inner_batch": jnp.zeros((1, 1)),
        "outer_batch": jnp.zeros(1),
        "value": lambda state, opt: float(test_error(state.params)),
        "value_name": "test error",
        "hvp_scale": 0.5,
        "nystrom_rho": 0.1,
    }


# ----------------------------------------------------------------------------- methods


def make_method(name: str, problem: dict, args) -> tuple[Any, Any]:
    """``(method, outer_optimizer)`` of ``name`` for ``problem``."""
    adam = optax.adam(problem["outer_lr"])
    scale = problem["hvp_scale"]  # 1 / L: the largest adjoint step that contracts every mode
    if name == "implicit":
        return solvers.Implicit(linear_solver=solvers.cg(maxiter=20, tol=1e-6)), adam
    if name == "soba":
        return solvers.Implicit(linear_solver=solvers.neumann(steps=1, scale=scale)), adam
    if name == "nystrom":
        rho = problem["nystrom_rho"]
        return solvers.Implicit(linear_solver=solvers.nystrom(args.nystrom_rank, rho)), adam
    if name == "truncated":
        return solvers.Truncated(steps=2), adam
    if name == "forward":
        return bilevel.Forward(), adam
    if name == "borep":
        return bilevel.BOREP(adjoint_lr=scale, period=2), bilevel.normalized_momentum(
            problem["outer_lr"]
        )
    raise ValueError(name)


def oracle_calls(name: str, metrics: dict, inner_steps: int, n_hparams: int, args) -> int:
    """Inner gradients + Hessian-vector products of one outer step of ``name``."""
    inner = int(metrics["inner_applied"])
    if name == "implicit":
        return inner + int(metrics["linear_iterations"]) + 2
    if name in ("soba", "borep"):
        return inner + 1 + 2
    if name == "nystrom":
        return inner + args.nystrom_rank + 1 + 2
    if name == "truncated":
        return inner + 2 + 1
    if name == "forward":
        return inner * (1 + n_hparams) + 1
    raise ValueError(name)


def initial_hparams(space, seed: int):
    """The space's initial unconstrained values, perturbed by ``N(0, 0.5^2)`` for seeds > 0."""
    u = H.init(space)
    if seed == 0:
        return u
    leaves, treedef = jax.tree.flatten(u)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noise = [0.5 * jax.random.normal(k, jnp.shape(a)) for k, a in zip(keys, leaves, strict=True)]
    return jax.tree.unflatten(treedef, [a + n for a, n in zip(leaves, noise, strict=True)])


def run_online(name, problem, args, seeds, bar) -> list[dict]:
    """One compiled tuner of ``name``; one run per seed (seeds move the initial hyperparameters)."""
    if name == "maid":
        tuner = bilevel.MAID(
            problem["inner"],
            problem["outer"],
            space=problem["space"],
            inner_optimizer=problem["inner_optimizer"],
        )
        inner_b = problem["inner_batch"][0]  # MAID takes the full data, not stacked batches
        cost = lambda metrics, n_h, total: int(metrics["cumulative_cost"])
    else:
        method, outer_opt = make_method(name, problem, args)
        tuner = bilevel.BilevelOptimizer(
            problem["inner"],
            problem["outer"],
            inner_optimizer=problem["inner_optimizer"],
            outer_optimizer=outer_opt,
            space=problem["space"],
            method=method,
            inner_steps=args.inner_steps,
        )
        inner_b = problem["inner_batch"]
        cost = lambda metrics, n_h, total: (
            total + oracle_calls(name, metrics, args.inner_steps, n_h, args)
        )
    step = jax.jit(tuner.step)
    outer_b = problem["outer_batch"]
    runs = []
    for seed in seeds:
        state = tuner.init(problem["params"], initial_hparams(problem["space"], seed))
        if not runs:
            jax.block_until_ready(step(state, inner_b, outer_b))  # compile outside the clock
        n_h = sum(np.size(a) for a in jax.tree.leaves(state.hparams))
        value = lambda state: problem["value"](state, tuner)
        rows = [{"step": 0, "seconds": 0.0, "oracle_calls": 0, "value": value(state)}]
        wall, calls = 0.0, 0
        for t in range(1, args.outer_steps + 1):
            t0 = time.perf_counter()
            state, metrics = step(state, inner_b, outer_b)
            jax.block_until_ready(state.hparams)
            wall += time.perf_counter() - t0
            calls = cost(metrics, n_h, calls)
            if t % args.eval_every == 0 or t == args.outer_steps:
                rows.append(
                    {"step": t, "seconds": wall, "oracle_calls": calls, "value": value(state)}
                )
            bar.update(1)
        runs.append({"rows": rows, "skipped": int(state.skipped), "seed": seed})
    return runs


# ----------------------------------------------------------------------------- summary, plots


def _curves(runs: list[dict], key: str, grid: np.ndarray) -> np.ndarray:
    """Each run's value interpolated (step-wise) on ``grid`` of ``key`` (seconds or calls)."""
    out = []
    for run in runs:
        xs = np.asarray([r[key] for r in run["rows"]], float)
        ys = np.asarray([r["value"] for r in run["rows"]], float)
        idx = np.clip(np.searchsorted(xs, grid, side="right") - 1, 0, len(xs) - 1)
        out.append(ys[idx])
    return np.asarray(out)


def plot_problem(path, problem_name, value_name, results, floor):
    plt = _common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for ax, key, label in (
        (axes[0], "seconds", "wall time [s] (compilation and evaluation excluded)"),
        (axes[1], "oracle_calls", "oracle calls (inner gradients + Hessian-vector products)"),
    ):
        for method, runs in results.items():
            end = max(r["rows"][-1][key] for r in runs)
            grid = (
                np.linspace(0, end, 200) if key == "seconds" else np.geomspace(1, max(end, 2), 200)
            )
            ys = _curves(runs, key, grid) - floor
            med, lo, hi = (np.quantile(ys, q, axis=0) for q in (0.5, 0.25, 0.75))
            c = _common.color(method)
            ax.plot(grid, np.maximum(med, 1e-12), color=c, label=method)
            ax.fill_between(grid, np.maximum(lo, 1e-12), np.maximum(hi, 1e-12), color=c, alpha=0.2)
        ax.set_yscale("log")
        if key == "oracle_calls":
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(value_name)
        ax.grid(alpha=0.3)
    axes[0].set_title(f"{problem_name}: median and quartiles over seeds, vs time")
    axes[1].set_title(f"{problem_name}: vs oracle calls")
    axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5))
    _common.save_figure(fig, path)


def main(argv=None):
    parser = _common.make_parser("bench_bilevel_methods", __doc__.split("\n\n")[0])
    parser.add_argument(
        "--problems", default=",".join(PROBLEMS), help="comma-separated: " + ",".join(PROBLEMS)
    )
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated: " + ",".join(METHODS)
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds per method (benchopt: 5)")
    parser.add_argument("--outer-steps", type=int, default=150, help="outer steps per run")
    parser.add_argument("--inner-steps", type=int, default=10, help="inner steps per outer step")
    parser.add_argument("--eval-every", type=int, default=10, help="outer steps between evals")
    parser.add_argument(
        "--nystrom-rank", type=int, default=10, help="columns of the Nystrom solver"
    )
    parser.add_argument(
        "--noise", type=float, default=0.7, help="label noise of the cleaning problem"
    )
    parser.add_argument("--ijcnn", action="store_true", help="logreg on a 50k x 22 synthetic set")
    args = parser.parse_args(argv)
    if args.smoke:  # every method on the quadratic problem, in seconds
        args.seeds, args.outer_steps, args.inner_steps, args.eval_every = 2, 4, 3, 2
        args.nystrom_rank, args.problems = 3, "quadratic"
    problems = _common.parse_choices(parser, args.problems, PROBLEMS, "problem")
    methods = _common.parse_choices(parser, args.methods, METHODS, "method")
    if "maid" in methods and not hasattr(bilevel, "MAID"):
        methods.remove("maid")
    out = _common.results_dir(args)
    start = time.perf_counter()

    plan = [
        (p, m)
        for p in problems
        for m in methods
        if not (p == "cleaning" and m in DETERMINISTIC_ONLY)
    ]
    bar = _common.progress(
        total=len(plan) * args.seeds * args.outer_steps, desc="bench_bilevel_methods",
        disable=args.no_progress,
    )  # fmt: skip
    results: dict[str, dict[str, list]] = {p: {} for p in problems}
    seeds = list(range(args.seeds))
    built: dict[str, dict] = {}
    for p, m in plan:
        if p not in built:
            _common.phase(f"building the {p} problem", quiet=args.no_progress)
            if p == "quadratic":
                built[p] = quadratic_problem(args.seed)
            elif p == "logreg":
                built[p] = logreg_problem(args.seed, args.ijcnn)
            else:
                built[p] = cleaning_problem(args.seed, args.noise, 300 if args.smoke else 3000)
        bar.set_postfix_str(f"{p}/{m}")
        results[p][m] = run_online(m, built[p], args, seeds, bar)
    bar.close()

    table, summary_rows = [], []
    for p in problems:
        floor = 0.0
        if p == "logreg":  # gap to the best value any run reached
            floor = min(
                r["value"] for runs in results[p].values() for run in runs for r in run["rows"]
            )
        value_name = {
            "quadratic": "F(x) - F*",
            "logreg": "val. loss - best",
            "cleaning": "test error",
        }[p]
        for m, runs in results[p].items():
            row = {"problem": p, "method": m, "value": value_name}
            for frac in (0.25, 0.5, 1.0):
                step = round(frac * args.outer_steps)
                vals = []
                for run in runs:
                    rs = [r for r in run["rows"] if r["step"] <= step]
                    vals.append(rs[-1]["value"] - floor)
                row[f"@{int(frac * 100)}%"] = float(np.median(vals))
            row["seconds"] = float(np.median([run["rows"][-1]["seconds"] for run in runs]))
            row["oracle_calls"] = int(np.median([run["rows"][-1]["oracle_calls"] for run in runs]))
            row["skipped"] = int(sum(run["skipped"] for run in runs))
            table.append(row)
        plot_problem(out / f"{p}.png", p, value_name, results[p], floor)
        best = min((r for r in table if r["problem"] == p), key=lambda r: r["@100%"])
        summary_rows.append(
            {
                "what": f"{p}: median {value_name} after {args.outer_steps} outer steps "
                f"({args.seeds} seeds), per method",
                "result": ", ".join(
                    f"{r['method']} {r['@100%']:.3g}" for r in table if r["problem"] == p
                )
                + f" (best: {best['method']})",
                "target": "-",
            }
        )
    _common.save_json(
        out / "results.json", {"args": vars(args), "results": results, "table": table}
    )
    _common.save_csv(out / "table.csv", table)
    _common.print_table(table, title="median over seeds at a quarter, half and all of the budget")
    wall = time.perf_counter() - start
    _common.write_summary(
        out, "bench_bilevel_methods", summary_rows, seconds=wall, smoke=args.smoke
    )
    _common.done(out, wall)
    return {"results": results, "table": table}


if __name__ == "__main__":
    main()
