"""iMAML vs MAML vs first-order MAML on few-shot sinusoid regression: meta-test MSE and memory.

Tasks as in MAML (Finn et al., ICML 2017): ``y = A sin(x - phase)`` with ``A ~ U[0.1, 5]``,
``phase ~ U[0, pi]``, ``x ~ U[-5, 5]``; each task gives a K-shot support set (K = 10) to adapt on
and query points to score the adapted model. The model is a 1-40-40-1 ReLU MLP; its initial
weights ``theta`` (MAML's initialization: truncated normal, standard deviation 0.01) are
meta-learned by Adam on meta-batches of tasks, the tasks of a batch ``jax.vmap``-ped through
``solvers.argmin``. Every method adapts by ``--inner-steps`` steps of SGD with MAML's step
``--inner-lr`` = 0.01, started at ``theta``; iMAML's steps backtrack (halved until its objective
decreases, Armijo; never above 0.01). Its implicit meta-gradient is that of the solved inner
problem and does not see the inner optimizer, so nothing keeps meta-training away from
initializations where a fixed step diverges: without backtracking its meta-test MSE after 10
steps reached 1e6 in the default run.

- iMAML (Rajeswaran et al., NeurIPS 2019): the inner problem is
  ``argmin_phi L_support(phi) + (lam / 2) ||phi - theta||^2`` and its meta-gradient, by the
  implicit function theorem, ``(I + H / lam)^{-1} grad L_query(phi)``, solved by CG
  (``solvers.Implicit(linear_solver=solvers.cg(maxiter=--cg-iters))``; capped as in the paper,
  so the solve is inexact by design). The inner steps are not differentiated. The implicit
  meta-gradient is that of the *solved* proximal problem: with ``lam = 20 ~ 1 / (steps x lr)``
  its solution moves about as far as MAML's 5 steps (to first order) and the steps cover at
  least ``1 - (1 - lr lam)^5 = 67%`` of the way to it; with ``lam = 1`` they cover 5% and iMAML
  barely learned to adapt in a trial run (query MSE 3.8 after 10 steps).
- MAML: ``solvers.Unrolled()``, reverse mode through every inner step (second order).
- first-order MAML: ``grad L_query(phi)`` applied to ``theta`` (the adaptation is not
  differentiated).
- pretrained: one network trained on the task mixture without adaptation, then adapted at test
  time like MAML: MAML's baseline. Before adaptation it is the best zero-shot predictor (the
  mean function of the tasks), the zero-shot baseline of the plot.

All methods run the same number of meta-iterations on the same task stream. Meta-test: fresh
tasks, mean squared error on ``--test-query`` points after 0 ... ``--test-steps`` adaptation steps
(each method's own rule; iMAML keeps its proximal term), with 95% confidence intervals over the
tasks. Memory: XLA's temporary buffer size (``memory_analysis().temp_size_in_bytes`` of the
compiled program) of one meta-gradient over a meta-batch as the number of inner steps grows:
MAML stores every step, iMAML none (target: flat within 10%, and the MAML / iMAML ratio at the
largest count).

    python -m experiments.imaml_sinusoid            # default
    python -m experiments.imaml_sinusoid --smoke    # seconds, for the test suite
"""

from __future__ import annotations

import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import solvers
from experiments import _common

NAME = "imaml_sinusoid"
METHODS = ("imaml", "maml", "fomaml", "pretrained")
LABELS = {
    "imaml": "iMAML (implicit, CG)",
    "maml": "MAML (unrolled)",
    "fomaml": "first-order MAML",
    "pretrained": "pretrained (no meta-learning)",
}
# Colours from the shared palette: iMAML is the implicit method, MAML the unrolled one.
COLORS = {
    "imaml": _common.color("implicit"),
    "maml": _common.color("unrolled"),
    "fomaml": _common.color(LABELS["fomaml"]),
    "pretrained": _common.color("baseline"),
}
MARKERS = {"imaml": "o", "maml": "s", "fomaml": "^", "pretrained": "x"}
MEMORY_METHODS = ("imaml", "maml", "fomaml")
FLAT_TOLERANCE = 0.10  # iMAML's memory: max / min over the inner-step counts <= 1.1
AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, np.pi)
X_RANGE = (-5.0, 5.0)


