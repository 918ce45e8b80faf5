"""How the cost of one outer step grows with the model: time and memory of each method vs plain Optax.

One outer step of ``bilevel.BilevelOptimizer`` (``--inner-steps`` inner steps, then one
hypergradient step) is timed against a plain training loop of the same model on the same batches:
``--inner-steps`` jitted ``optax`` steps in one ``lax.scan``, at fixed weight decays. The tuned
hyperparameters are one weight decay per layer kernel (``hparams.log``):

.. math:: L_{train}(w, \\lambda) = \\mathrm{CE}(f_w(x), y) + \\sum_l \\lambda_l \\lVert W_l
   \\rVert^2, \\qquad L_{val}(w) = \\mathrm{CE}(f_w(x_{val}), y_{val})

Models (synthetic Gaussian inputs, 10 random classes; ``--sizes`` sets the parameter counts):

- ``mlp``: 128 - H - H - 10 ReLU MLP (3 decays), batch 128;
- ``resnet``: a small ResNet with BatchNorm on 8x8x3 images, batch 16: conv 3x3/2 (w) - BN -
  ReLU, a residual block of two conv 3x3 (w) - BN, a downsampling block of conv 3x3/2 (2w) - BN
  - conv 3x3 (2w) - BN with a 1x1/2 projection, global average pooling, dense 10 (7 decays). A
  stateful model (``has_state=True``): the inner loss runs in train mode and threads the running
  averages through the steps, the outer loss runs in eval mode.

Methods: implicit (``solvers.Implicit``, CG with ``--cg-iters`` iterations, warm-started; ``tol=0``
and ``ridge=50`` so that it always runs them: CG stops early at a direction of non-positive
curvature, and the Hessians of these networks have negative eigenvalues, so a small damping would
time 3 iterations instead of 10; the iterations run are reported), SOBA (``Implicit`` with one Neumann step), truncated
(``Truncated(steps=2)``), unrolled (``Unrolled()``), unrolled-ckpt
(``Unrolled(checkpoint_every=round(sqrt(n)))``) and forward (``solvers.Forward()``, one tangent
per decay). Inner optimizer: SGD with momentum 0.9 (differentiable, so every method applies).
Also timed: ``inner-only`` (``BilevelOptimizer.warmup``: the same guarded inner steps without the
hypergradient) and, to profile the implicit step, one inner gradient and one Hessian-vector
product (forward-over-reverse) on an inner batch.

Reported per model and size: the median per-round ratio of an outer step's time to the plain
loop's (``_common.timeit``, interleaved rounds), and the temporary memory XLA assigns to the
compiled step (``compile().memory_analysis().temp_size_in_bytes``: the intermediates, not the
arguments and outputs) against the plain loop's; the method's persistent memory (adjoint,
tangents) is part of the state and reported as ``state`` (argument bytes). A second table gives
the temporary memory vs the number of inner steps at one size (compiled only, not run).
Goal: at >= 1e6 parameters an implicit outer step (10 inner steps + CG 10, warm-started) costs
<= 3x ten plain steps, and only unrolled without checkpointing needs memory that grows with the
number of inner steps.

    python -m experiments.bench_scale                          # 1e4, 1e5, 1e6 on a CPU
    python -m experiments.bench_scale --sizes 1e4,1e5,1e6,1e7  # up to 1e7
    python -m experiments.bench_scale --device gpu             # on the first GPU
    python -m experiments.bench_scale --smoke
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import bilevel
import solvers
from bilevel import hparams as H
from experiments import _common

NAME = "bench_scale"
MODELS = ("mlp", "resnet")
METHODS = ("implicit", "soba", "truncated", "unrolled", "unrolled-ckpt", "forward")
PLAIN, INNER = "plain", "inner-only"
LABELS = {
    "implicit": "implicit (CG, warm start)",
    "soba": "SOBA (1 Neumann step)",
    "truncated": "truncated (K=2)",
    "unrolled": "unrolled",
    "unrolled-ckpt": "unrolled, checkpointed (k = sqrt(n))",
    "forward": "forward (RTHO)",
    PLAIN: "plain optax loop",
    INNER: "inner steps only (warmup)",
}
# The checkpointed variant of unrolled gets a colour of its own (dark olive, next to unrolled's
# light green); the reference loops are grey.
_common.PALETTE.setdefault("unrolled-ckpt", "#637939")
_common.PALETTE.setdefault("plain", "#7f7f7f")
_common.PALETTE.setdefault("inner-only", "#bdbdbd")
TARGET = 3.0  # an implicit outer step <= 3x the plain steps, at >= 1e6 parameters
MLP_IN, RESNET_HW, CLASSES = 128, 8, 10


# ----------------------------------------------------------------------------- models


class ResNet(nnx.Module):
    """A small ResNet with BatchNorm: stem, one identity block, one downsampling block, head."""

    def __init__(self, width: int, *, rngs: nnx.Rngs):
        w = width
        conv = lambda a, b, k=3, s=1: nnx.Conv(a, b, (k, k), strides=s, use_bias=False, rngs=rngs)
        bn = lambda c: nnx.BatchNorm(c, rngs=rngs)
        self.stem, self.bn0 = conv(3, w, s=2), bn(w)
        self.b1c1, self.bn1 = conv(w, w), bn(w)
        self.b1c2, self.bn2 = conv(w, w), bn(w)
        self.b2c1, self.bn3 = conv(w, 2 * w, s=2), bn(2 * w)
        self.b2c2, self.bn4 = conv(2 * w, 2 * w), bn(2 * w)
        self.proj, self.bn5 = conv(w, 2 * w, k=1, s=2), bn(2 * w)
        self.head = nnx.Linear(2 * w, CLASSES, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn0(self.stem(x)))
        y = nnx.relu(self.bn1(self.b1c1(x)))
        x = nnx.relu(x + self.bn2(self.b1c2(y)))
        y = nnx.relu(self.bn3(self.b2c1(x)))
        x = nnx.relu(self.bn5(self.proj(x)) + self.bn4(self.b2c2(y)))
        return self.head(x.mean(axis=(1, 2)))


RESNET_KERNELS = ("stem", "b1c1", "b1c2", "b2c1", "b2c2", "proj", "head")


def mlp_count(width: int) -> int:
    """Parameters of the 128 - H - H - 10 MLP."""
    return MLP_IN * width + width + width * width + width + width * CLASSES + CLASSES


def resnet_count(width: int) -> int:
    """Parameters of :class:`ResNet` of width ``w`` (kernels, BatchNorm scales and biases, head)."""
    w = width
    kernels = 27 * w + 9 * w * w * 2 + 18 * w * w + 36 * w * w + 2 * w * w
    return kernels + 2 * (w + w + w + 2 * w + 2 * w + 2 * w) + 2 * w * CLASSES + CLASSES


def width_for(model: str, target: float) -> int:
    """The width whose parameter count is closest to ``target`` (in ratio)."""
    count = mlp_count if model == "mlp" else resnet_count
    widths = range(1, 20_000)
    return min(widths, key=lambda w: abs(math.log(count(w) / target)))


class Problem:
    """One model at one size: its losses, data, the plain loop and a tuner per method."""

    def __init__(self, model: str, target: float, args, inner_steps: int):
        self.name, self.args, self.inner_steps = model, args, inner_steps
        self.width = width_for(model, target)
        key = _common.stn_key(args.seed)
        rng = np.random.default_rng(args.seed)  # NumPy data: no PRNG programs to compile
        if model == "mlp":
            net = _common.MLP([MLP_IN, self.width, self.width, CLASSES], rngs=nnx.Rngs(key))
            self.apply, self.params = bilevel.nnx_apply_fn(net)
            self.model_state = ()
            shape, batch = (MLP_IN,), args.mlp_batch
            self.kernels = [("layers", i) for i in range(3)]
        else:
            net = ResNet(self.width, rngs=nnx.Rngs(key))
            self.train_fn, self.params, self.model_state = bilevel.nnx_apply_fn(
                net, with_state=True, mode="train"
            )
            self.eval_fn, _, _ = bilevel.nnx_apply_fn(net, with_state=True, mode="eval")
            shape, batch = (RESNET_HW, RESNET_HW, 3), args.resnet_batch
            self.kernels = [(k,) for k in RESNET_KERNELS]
        self.stateful = model == "resnet"
        self.n_params = sum(int(np.size(a)) for a in jax.tree.leaves(self.params))
        n = inner_steps
        self.inner_batches = (
            jnp.asarray(rng.standard_normal((n, batch, *shape), np.float32)),
            jnp.asarray(rng.integers(0, CLASSES, (n, batch)), jnp.int32),
        )
        self.outer_batch = (
            jnp.asarray(rng.standard_normal((batch, *shape), np.float32)),
            jnp.asarray(rng.integers(0, CLASSES, batch), jnp.int32),
        )
        self.space = {"wd": H.log(jnp.full(len(self.kernels), args.init_wd))}
        self.tx = optax.sgd(args.lr, momentum=0.9)

    # -- losses
    def _kernel(self, p, path):
        node = p
        for k in path:
            node = node[k]
        return node["kernel"][...]

    def decay(self, p, h):
        return sum(
            h["wd"][i] * jnp.sum(self._kernel(p, k) ** 2) for i, k in enumerate(self.kernels)
        )

    def inner_loss(self, p, h, batch, s=None):
        x, y = batch
        if not self.stateful:
            return _common.xent(self.apply(p, x), y) + self.decay(p, h)
        logits, s = self.train_fn(p, s, x)
        return _common.xent(logits, y) + self.decay(p, h), s

    def outer_loss(self, p, h, batch, s=None):
        x, y = batch
        if not self.stateful:
            return _common.xent(self.apply(p, x), y)
        logits, s = self.eval_fn(p, s, x)
        return _common.xent(logits, y), s

    # -- programs
    def method(self, name: str, n: int):
        a = self.args
        if name == "implicit":
            solver = solvers.cg(maxiter=a.cg_iters, tol=0.0, ridge=a.cg_ridge)
            return solvers.Implicit(linear_solver=solver, warm_start=True)
        if name == "soba":
            return solvers.Implicit(linear_solver=solvers.neumann(steps=1, scale=a.lr))
        if name == "truncated":
            return solvers.Truncated(steps=min(2, n))
        if name == "unrolled":
            return solvers.Unrolled()
        if name == "unrolled-ckpt":
            return solvers.Unrolled(checkpoint_every=max(1, round(math.sqrt(n))))
        if name == "forward":
            return solvers.Forward()
        raise ValueError(f"unknown method {name!r}; choose from {METHODS}")

    def tuner(self, name: str, n: int) -> bilevel.BilevelOptimizer:
        return bilevel.BilevelOptimizer(
            self.inner_loss,
            self.outer_loss,
            inner_optimizer=self.tx,
            outer_optimizer=optax.adam(1e-2),
            space=self.space,
            method=self.method(name, n),
            inner_steps=n,
            has_state=self.stateful,
        )

    def init_state(self, opt: bilevel.BilevelOptimizer):
        if self.stateful:
            return opt.init(self.params, model_state=self.model_state)
        return opt.init(self.params)

    def batches(self, n: int):
        """``n`` stacked inner batches (the first ones repeated cyclically) and the outer batch."""
        reps = -(-n // self.inner_steps)
        inner = jax.tree.map(lambda a: jnp.concatenate([a] * reps)[:n], self.inner_batches)
        return inner, self.outer_batch

    def plain_fn(self):
        """``(params, opt_state, model_state, batches, h) -> ...``: the plain Optax loop."""
        tx = self.tx

        def loss(p, h, b, s):
            if self.stateful:
                return self.inner_loss(p, h, b, s)
            return self.inner_loss(p, h, b), s

        def run(params, opt_state, model_state, batches, h):
            def body(carry, b):
                p, o, s = carry
                (value, s), g = jax.value_and_grad(loss, has_aux=True)(p, h, b, s)
                updates, o = tx.update(g, o, p)
                return (optax.apply_updates(p, updates), o, s), value

            return jax.lax.scan(body, (params, opt_state, model_state), batches)

        return run

    def hparams(self):
        return {"wd": jnp.full(len(self.kernels), self.args.init_wd)}

    def grad_and_hvp(self):
        """One inner gradient and one Hessian-vector product on the first inner batch."""
        b = jax.tree.map(lambda a: a[0], self.inner_batches)
        h = self.hparams()

        def f(p):
            if self.stateful:
                return self.inner_loss(p, h, b, self.model_state)[0]
            return self.inner_loss(p, h, b)

        grad = jax.grad(f)
        hvp = lambda p, v: jax.jvp(grad, (p,), (v,))[1]
        return grad, hvp


# ----------------------------------------------------------------------------- measuring


def memory(compiled) -> dict:
    """Temporary, argument and output bytes of a compiled program (``memory_analysis``)."""
    m = compiled.memory_analysis()
    return {
        "temp_bytes": int(m.temp_size_in_bytes),
        "arg_bytes": int(m.argument_size_in_bytes),
        "out_bytes": int(m.output_size_in_bytes),
    }


def compile_programs(prob: Problem, methods, options, bar) -> dict:
    """Compiled plain loop, inner-only loop, gradient, HVP and one outer step per method.

    Returns ``{name: (compiled, args)}``; each compiled program has run once, untimed, on its
    arguments (warm caches); the methods' arguments are the state after that first step, so the
    timed steps warm-start from a real adjoint.
    """
    n = prob.inner_steps
    inner, outer = prob.batches(n)
    out = {}

    def add(name, fn, *args):
        compiled = jax.jit(fn).lower(*args).compile(options)
        out[name] = (compiled, args)
        bar.update()
        return compiled

    def add_and_run(name, fn, *args):
        jax.block_until_ready(add(name, fn, *args)(*args))  # the untimed first call

    tx_state = prob.tx.init(prob.params)
    add_and_run(
        PLAIN, prob.plain_fn(), prob.params, tx_state, prob.model_state, inner, prob.hparams()
    )
    grad, hvp = prob.grad_and_hvp()
    add_and_run("grad", grad, prob.params)
    add_and_run("hvp", hvp, prob.params, prob.params)
    opt = prob.tuner("implicit", n)
    state = prob.init_state(opt)
    add_and_run(INNER, lambda s, b: opt.warmup(s, b)[0], state, inner)
    for name in methods:
        opt = prob.tuner(name, n)
        state = prob.init_state(opt)
        step = add(name, opt.step, state, inner, outer)
        state, metrics = step(state, inner, outer)
        out[name] = (step, (state, inner, outer))
        out[name + "/metrics"] = jax.device_get(metrics)
    return out


def time_programs(programs: dict, names, repeats: int, bar, min_ms: float = 300.0) -> dict:
    """:func:`_common.timeit` of each named compiled program on its arguments, in ms per call.

    Each program runs ``calls`` times back to back in every round, ``calls`` chosen so that the
    plain loop's share of a round lasts about ``min_ms`` (many calls of the fast programs of a
    small model, one of a large one): the per-round ratios then average over enough calls to be
    steady on a shared machine. The times are divided by ``calls``.
    """
    c, a = programs[PLAIN]
    t0 = time.perf_counter()
    jax.block_until_ready(c(*a))
    calls = max(1, math.ceil(min_ms / (1e3 * (time.perf_counter() - t0))))

    def repeated(c, a):
        def run():
            for _ in range(calls):
                out = jax.block_until_ready(c(*a))
            return out

        return run

    fns = {k: repeated(*programs[k]) for k in names}
    times = _common.timeit(fns, repeats, bar=bar, warmup=0)
    for t in times.values():
        for key in ("median_ms", "min_ms", "max_ms"):
            t[key] /= calls
        t["times_ms"] = [v / calls for v in t["times_ms"]]
        t["calls"] = calls
    return times


def measure(prob: Problem, methods, args, options, bar) -> list[dict]:
    """One row per program of ``prob``: time (ms, ratio to plain) and memory (ratio to plain)."""
    programs = compile_programs(prob, methods, options, bar)
    names = [PLAIN, INNER, "grad", "hvp", *methods]
    times = time_programs(programs, names, args.repeats, bar)
    plain_mem = memory(programs[PLAIN][0])
    grad_ms, hvp_ms = times["grad"]["median_ms"], times["hvp"]["median_ms"]
    rows = []
    for name in [PLAIN, INNER, *methods]:
        mem = memory(programs[name][0])
        # What persists between steps: parameters, optimizer and model state (plain); the whole
        # BilevelState (adds hyperparameters, outer state, the adjoint or the tangents).
        state = programs[name][1][:3] if name == PLAIN else programs[name][1][0]
        state_bytes = sum(a.nbytes for a in jax.tree.leaves(state) if hasattr(a, "nbytes"))
        metrics = programs.get(name + "/metrics", {})
        rows.append(
            {
                "model": prob.name,
                "width": prob.width,
                "params": prob.n_params,
                "method": name,
                "ms": times[name]["median_ms"],
                "time_ratio": _common.paired_ratio(times, name, PLAIN),
                "temp_bytes": mem["temp_bytes"],
                "mem_ratio": mem["temp_bytes"] / max(plain_mem["temp_bytes"], 1),
                "state_bytes": state_bytes,
                "arg_bytes": mem["arg_bytes"],
                "grad_ms": grad_ms,
                "hvp_ms": hvp_ms,
                "linear_iterations": int(metrics.get("linear_iterations", 0)),
                "status": solvers.Status(int(metrics["status"])).name if metrics else "-",
                "skipped": int(metrics.get("skipped", 0)),
                "calls_per_round": times[name]["calls"],
                "times_ms": times[name]["times_ms"],
            }
        )
    return rows


def memory_vs_steps(prob, methods, steps, options, bar, cache) -> list[dict]:
    """Temporary bytes of the compiled outer step (and the plain loop) vs the inner steps."""
    rows = []
    for n in steps:
        inner, outer = prob.batches(n)
        key = (prob.name, prob.n_params, n)
        for name in [PLAIN, *methods]:
            if (*key, name) in cache:
                temp = cache[(*key, name)]
            else:
                if name == PLAIN:
                    fn = prob.plain_fn()
                    call_args = (
                        prob.params,
                        prob.tx.init(prob.params),
                        prob.model_state,
                        inner,
                        prob.hparams(),
                    )
                else:
                    opt = prob.tuner(name, n)
                    fn, call_args = opt.step, (prob.init_state(opt), inner, outer)
                compiled = jax.jit(fn).lower(*call_args).compile(options)
                temp = memory(compiled)["temp_bytes"]
                bar.update()
            rows.append(
                {
                    "model": prob.name,
                    "params": prob.n_params,
                    "inner_steps": n,
                    "method": name,
                    "temp_bytes": temp,
                }
            )
    return rows


# ----------------------------------------------------------------------------- report


def growth(rows: list[dict], model: str, method: str) -> float:
    """Temporary bytes at the most inner steps / at the fewest (1.0: flat)."""
    sel = sorted(
        (r for r in rows if r["model"] == model and r["method"] == method),
        key=lambda r: r["inner_steps"],
    )
    return sel[-1]["temp_bytes"] / max(sel[0]["temp_bytes"], 1)


def plot_scale(path, rows, models, methods, inner_steps, device):
    """Log-log: time ratio (top) and temporary memory (bottom) vs parameters, one column per model."""
    plt = _common.pyplot()
    width = 5.0 * len(models) + 3.4
    fig, axes = plt.subplots(2, len(models), figsize=(width, 8.4), squeeze=False, sharex="col")
    for j, model in enumerate(models):
        sel = [r for r in rows if r["model"] == model]
        for name in [PLAIN, INNER, *methods]:
            pts = sorted((r for r in sel if r["method"] == name), key=lambda r: r["params"])
            x = [r["params"] for r in pts]
            style = {
                "color": _common.color(name),
                "marker": "o",
                "ls": "--" if name in (PLAIN, INNER, "unrolled-ckpt") else "-",
                "label": LABELS[name],
            }
            if name != PLAIN:
                axes[0, j].plot(x, [r["time_ratio"] for r in pts], **style)
            axes[1, j].plot(x, [r["temp_bytes"] / 2**20 for r in pts], **style)
        ax = axes[0, j]
        _common.target_line(ax, TARGET, f"goal for implicit: {TARGET:g}x at >= 1e6 parameters")
        ax.axhline(1.0, color=_common.color(PLAIN), ls="--", lw=1.2, label=LABELS[PLAIN])
        ax.set(
            yscale="log",
            ylabel=f"outer step time / {inner_steps} plain steps",
            title=f"{model}: time of one outer step vs plain Optax",
        )
        axes[1, j].set(
            xscale="log",
            yscale="log",
            xlabel="parameters",
            ylabel="compiled temporary memory (MiB)",
            title=f"{model}: temporary memory of the compiled step",
        )
        params = [r["params"] for r in sel]
        lo, hi = min(params) / 2, max(params) * 2
        axes[1, j].set_xlim(lo, hi)
        if hi > 1e6:
            for a in axes[:, j]:
                a.axvspan(max(1e6, lo), hi, color="0.93", zorder=0)
        for a in axes[:, j]:
            a.margins(y=0.08)
            a.grid(alpha=0.3, which="both")
            _log_ticks(a)
    handles, labels = [], []
    for a in axes.ravel():
        for h, lab in zip(*a.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="center right", frameon=False, fontsize=9)
    fig.suptitle(
        f"One outer step ({inner_steps} inner steps + hypergradient) vs model size, {device}\n"
        "shaded: >= 1e6 parameters, where the goal applies"
    )
    fig.tight_layout(rect=(0, 0, 1 - 3.4 / width, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_steps(path, rows, models, methods):
    """Temporary memory vs number of inner steps, one panel per model."""
    plt = _common.pyplot()
    fig, axes = plt.subplots(1, len(models), figsize=(5.6 * len(models) + 2.6, 4.4), squeeze=False)
    for j, model in enumerate(models):
        ax = axes[0, j]
        sel = [r for r in rows if r["model"] == model]
        for name in [PLAIN, *methods]:
            pts = sorted((r for r in sel if r["method"] == name), key=lambda r: r["inner_steps"])
            ax.plot(
                [r["inner_steps"] for r in pts],
                [r["temp_bytes"] / 2**20 for r in pts],
                color=_common.color(name),
                marker="o",
                ls="--" if name in (PLAIN, "unrolled-ckpt") else "-",
                label=LABELS[name],
            )
        params = sel[0]["params"] if sel else 0
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="inner steps per outer step",
            ylabel="compiled temporary memory (MiB)",
            title=f"{model} ({params:.2g} parameters)",
        )
        steps = sorted({r["inner_steps"] for r in sel})
        ax.set_xticks(steps, [str(s) for s in steps])
        ax.minorticks_off()
        ax.grid(alpha=0.3, which="both")
        _log_ticks(ax, x=False)
    handles, labels = axes[0, -1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", frameon=False, fontsize=9)
    fig.suptitle("Temporary memory of one compiled outer step vs inner steps (flat: O(1) in steps)")
    fig.tight_layout(rect=(0, 0, 1 - 2.6 / (5.6 * len(models) + 2.6), 0.93))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _log_ticks(ax, x: bool = True) -> None:
    """Plain-number tick labels on log axes (minor ticks at 2 and 5 labelled on the y axis)."""
    from matplotlib import ticker

    ax.yaxis.set_minor_locator(ticker.LogLocator(subs=(2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%g"))
    if x:
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.0e}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())


def scale_table(rows) -> list[dict]:
    """The printed table: one row per model, size and program."""
    return [
        {
            "model": r["model"],
            "params": f"{r['params']:.2g}",
            "method": r["method"],
            "ms/outer step": f"{r['ms']:.3g}",
            "time vs plain": _common.format_ratio(r["time_ratio"]),
            "temp memory": _common.format_bytes(r["temp_bytes"]),
            "memory vs plain": _common.format_ratio(r["mem_ratio"]),
            "state": _common.format_bytes(r["state_bytes"]),
        }
        for r in rows
    ]


def steps_table(rows, steps) -> list[dict]:
    """One row per model and method, one column of temporary bytes per number of inner steps."""
    out = []
    keys = sorted({(r["model"], r["method"]) for r in rows}, key=lambda k: (k[0], _order(k[1])))
    for model, method in keys:
        sel = {
            r["inner_steps"]: r["temp_bytes"]
            for r in rows
            if (r["model"], r["method"]) == (model, method)
        }
        row = {"model": model, "method": method}
        row.update({f"n={n}": _common.format_bytes(sel[n]) for n in steps})
        row[f"n={steps[-1]} / n={steps[0]}"] = _common.format_ratio(growth(rows, model, method))
        out.append(row)
    return out


def summary_rows(rows, step_rows, models, memory_models, methods, steps, args, where):
    """The headline rows: each model's largest size, and which methods' memory grows."""
    summary = []
    for model in models:
        p = max(r["params"] for r in rows if r["model"] == model)
        sel = {r["method"]: r for r in rows if r["model"] == model and r["params"] == p}
        if "implicit" in sel:
            ratio = sel["implicit"]["time_ratio"]
            iters = sel["implicit"]["linear_iterations"]
            summary.append(
                {
                    "what": f"{model} ({p:.2g} params, {where}): implicit outer step "
                    f"({args.inner_steps} inner steps + CG {args.cg_iters}, {iters} run, "
                    "warm start) / "
                    f"{args.inner_steps} plain optax steps",
                    "result": f"{_common.format_ratio(ratio)} "
                    f"({_common.verdict(ratio, f'<= {TARGET:g}')})",
                    "target": f"<= {TARGET:g}x at >= 1e6 params",
                }
            )
        others = [m for m in methods if m != "implicit"]
        if others:
            summary.append(
                {
                    "what": f"{model} ({p:.2g} params): other methods' outer step / plain steps",
                    "result": ", ".join(
                        f"{m} {_common.format_ratio(sel[m]['time_ratio'])}" for m in others
                    ),
                    "target": "-",
                }
            )
    for model in memory_models:
        grown = [m for m in methods if growth(step_rows, model, m) > 1.1]
        flat = [m for m in methods if m not in grown]
        summary.append(
            {
                "what": f"{model} ({args.memory_size:.0e} params): methods whose temporary memory "
                f"grows > 1.1x from {steps[0]} to {steps[-1]} inner steps",
                "result": (
                    ", ".join(
                        f"{m} {_common.format_ratio(growth(step_rows, model, m))}" for m in grown
                    )
                    or "none"
                )
                + "; flat: "
                + (", ".join(flat) or "none"),
                "target": "only unrolled",
            }
        )
    return summary


def _order(method: str) -> int:
    names = [PLAIN, INNER, *METHODS]
    return names.index(method) if method in names else len(names)


def pick_device(parser, name: str):
    """The device ``--device`` names (the first of its kind); a parser error if there is none."""
    try:
        devices = jax.devices(name)
    except RuntimeError as e:
        parser.error(
            f"--device {name}: JAX finds no {name.upper()} ({e}); install a JAX build with "
            f"{name.upper()} support (e.g. jax[cuda12]) or run with --device cpu"
        )
    return devices[0]


def main(argv=None):
    parser = _common.make_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", default="1e4,1e5,1e6", help="comma-separated parameter counts of the MLP"
    )
    parser.add_argument(
        "--resnet-sizes",
        default="1e6",
        help="parameter counts of the ResNet (its steps compile in about a minute each on a CPU)",
    )
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: mlp,resnet")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated: " + ",".join(METHODS)
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "gpu"), help="where to run")
    parser.add_argument("--inner-steps", type=int, default=10, help="inner steps per outer step")
    parser.add_argument("--cg-iters", type=int, default=10, help="CG iterations of implicit")
    parser.add_argument(
        "--cg-ridge",
        type=float,
        default=50.0,
        help="CG damping: large enough that the damped Hessian is positive definite, so that "
        "CG runs all its iterations (it stops at non-positive curvature)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timing rounds per size")
    parser.add_argument(
        "--memory-steps", default="5,10,20,40", help="inner steps of the memory table"
    )
    parser.add_argument(
        "--memory-size", type=float, default=1e6, help="parameters of the memory table's models"
    )
    parser.add_argument(
        "--memory-models", default="mlp", help="comma-separated models of the memory table"
    )
    parser.add_argument("--mlp-batch", type=int, default=128, help="MLP batch size")
    parser.add_argument("--resnet-batch", type=int, default=16, help="ResNet batch size")
    parser.add_argument("--lr", type=float, default=0.05, help="inner SGD learning rate")
    parser.add_argument("--init-wd", type=float, default=1e-4, help="initial weight decays")
    args = parser.parse_args(argv)
    if args.smoke:  # by default the MLP only, two methods (flat and growing memory), one size
        if args.models == parser.get_default("models"):
            args.models = "mlp"
        if args.methods == parser.get_default("methods"):
            args.methods = "implicit,unrolled"
        args.sizes, args.resnet_sizes, args.memory_models = "2e3", "2e3", "mlp"
        args.repeats, args.memory_steps, args.memory_size = 1, "2,8", 2e3
        args.inner_steps, args.cg_iters, args.mlp_batch, args.resnet_batch = 2, 3, 16, 4
    models = _common.parse_choices(parser, args.models, MODELS, "model")
    memory_models = _common.parse_choices(parser, args.memory_models, MODELS, "model")
    methods = _common.parse_choices(parser, args.methods, METHODS, "method")
    try:
        sizes = {
            "mlp": sorted({float(s) for s in args.sizes.split(",") if s}),
            "resnet": sorted({float(s) for s in args.resnet_sizes.split(",") if s}),
        }
        steps = sorted({int(s) for s in args.memory_steps.split(",") if s})
    except ValueError:
        parser.error("--sizes, --resnet-sizes and --memory-steps take comma-separated numbers")
    if any(not v or min(v) < 100 for v in sizes.values()) or not steps or min(steps) < 1:
        parser.error("--sizes and --resnet-sizes need counts >= 100, --memory-steps integers >= 1")
    device = pick_device(parser, args.device)
    where = _common.machine_description() if args.device == "cpu" else device.device_kind
    out = _common.results_dir(args)
    options = _common.compiler_options(args.smoke)
    start = time.perf_counter()

    n_programs = 4 + len(methods)
    mem_compiles = len(memory_models) * len(steps) * (1 + len(methods))
    n_configs = sum(len(sizes[m]) for m in models)
    total = n_configs * (n_programs + args.repeats) + mem_compiles
    _common.phase(
        f"compiling and timing {n_programs} programs for each of {n_configs} "
        f"model sizes on {where}, then compiling {mem_compiles} for the memory table; the bar "
        "counts compilations and timing rounds",
        quiet=args.no_progress,
    )
    bar = _common.progress(total=total, desc=NAME, disable=args.no_progress)
    rows, cache = [], {}
    with jax.default_device(device):
        for model in models:
            for size in sizes[model]:
                bar.set_postfix_str(f"{model} {size:.0e}")
                prob = Problem(model, size, args, args.inner_steps)
                new = measure(prob, methods, args, options, bar)
                rows += new
                for r in new:
                    key = (model, r["params"], args.inner_steps, r["method"])
                    cache[key] = r["temp_bytes"]
        step_rows = []
        for model in memory_models:
            bar.set_postfix_str(f"memory table, {model}")
            step_rows += memory_vs_steps(
                Problem(model, args.memory_size, args, args.inner_steps),
                methods,
                steps,
                options,
                bar,
                cache,
            )
    bar.update(total - bar.n)  # programs reused from the timing part were not compiled again
    bar.close()

    table = scale_table(rows)
    stable = steps_table(step_rows, steps)
    _common.save_json(
        out / f"{NAME}.json",
        {"args": vars(args), "device": where, "scale": rows, "memory_vs_steps": step_rows},
    )
    _common.save_csv(
        out / f"{NAME}.csv", [{k: v for k, v in r.items() if k != "times_ms"} for r in rows]
    )
    _common.save_csv(out / "memory_vs_steps.csv", step_rows)
    plot_scale(out / "time_memory_vs_params.png", rows, models, methods, args.inner_steps, where)
    plot_steps(out / "memory_vs_inner_steps.png", step_rows, memory_models, methods)

    summary = summary_rows(rows, step_rows, models, memory_models, methods, steps, args, where)
    _common.print_table(table, title=f"time and memory of one outer step vs plain Optax ({where})")
    _common.print_table(
        stable, title=f"temporary memory vs inner steps (~{args.memory_size:.0e} parameters)"
    )
    wall = time.perf_counter() - start
    _common.write_summary(out, NAME, summary, seconds=wall, smoke=args.smoke)
    _common.done(out, wall)
    return {"scale": rows, "memory_vs_steps": step_rows, "summary": summary}


if __name__ == "__main__":
    main()
