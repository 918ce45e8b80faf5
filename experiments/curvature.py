"""Which curvature makes implicit hypergradients of networks right: Hessian, damping, Gauss-Newton.

Setup: scikit-learn's 8x8 digits (``--n-train`` training and ``--n-val`` validation images), two
float64 networks trained by full-batch gradient descent from the same start, with one weight
decay per layer kernel as the hyperparameters (differentiated in log space, as the tuners do):

- ``mlp``: tanh MLP 64-32-32-10;
- ``bn-cnn``: conv 3x3 (4) - BatchNorm - tanh - conv 3x3/2 (8) - BatchNorm - tanh - dense 10, a
  stateful model (``bilevel.nnx_apply_fn(..., with_state=True)``): train-mode BatchNorm in the
  training loss, eval mode (running averages) in the validation loss.

.. math:: L_{train}(w, u) = \\mathrm{CE}(f_w(X), y) + \\sum_l e^{u_l} \\lVert W_l \\rVert^2,
   \\qquad L_{val}(w) = \\mathrm{CE}(f_w(X_{val}), y_{val})

After ``T`` steps (``--steps``, default 100 and 1000) the **reference** hypergradient is the
exact derivative of ``L_val(w_T(u))`` through all ``T`` steps (``solvers.Unrolled``, reverse
mode, rematerialized). The **implicit** hypergradient that an online tuner
(``BilevelOptimizer`` with ``solvers.Implicit``) would apply at ``w_T`` solves ``A v =
grad_w L_val`` with CG for each curvature ``A``:

- ``hessian-ridge=1``: the Hessian plus ``ridge=1.0`` (the damping the experiments used so far);
- ``hessian-auto``: the Hessian with ``solvers.cg(ridge="auto")`` (Levenberg-Marquardt damping
  from the curvature CG meets; starts undamped);
- ``gauss-newton``: ``solvers.GaussNewton(model, cross-entropy, weight decay)``, positive
  semidefinite by construction, no damping;
- ``gauss-newton-auto``: the same with ``ridge="auto"`` (damping only if CG meets near-singular
  directions);
- ``hessian-undamped``: the plain Hessian (CG stops at negative curvature).

Reported: the cosine between each implicit hypergradient and the reference, the relative error
of its norm, the CG iterations, the solve's status and the damping it ended with. Everything is
matrix-free (Hessian-, Jacobian- and Gauss-Newton-vector products only).

    python -m experiments.curvature            # both models, T = 100 and 1000
    python -m experiments.curvature --smoke    # the test suite's short run
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import bilevel
import solvers
from experiments import _common

NAME = "curvature"
MODELS = ("mlp", "bn-cnn")
MODEL_LABELS = {"mlp": "tanh MLP 64-32-32-10", "bn-cnn": "BatchNorm CNN"}
METHODS = {
    "hessian-ridge=1": "Hessian, ridge=1.0",
    "hessian-auto": "Hessian, ridge='auto'",
    "gauss-newton": "Gauss-Newton",
    "gauss-newton-auto": "Gauss-Newton, ridge='auto'",
    "hessian-undamped": "Hessian, undamped (0 when CG stops at once)",
}


# Distinct markers of decreasing size: coinciding points stay visible (an undamped solve that
# stops at once gives a zero hypergradient, drawn at cosine 0 on the "orthogonal" line).
MARKERS = dict(zip(METHODS, "osD^v", strict=True))


class Cnn(nnx.Module):
    """Conv 3x3 - BN - tanh - conv 3x3/2 - BN - tanh - dense 10 on 8x8x1 images."""

    def __init__(self, *, rngs: nnx.Rngs):
        f64 = {"param_dtype": jnp.float64, "dtype": jnp.float64, "rngs": rngs}
        self.conv1 = nnx.Conv(1, 4, (3, 3), use_bias=False, **f64)
        self.bn1 = nnx.BatchNorm(4, **f64)
        self.conv2 = nnx.Conv(4, 8, (3, 3), strides=2, use_bias=False, **f64)
        self.bn2 = nnx.BatchNorm(8, **f64)
        self.fc = nnx.Linear(8 * 16, 10, **f64)

    def __call__(self, x):
        x = jnp.tanh(self.bn1(self.conv1(x)))
        x = jnp.tanh(self.bn2(self.conv2(x)))
        return self.fc(x.reshape(x.shape[0], -1))


def _xent(logits, y):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


class Problem:
    """One model: the losses, the Gauss-Newton pieces, the training steps, the methods."""

    def __init__(self, kind: str, args, split: _common.Split):
        self.kind, self.args = kind, args
        key = jax.random.key(args.seed)
        x, xv = split.x_train.astype(np.float64), split.x_val.astype(np.float64)
        self.y, self.yv = jnp.asarray(split.y_train), jnp.asarray(split.y_val)
        if kind == "mlp":
            self.x, self.xv = jnp.asarray(x), jnp.asarray(xv)
            sizes = (64, 32, 32, 10)
            keys = jax.random.split(key, len(sizes) - 1)
            self.params = [
                {
                    "w": jax.random.normal(k, (m, n), jnp.float64) / np.sqrt(m),
                    "b": jnp.zeros(n, jnp.float64),
                }
                for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
            ]
            self.model_state = None
            self.kernels = lambda p: [layer["w"] for layer in p]
        else:
            self.x = jnp.asarray(x.reshape(-1, 8, 8, 1))
            self.xv = jnp.asarray(xv.reshape(-1, 8, 8, 1))
            model = Cnn(rngs=nnx.Rngs(args.seed))
            self.train_fn, self.params, state = bilevel.nnx_apply_fn(
                model, with_state=True, mode="train"
            )
            # BatchNorm keeps its running averages in float32 whatever param_dtype says.
            self.model_state = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), state)
            self.eval_fn, _, _ = bilevel.nnx_apply_fn(model, with_state=True, mode="eval")
            self.kernels = lambda p: [p["conv1"]["kernel"], p["conv2"]["kernel"], p["fc"]["kernel"]]
        self.hparams = {"log_wd": jnp.full(3, np.log(args.wd), jnp.float64)}
        self.gn = solvers.GaussNewton(self.logits, self.output_loss, self.decay)

    # The pieces of the training loss: model outputs, output loss, regularizer. They take the
    # loss's arguments (h, batch[, model_state]); the batch is a step counter (full batch).
    def logits(self, p, h, batch, *state):
        del h, batch
        if self.kind == "mlp":
            z = self.x
            for layer in p[:-1]:
                z = jnp.tanh(z @ layer["w"] + layer["b"])
            return z @ p[-1]["w"] + p[-1]["b"]
        return self.train_fn(p, state[0], self.x)[0]

    def output_loss(self, logits, h, batch, *state):
        del h, batch, state
        return _xent(logits, self.y)

    def decay(self, p, h, batch, *state):
        del batch, state
        wd = jnp.exp(h["log_wd"])
        return sum(wd[i] * jnp.sum(k**2) for i, k in enumerate(self.kernels(p)))

    def inner_loss(self, p, h, batch, *state):
        if self.kind == "mlp":
            return self.gn.loss(p, h, batch)
        logits, new_state = self.train_fn(p, state[0], self.x)
        return self.output_loss(logits, h, batch) + self.decay(p, h, batch), new_state

    def outer_loss(self, p, h, batch, *state):
        del h, batch
        if self.kind == "mlp":
            z = self.xv
            for layer in p[:-1]:
                z = jnp.tanh(z @ layer["w"] + layer["b"])
            return _xent(z @ p[-1]["w"] + p[-1]["b"], self.yv)
        return _xent(self.eval_fn(p, state[0], self.xv)[0], self.yv), state[0]

    def method(self, name: str) -> solvers.Implicit:
        tol, maxiter = self.args.cg_tol, self.args.cg_maxiter
        ridge = {"hessian-ridge=1": 1.0, "hessian-auto": "auto", "gauss-newton-auto": "auto"}
        cg = solvers.cg(tol=tol, maxiter=maxiter, ridge=ridge.get(name, 0.0))
        curvature = self.gn if name.startswith("gauss-newton") else None
        return solvers.Implicit(linear_solver=cg, curvature=curvature)

    def _state_kw(self, state):
        return {} if self.model_state is None else {"model_state": state}

    def advance(self, p, state, n):
        """``n`` full-batch gradient-descent steps (``n`` traced: one compilation)."""
        lr, h = self.args.lr, self.hparams

        def body(_, c):
            p, s = c
            if self.model_state is None:
                g = jax.grad(self.inner_loss)(p, h, 0)
                s2 = s
            else:
                g, s2 = jax.grad(self.inner_loss, has_aux=True)(p, h, 0, s)
            return jax.tree.map(lambda a, b: a - lr * b, p, g), s2

        return jax.lax.fori_loop(0, n, body, (p, state))

    def reference(self, steps: int):
        """The exact derivative through ``steps`` gradient-descent steps from the start."""
        return bilevel.hypergradient(
            self.inner_loss,
            self.outer_loss,
            self.params,
            self.hparams,
            jnp.arange(steps),
            0,
            method=solvers.Unrolled(checkpoint_every=max(1, int(np.sqrt(steps)))),
            inner_optimizer=optax.sgd(self.args.lr),
            **self._state_kw(self.model_state),
        )

    def implicit(self, name, p, state):
        g, info = bilevel.hypergradient(
            self.inner_loss,
            self.outer_loss,
            p,
            self.hparams,
            0,
            0,
            method=self.method(name),
            return_info=True,
            **self._state_kw(state),
        )
        return g, info

    def train_loss(self, p, state):
        out = self.inner_loss(p, self.hparams, 0, *(() if state is None else (state,)))
        return out if state is None else out[0]


def _cosine(a, b) -> float:
    """Cosine of two vectors; 0 when one is zero (a solve that stopped at its start)."""
    a, b = np.ravel(a), np.ravel(b)
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / norms) if norms > 0 else 0.0


def run(args, methods, bar) -> list[dict]:
    """Rows ``{model, steps, method, cosine, rel_error, iterations, status, ridge}``."""
    split = _common.load_digits(args.seed, n_train=args.n_train, n_val=args.n_val)
    rows = []
    for kind in args.models_list:
        prob = Problem(kind, args, split)
        advance = jax.jit(prob.advance)
        # --smoke: the reference as one program (op by op, each of its operations compiles)
        reference = jax.jit(prob.reference, static_argnums=0) if args.smoke else prob.reference
        implicit = {
            m: jax.jit(lambda p, s, m=m, prob=prob: prob.implicit(m, p, s)) for m in methods
        }
        p, s, done = prob.params, prob.model_state, 0
        for steps in args.steps_list:
            p, s = advance(p, s, steps - done)
            done = steps
            ref = np.asarray(reference(steps)["log_wd"])
            bar.update(1)
            loss = float(prob.train_loss(p, s))
            for m in methods:
                g, info = implicit[m](p, s)
                g = np.asarray(g["log_wd"])
                # The damping the solve ended with (auto: the method's memory carries it; with
                # a start of 0 that is the final damping), or the configured one.
                ridge = prob.method(m).linear_solver.ridge
                if ridge == "auto":
                    ridge = info.linear_solution.ridge
                rows.append(
                    {
                        "model": kind,
                        "steps": steps,
                        "train_loss": loss,
                        "method": m,
                        "cosine": _cosine(g, ref),
                        "rel_error": float(np.linalg.norm(g - ref) / np.linalg.norm(ref)),
                        "iterations": int(info.linear_iterations),
                        "status": solvers.Status(int(info.status)).name,
                        "ridge": float(ridge),
                        "ref_norm": float(np.linalg.norm(ref)),
                    }
                )
                bar.update(1)
    return rows


def plot(rows, methods, models, steps_list, path) -> None:
    plt = _common.pyplot()
    fig, axes = plt.subplots(1, len(models), figsize=(6.2 * len(models), 5.2), squeeze=False)
    for ax, kind in zip(axes[0], models, strict=True):
        for m in methods:
            pts = [
                (r["steps"], r["cosine"]) for r in rows if r["model"] == kind and r["method"] == m
            ]
            xs, ys = zip(*pts, strict=True)
            ax.plot(
                xs, ys, MARKERS[m] + "-", color=_common.color(m), label=METHODS[m], lw=1.8,
                ms=11 - 1.5 * list(METHODS).index(m), mfc="none" if m.endswith("auto") else None,
            )  # fmt: skip
        ax.axhline(1.0, color="black", ls="--", lw=1, label="reference (cosine 1)")
        ax.axhline(0.0, color="grey", ls=":", lw=1, label="orthogonal (cosine 0)")
        ax.set_xscale("log")
        ax.set_xticks(steps_list, [str(t) for t in steps_list])
        ax.set_ylim(-1.05, 1.08)
        ax.set_xlabel("training steps T before the hypergradient (full-batch GD)")
        ax.set_ylabel("cosine(implicit, unrolled reference)")
        ax.set_title(MODEL_LABELS[kind])
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle("Implicit hypergradient vs the exact derivative through T steps (digits, float64)")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = _common.make_parser(
        NAME,
        "Cosine of implicit hypergradients (Hessian + ridge=1, Hessian + auto damping, "
        "Gauss-Newton) against the exact hypergradient through T training steps, on an MLP and "
        "a BatchNorm CNN (digits, float64).",
    )
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: mlp,bn-cnn")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated from {list(METHODS)}"
    )
    parser.add_argument("--steps", default="100,1000", help="training steps T, increasing")
    parser.add_argument("--n-train", type=int, default=128, help="training images (full batch)")
    parser.add_argument("--n-val", type=int, default=128, help="validation images")
    parser.add_argument("--lr", type=float, default=0.5, help="gradient-descent learning rate")
    parser.add_argument("--wd", type=float, default=1e-3, help="weight decay of every layer")
    parser.add_argument("--cg-tol", type=float, default=1e-6, help="CG relative tolerance")
    parser.add_argument("--cg-maxiter", type=int, default=300, help="CG iteration budget")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.n_train, args.n_val, args.cg_maxiter = "20", 64, 64, 200
        args.models, args.methods = "mlp", "hessian-auto,gauss-newton"
    args.models_list = _common.parse_choices(parser, args.models, MODELS, "model")
    methods = _common.parse_choices(parser, args.methods, list(METHODS), "method")
    args.steps_list = sorted({int(t) for t in args.steps.split(",") if t})
    if not args.steps_list or args.steps_list[0] < 1:
        parser.error(f"--steps must be positive integers, got {args.steps!r}")
    out = _common.results_dir(args)
    start = time.perf_counter()
    with jax.enable_x64(True):
        total = len(args.models_list) * len(args.steps_list) * (1 + len(methods))
        _common.phase(
            "compiling as it goes: the first unit of each model and method includes it",
            quiet=args.no_progress,
        )
        bar = _common.progress(total=total, desc=NAME, disable=args.no_progress)
        rows = run(args, methods, bar)
        bar.close()
    wall = time.perf_counter() - start

    table = [
        {
            "model": r["model"],
            "T": r["steps"],
            "train loss": f"{r['train_loss']:.3g}",
            "curvature / damping": METHODS[r["method"]],
            "cosine": f"{r['cosine']:+.4f}",
            "rel. error": f"{r['rel_error']:.3g}",
            "CG iters": r["iterations"],
            "status": r["status"],
            "final ridge": f"{r['ridge']:.3g}",
        }
        for r in rows
    ]
    _common.save_json(
        out / f"{NAME}.json",
        {"config": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows},
    )
    _common.save_csv(out / f"{NAME}.csv", table)
    plot(rows, methods, args.models_list, args.steps_list, out / f"{NAME}.png")
    print()
    _common.print_table(table)
    print(
        "cosine: of the implicit hypergradient at w_T against the exact derivative through the "
        "T steps (Unrolled, float64); rel. error: ||g - g_ref|| / ||g_ref||; final ridge: the "
        "damping of the system solved (chosen by the solve for ridge='auto')."
    )
    last = args.steps_list[-1]
    summary = []
    for kind in args.models_list:
        at = {r["method"]: r for r in rows if r["model"] == kind and r["steps"] == last}
        summary.append(
            {
                "what": f"cosine of implicit vs unrolled hypergradient, {MODEL_LABELS[kind]} "
                f"on digits after T={last} GD steps (float64)",
                "result": "; ".join(f"{METHODS[m]} {at[m]['cosine']:+.3f}" for m in methods),
                "target": "1",
            }
        )
    _common.write_summary(out, NAME, summary, seconds=wall, smoke=args.smoke)
    _common.done(out, wall)
    return rows


if __name__ == "__main__":
    main()