# ----------------------------------------------------------------------------- tasks and model


def sample_tasks(key, n_tasks: int, shots: int, query: int):
    """``n_tasks`` sinusoid tasks: ``(xs, ys, xq, yq)``, each of shape ``(n_tasks, points)``."""
    ka, kp, kx = jax.random.split(key, 3)
    amp = jax.random.uniform(ka, (n_tasks, 1), minval=AMPLITUDE[0], maxval=AMPLITUDE[1])
    phase = jax.random.uniform(kp, (n_tasks, 1), minval=PHASE[0], maxval=PHASE[1])
    x = jax.random.uniform(kx, (n_tasks, shots + query), minval=X_RANGE[0], maxval=X_RANGE[1])
    y = amp * jnp.sin(x - phase)
    return x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:]


def init_params(key, hidden: int, std: float = 0.01):
    """1-hidden-hidden-1 ReLU MLP (a list of ``{"w", "b"}`` layers) initialized as in MAML's
    reference code: truncated normal weights of standard deviation ``std``, zero biases.

    (He initialization makes the support loss so curved on ``x`` in [-5, 5] that SGD with
    MAML's step 0.01 diverges from it.)
    """
    sizes = [1, hidden, hidden, 1]
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {
            "w": std * jax.random.truncated_normal(k, -2.0, 2.0, (a, b)),
            "b": jnp.zeros(b),
        }
        for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def mse(params, x, y):
    """Mean squared error of the MLP on points ``x`` (shape ``(n,)``) against ``y``."""
    return jnp.mean((_common.dense_mlp(params, x[:, None])[:, 0] - y) ** 2)


def _sq_dist(a, b):
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return sum(jnp.sum((u - v) ** 2) for u, v in pairs)


def proximal(phi, theta, x, y, lam):
    """iMAML's inner objective ``L_support(phi) + (lam / 2) ||phi - theta||^2``."""
    return mse(phi, x, y) + 0.5 * lam * _sq_dist(phi, theta)


# ----------------------------------------------------------------------------- the methods


def inner_optimizer(method: str, lr: float) -> optax.GradientTransformation:
    """SGD with step ``lr``; for iMAML the step is halved until the objective decreases
    (Armijo backtracking, never above ``lr``)."""
    if method != "imaml":
        return optax.sgd(lr)
    linesearch = optax.scale_by_backtracking_linesearch(
        max_backtracking_steps=20, decrease_factor=0.5, increase_factor=1.0, max_learning_rate=1.0
    )
    return optax.chain(optax.sgd(lr), linesearch)


def make_adapt(method: str, steps: int, lr: float, lam: float, cg_iters: int):
    """``adapt(theta, xs, ys) -> phi`` of one task, differentiable as ``method`` says."""
    opt = inner_optimizer(method, lr)
    if method == "imaml":
        adjoint = solvers.Implicit(linear_solver=solvers.cg(maxiter=cg_iters, tol=1e-6))

        def adapt(theta, x, y):
            return solvers.argmin(
                proximal, theta, theta, x, y, lam, optimizer=opt, steps=steps, adjoint=adjoint
            )

    elif method == "maml":

        def adapt(theta, x, y):
            return solvers.argmin(
                mse, theta, x, y, optimizer=opt, steps=steps, adjoint=solvers.Unrolled()
            )

    elif method == "fomaml":

        def adapt(theta, x, y):
            frozen = lax.stop_gradient(theta)
            phi = solvers.argmin(
                mse, frozen, x, y, optimizer=opt, steps=steps, adjoint=solvers.Unrolled()
            )
            # d phi / d theta = I: the query gradient at phi is applied to theta as it is.
            return jax.tree.map(lambda t, p, f: t + (p - f), theta, phi, frozen)

    elif method == "pretrained":

        def adapt(theta, x, y):
            del x, y
            return theta

    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return adapt


def make_meta_loss(adapt):
    """Mean query MSE over a meta-batch of tasks, the tasks vmapped through ``adapt``."""

    def meta_loss(theta, xs, ys, xq, yq):
        phis = jax.vmap(adapt, in_axes=(None, 0, 0))(theta, xs, ys)
        return jnp.mean(jax.vmap(mse)(phis, xq, yq))

    return meta_loss


def make_train_chunk(adapt, meta_opt, chunk: int, batch: int, shots: int, query: int):
    """``chunk`` meta-iterations in one compiled ``lax.scan``: ``(theta, opt_state, key) ->
    (theta, opt_state, mean meta-loss of the chunk)``."""
    grad_fn = jax.value_and_grad(make_meta_loss(adapt))

    def chunk_fn(theta, opt_state, key):
        def step(carry, k):
            theta, opt_state = carry
            loss, g = grad_fn(theta, *sample_tasks(k, batch, shots, query))
            updates, opt_state = meta_opt.update(g, opt_state, theta)
            return (optax.apply_updates(theta, updates), opt_state), loss

        (theta, opt_state), losses = lax.scan(
            step, (theta, opt_state), jax.random.split(key, chunk)
        )
        return theta, opt_state, jnp.mean(losses)

    return chunk_fn


def make_evaluate(method: str, lr: float, lam: float, test_steps: int):
    """Query MSE of every test task after ``0 .. test_steps`` steps of ``method``'s adaptation
    (its inner optimizer on its inner objective, as in training):
    ``(theta, xs, ys, xq, yq) -> (n_tasks, test_steps + 1)``."""
    opt = optax.with_extra_args_support(inner_optimizer(method, lr))

    def one(theta, x, y, xq, yq):
        def obj(phi):
            return proximal(phi, theta, x, y, lam) if method == "imaml" else mse(phi, x, y)

        def step(carry, _):
            phi, state = carry
            value, g = jax.value_and_grad(obj)(phi)
            updates, state = opt.update(g, state, phi, value=value, grad=g, value_fn=obj)
            phi = optax.apply_updates(phi, updates)
            return (phi, state), mse(phi, xq, yq)

        _, curve = lax.scan(step, (theta, opt.init(theta)), length=test_steps)
        return jnp.concatenate([mse(theta, xq, yq)[None], curve])

    return jax.vmap(one, in_axes=(None, 0, 0, 0, 0))


def temp_bytes(method, steps, args, theta, batch) -> int:
    """Temporary memory of the compiled meta-gradient over ``batch`` (XLA buffer assignment).

    Compiled with XLA's fast-compile options on CPU (``_common.FAST_COMPILE``, 3-6x faster to
    compile): the buffer sizes are those of the default compilation (equal to the byte for all
    three methods at 5 and 80 inner steps).
    """
    adapt = make_adapt(method, steps, args.inner_lr, args.lam, args.cg_iters)
    fn = jax.jit(jax.grad(make_meta_loss(adapt)), compiler_options=_common.compiler_options(True))
    stats = fn.lower(theta, *batch).compile().memory_analysis()
    return int(getattr(stats, "temp_size_in_bytes", -1)) if stats is not None else -1


# ----------------------------------------------------------------------------- plot


def plot(path, results, memory, args) -> None:
    """Meta-test MSE vs adaptation steps (left) and memory vs inner steps, log-log (right)."""
    plt = _common.pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13.5, 6.2))
    steps = np.arange(args.test_steps + 1)
    for m, r in results.items():
        mean, ci = np.asarray(r["curve"]), np.asarray(r["curve_ci95"])
        ax.plot(steps, mean, color=COLORS[m], marker=MARKERS[m], ms=5, lw=2, label=LABELS[m])
        ax.fill_between(steps, mean - ci, mean + ci, color=COLORS[m], alpha=0.15, lw=0)
    if "pretrained" in results:
        zero_shot = results["pretrained"]["curve"][0]
        _common.target_line(
            ax,
            zero_shot,
            f"zero-shot baseline (pretrained, no adaptation): {zero_shot:.3g}",
            color="0.35",
            ls="--",
        )
    ax.axvline(args.inner_steps, color="0.6", ls=":", lw=1.2, label="inner steps in training")
    ax.set(
        yscale="log",
        xlabel=f"adaptation steps at meta-test (each method's inner rule, {args.shots}-shot support)",
        ylabel="query MSE (log scale)",
        title=f"meta-test MSE, {args.test_tasks} tasks (bands: 95% CI)",
        xlim=(0, args.test_steps),
    )
    ax.set_xticks(steps)
    _common._plain_log_ticks(ax)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8, frameon=False)

    counts = memory["inner_steps"]
    for m in (m for m in MEMORY_METHODS if m in memory):
        values = np.asarray(memory[m], float) / 2**20
        bx.plot(counts, values, color=COLORS[m], marker=MARKERS[m], lw=2, ms=7, label=LABELS[m])
    ratio = memory["maml"][-1] / memory["imaml"][-1]
    bx.text(
        0.97,
        0.45,
        f"at {counts[-1]} inner steps:\nMAML / iMAML = {_common.format_ratio(ratio)}",
        transform=bx.transAxes,
        ha="right",
        va="center",
        fontsize=9,
    )
    bx.set(
        xscale="log",
        yscale="log",
        xlabel="inner steps (log scale)",
        ylabel="temporary memory of one meta-gradient (MiB, log scale)",
        title=f"memory of one meta-gradient (meta-batch of {args.meta_batch} tasks)",
    )
    bx.set_xticks(counts)
    bx.set_xticklabels([str(c) for c in counts])
    bx.minorticks_off()
    from matplotlib import ticker

    bx.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    bx.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8, frameon=False)
    fig.suptitle(
        f"few-shot sinusoid regression ({args.shots}-shot, {args.hidden}-{args.hidden} MLP): "
        f"{args.meta_iters} meta-iterations per method, {args.inner_steps} inner steps"
    )
    _common.save_figure(fig, path, dpi=120)


# ----------------------------------------------------------------------------- main


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv=None):
    wall = time.perf_counter()
    parser = _common.make_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--meta-iters", type=int, default=3000, help="meta-iterations per method")
    parser.add_argument("--meta-batch", type=int, default=16, help="tasks per meta-iteration")
    parser.add_argument("--meta-lr", type=float, default=1e-3, help="Adam step of theta")
    parser.add_argument("--shots", type=int, default=10, help="support points per task (K)")
    parser.add_argument("--query", type=int, default=10, help="query points per training task")
    parser.add_argument("--hidden", type=int, default=40, help="width of the two hidden layers")
    parser.add_argument("--inner-steps", type=int, default=5, help="inner SGD steps in training")
    parser.add_argument("--inner-lr", type=float, default=0.01, help="inner SGD step")
    parser.add_argument(
        "--lam",
        type=float,
        default=20.0,
        help="iMAML proximal strength lambda (about 1 / (inner steps x inner lr): the proximal "
        "solution then moves as far as MAML's inner steps, to first order)",
    )
    parser.add_argument("--cg-iters", type=int, default=5, help="CG iterations of iMAML")
    parser.add_argument("--test-tasks", type=int, default=500, help="meta-test tasks")
    parser.add_argument("--test-query", type=int, default=100, help="query points per test task")
    parser.add_argument("--test-steps", type=int, default=10, help="adaptation steps at meta-test")
    parser.add_argument(
        "--memory-steps",
        type=str,
        default="5,10,20,40,80",
        help="inner-step counts of the memory study (comma-separated)",
    )
    parser.add_argument("--chunk", type=int, default=100, help="meta-iterations per compiled call")
    parser.add_argument(
        "--methods", type=str, default=",".join(METHODS), help="comma-separated subset of methods"
    )
    args = parser.parse_args(argv)
    positive = ("meta_iters", "meta_batch", "shots", "query", "hidden", "inner_steps", "chunk")
    for name in (*positive, "cg_iters", "test_query", "test_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.test_tasks < 2:
        parser.error("--test-tasks must be >= 2 (the confidence intervals)")
    for name in ("meta_lr", "inner_lr", "lam"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    methods = _common.parse_choices(parser, args.methods, METHODS, "method")
    if not {"imaml", "maml"} <= set(methods):
        parser.error("--methods must include imaml and maml (the memory comparison)")
    if args.smoke:  # one training chunk per method, a small meta-batch
        args.meta_iters, args.chunk, args.test_tasks, args.test_query = 10, 10, 20, 20
        args.meta_batch = min(args.meta_batch, 4)
        args.memory_steps = "5,40"
    args.chunk = max(1, min(args.chunk, args.meta_iters))
    args.meta_iters = args.chunk * max(1, round(args.meta_iters / args.chunk))
    try:
        counts = sorted(set(_ints(args.memory_steps)))
    except ValueError:
        parser.error(f"--memory-steps must be comma-separated integers, got {args.memory_steps!r}")
    if len(counts) < 2 or counts[0] < 1:
        parser.error("--memory-steps needs at least two positive counts")
    # Smoke runs compile for compilation speed (their timings mean nothing).
    args.compiler_options = _common.compiler_options(args.smoke)
    # iMAML's CG is capped at --cg-iters iterations on purpose (as in the paper): the solve
    # may stop short of its tolerance, which the library would otherwise report once.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", solvers.ImplicitSolveWarning)
        _run(args, counts, methods, wall)


def _run(args, counts, methods, wall) -> None:
    """The run of :func:`main` on parsed arguments."""
    out = _common.results_dir(args)
    quiet = args.no_progress
    t_phase = time.perf_counter()
    key = jax.random.key(args.seed)
    k_init, k_train, k_test, k_mem = jax.random.split(key, 4)
    theta0 = init_params(k_init, args.hidden)
    meta_opt = optax.adam(args.meta_lr)

    # ---- memory of one meta-gradient as the inner steps grow (compilation only)
    mem_batch = sample_tasks(k_mem, args.meta_batch, args.shots, args.query)
    # The smoke run measures the two methods its test checks.
    memory_methods = ("imaml", "maml") if args.smoke else MEMORY_METHODS
    memory = {"inner_steps": counts, **{m: [] for m in memory_methods}}
    for s in counts:
        _common.phase(f"memory: compiling the meta-gradients with {s} inner steps", quiet=quiet)
        for m in memory_methods:
            memory[m].append(temp_bytes(m, s, args, theta0, mem_batch))
    seconds_memory = time.perf_counter() - t_phase

    # ---- compile the training chunks and the evaluation
    t_phase = time.perf_counter()
    state0 = meta_opt.init(theta0)
    chunks = {}
    test = sample_tasks(k_test, args.test_tasks, args.shots, args.test_query)
    for m in methods:
        _common.phase(f"compiling the meta-training of {LABELS[m]}", quiet=quiet)
        adapt = make_adapt(m, args.inner_steps, args.inner_lr, args.lam, args.cg_iters)
        fn = make_train_chunk(adapt, meta_opt, args.chunk, args.meta_batch, args.shots, args.query)
        jitted = jax.jit(fn, compiler_options=args.compiler_options)
        chunks[m] = jitted.lower(theta0, state0, k_train).compile()
    evaluators = {}  # the plain-SGD methods share one program
    for m in methods:
        rule = "imaml" if m == "imaml" else "sgd"
        if rule not in evaluators:
            ev = jax.jit(
                make_evaluate(m, args.inner_lr, args.lam, args.test_steps),
                compiler_options=args.compiler_options,
            )
            evaluators[rule] = ev.lower(theta0, *test).compile()
        evaluators[m] = evaluators[rule]
    seconds_compile = time.perf_counter() - t_phase

    n_chunks = args.meta_iters // args.chunk
    bar = _common.progress(
        total=n_chunks * args.chunk * len(methods), desc=NAME, unit="meta-it", disable=quiet
    )
    results = {}
    for m in methods:
        theta, opt_state = theta0, state0
        history = []
        seconds = 0.0
        for i in range(n_chunks):
            t0 = time.perf_counter()
            theta, opt_state, loss = chunks[m](theta, opt_state, jax.random.fold_in(k_train, i))
            loss = float(loss)
            seconds += time.perf_counter() - t0
            history.append({"meta_iteration": (i + 1) * args.chunk, "meta_loss": loss})
            bar.update(args.chunk)
        curves = np.asarray(evaluators[m](theta, *test), np.float64)
        # A task whose adaptation diverged is counted, and left out of the mean.
        ok = np.all(np.isfinite(curves), axis=1)
        mean = curves[ok].mean(0)
        ci = 1.96 * curves[ok].std(0, ddof=1) / np.sqrt(max(int(ok.sum()), 1))
        results[m] = {
            "curve": mean,
            "curve_ci95": ci,
            "train_seconds": seconds,
            "ms_per_meta_iteration": 1e3 * seconds / args.meta_iters,
            "history": history,
            "diverged_tasks": int((~ok).sum()),
        }
    bar.close()

    k = args.test_steps
    rows = [
        {
            "method": LABELS[m],
            "mse_0_steps": float(r["curve"][0]),
            "mse_1_step": float(r["curve"][1]),
            f"mse_{k}_steps": float(r["curve"][k]),
            f"ci95_{k}_steps": float(r["curve_ci95"][k]),
            "diverged": r["diverged_tasks"],
            "train_s": r["train_seconds"],
            "ms_per_meta_it": r["ms_per_meta_iteration"],
        }
        for m, r in results.items()
    ]
    ratio = memory["maml"][-1] / memory["imaml"][-1]
    flat = max(memory["imaml"]) / min(memory["imaml"])
    memory_rows = [
        {
            "inner_steps": s,
            **{LABELS[m]: _common.format_bytes(memory[m][i]) for m in memory_methods},
            "MAML / iMAML": _common.format_ratio(memory["maml"][i] / memory["imaml"][i]),
        }
        for i, s in enumerate(counts)
    ]
    record = {
        "config": {k_: v for k_, v in vars(args).items() if k_ not in ("out", "compiler_options")},
        "methods": {m: {"label": LABELS[m], **r} for m, r in results.items()},
        "memory_temp_bytes": memory,
        "memory_ratio_maml_over_imaml": ratio,
        "imaml_memory_max_over_min": flat,
        "phase_seconds": {
            "memory_study_compilation": seconds_memory,
            "training_and_evaluation_compilation": seconds_compile,
            "meta_training": sum(r["train_seconds"] for r in results.values()),
        },
    }
    _common.save_json(out / f"{NAME}.json", record)
    _common.save_csv(out / f"{NAME}.csv", rows)
    _common.save_csv(out / f"{NAME}_memory.csv", memory_rows)
    plot(out / f"{NAME}.png", results, memory, args)

    setup = (
        f"sinusoid {args.shots}-shot, {args.meta_iters} meta-its x {args.meta_batch} tasks, "
        f"{args.inner_steps} inner steps"
    )
    _common.print_table(
        rows,
        title=f"meta-test query MSE over {args.test_tasks} tasks after 0, 1 and {k} adaptation "
        f"steps ({setup}); 0 steps: a meta-learned initialization is not meant to predict "
        "before adapting (the pretrained network is the zero-shot baseline); ci95: half-width "
        "of the 95% interval; diverged: test tasks whose adaptation overflowed; train_s: "
        "meta-training wall time without compilation",
    )
    _common.print_table(
        memory_rows,
        title=f"temporary memory of one meta-gradient (meta-batch of {args.meta_batch}) vs inner "
        f"steps; iMAML max / min {flat:.3f}, MAML / iMAML at {counts[-1]} steps "
        f"{_common.format_ratio(ratio)}",
    )
    summary = [
        {
            "what": f"{setup}: {LABELS[m]} meta-test MSE after {k} steps (meta-training time)",
            "result": f"{r['curve'][k]:.3g} +- {r['curve_ci95'][k]:.2g} "
            f"({r['train_seconds']:.0f} s)",
            "target": "-",
        }
        for m, r in results.items()
    ]
    summary.append(
        {
            "what": f"temporary memory of one meta-gradient ({args.meta_batch} tasks), "
            f"{counts[0]} to {counts[-1]} inner steps: iMAML max / min; MAML / iMAML at "
            f"{counts[-1]}",
            "result": f"{flat:.3f}; {_common.format_ratio(ratio)} "
            f"({_common.format_bytes(memory['maml'][-1])} / "
            f"{_common.format_bytes(memory['imaml'][-1])})",
            "target": f"iMAML flat (max / min <= {1 + FLAT_TOLERANCE:g})",
        }
    )
    wall = time.perf_counter() - wall
    _common.write_summary(out, NAME, summary, seconds=wall, smoke=args.smoke)
    _common.done(out, wall)


if __name__ == "__main__":
    main()
