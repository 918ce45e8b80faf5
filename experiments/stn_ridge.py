"""STN known answer: tune a ridge penalty with a Self-Tuning Network and compare with the optimum.

Data (``numpy.random.RandomState(data_seed)``, in this order): ``w ~ N(0, I_dim)``,
``X_train ~ N(0, 1)^(n_train x dim)``, ``y_train = X_train w + noise * N(0, 1)``, then ``X_val``,
``y_val`` likewise. Training loss ``mean((X w - y)^2) + lambda ||w||^2``, validation loss the mean
squared error, ``lambda`` (log scale) starting at 0.01. The network is one
``StnLinear(dim, 1, 1, use_bias=False)``: its effective weight ``W_e + u(lambda) W_r`` is a linear
best-response approximation. The entropy weight (0.1) is larger than the paper's 1e-3 because the
validation loss here is a mean squared error of about 18, not an O(1) cross-entropy: with 1e-3 the
perturbation scale collapses to about 0.02 and the learned response slope gets noisy. The closed form gives the optimal penalty and the exact response
Jacobian ``dw*/dlambda = -2 H^-1 w*`` (``H`` the Hessian of the training loss) to compare with.

The run: 100 warm-up cycles (weights only, lambda fixed at 0.01, so the network first fits a
response around its starting point), then ``--steps`` tuning cycles (5 train steps + 1 hyper step,
full batches). Targets: the final lambda within 1.5x of the optimum, response-Jacobian cosine
> 0.9.

    python -m experiments.stn_ridge                    # STN and Delta-STN
    python -m experiments.stn_ridge --variant delta --json ridge.json
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from bilevel import hparams, stn
from experiments import _common

NAME = "stn_ridge"
METHODS = _common.stn_variants()  # --variant -> STN method class
TARGET_RATIO = 1.5  # the final lambda within this factor of the optimum
TARGET_COSINE = 0.9  # learned vs exact response Jacobian


def make_data(n_train: int, n_val: int, dim: int, noise: float, data_seed: int):
    """The ridge instance (NumPy float64 arrays) drawn as the module docstring says."""
    rs = np.random.RandomState(data_seed)
    w = rs.randn(dim)
    x_train = rs.randn(n_train, dim)
    y_train = x_train @ w + noise * rs.randn(n_train)
    x_val = rs.randn(n_val, dim)
    y_val = x_val @ w + noise * rs.randn(n_val)
    return x_train, y_train, x_val, y_val


def ridge_solution(x, y, lam):
    """Minimizer of ``mean((X w - y)^2) + lam ||w||^2``."""
    n, d = x.shape
    return np.linalg.solve(x.T @ x / n + lam * np.eye(d), x.T @ y / n)


def response_jacobian(x, y, lam):
    """Exact ``dw*/dlambda = -2 H^-1 w*`` with ``H = 2 (X^T X / n + lam I)``."""
    n, d = x.shape
    w = ridge_solution(x, y, lam)
    hess = 2.0 * (x.T @ x / n + lam * np.eye(d))
    return -2.0 * np.linalg.solve(hess, w)


def val_loss_at(x_train, y_train, x_val, y_val, lam):
    """Validation mean squared error of the ridge solution at ``lam``."""
    w = ridge_solution(x_train, y_train, lam)
    return float(np.mean((x_val @ w - y_val) ** 2))


def optimal_lambda(x_train, y_train, x_val, y_val, lo=1e-6, hi=1e4, num=2001):
    """Grid search on a log grid, then golden-section refinement; returns ``(lam, loss, interior)``."""
    grid = np.logspace(np.log10(lo), np.log10(hi), num)
    losses = np.array([val_loss_at(x_train, y_train, x_val, y_val, g) for g in grid])
    i = int(np.argmin(losses))
    interior = 0 < i < num - 1
    a, b = np.log(grid[max(i - 1, 0)]), np.log(grid[min(i + 1, num - 1)])
    f = lambda t: val_loss_at(x_train, y_train, x_val, y_val, np.exp(t))
    g = (np.sqrt(5.0) - 1.0) / 2.0
    for _ in range(60):
        c, d = b - g * (b - a), a + g * (b - a)
        if f(c) < f(d):
            b = d
        else:
            a = c
    lam = float(np.exp(0.5 * (a + b)))
    return lam, f(np.log(lam)), interior


def ridge_job(
    *,
    n_train: int = 50,
    n_val: int = 200,
    dim: int = 15,
    noise: float = 4.0,
    data_seed: int = 5,
    seed: int = 0,
    steps: int = 1500,
    warmup: int = 100,
    chunk: int = 100,
    variant: str = "stn",
    lr: float = 0.01,
    hyper_lr: float = 0.03,
    init_lambda: float = 0.01,
    entropy_weight: float = 0.1,
    tune_scales: bool = True,
    init_scale: float = 0.5,
) -> _common.Job:
    """Build and compile the penalty tuning with ``variant``: ``warmup`` + ``steps`` cycles.

    Counted in cycles, run in blocks of ``chunk`` (``warmup`` and ``steps`` are rounded to whole
    blocks). The job's ``run(bar)`` returns the result record: final and optimal lambda, their
    ratio, validation losses, the cosine between the learned and the exact response Jacobian,
    and the ``history`` (cycle, lambda, scale, perturbed validation MSE) of the tuning cycles.
    """
    x_train, y_train, x_val, y_val = make_data(n_train, n_val, dim, noise, data_seed)
    lam_opt, loss_opt, interior = optimal_lambda(x_train, y_train, x_val, y_val)
    dtype = jnp.result_type(float)
    train = (jnp.asarray(x_train, dtype), jnp.asarray(y_train, dtype))
    val = (jnp.asarray(x_val, dtype), jnp.asarray(y_val, dtype))

    model = stn.StnLinear(
        dim, 1, 1, use_bias=False, param_dtype=dtype, rngs=nnx.Rngs(_common.stn_key(seed))
    )
    # The general weights start at zero (the ridge solution at a large penalty).
    model.kernel[...] = jnp.zeros_like(model.kernel[...])

    def inner_loss(m, h, batch, key):
        x, y = batch
        err = jnp.mean((h.apply(m, x)[:, 0] - y) ** 2)
        return err + jnp.mean(h["wd"] * stn.effective_l2(m, h.hnet))

    def outer_loss(m, h, batch):
        x, y = batch
        return jnp.mean((m(x, h.hnet)[:, 0] - y) ** 2)

    trainer = stn.Trainer(
        model,
        inner_loss,
        outer_loss,
        space={"wd": hparams.log(init_lambda)},
        inner_optimizer=optax.adam(lr),
        outer_optimizer=optax.adam(hyper_lr),
        method=METHODS[variant](),
        inner_steps=5,
        outer_steps=1,
        init_scale=init_scale,
        tune_scales=tune_scales,
        entropy_weight=entropy_weight,
    )
    chunk = max(1, min(chunk, steps))
    blocks = _common.stn_blocks(
        trainer,
        trainer.init(key=_common.stn_key(seed)),
        train,
        val,
        blocks=max(1, round(steps / chunk)),
        warmup_blocks=round(warmup / chunk),
        chunk=chunk,
        batch_size=n_train,
        outer_batch_size=n_val,
    )

    def run(bar):
        state, history, seconds = blocks.run(bar)
        lam = float(trainer.hparams(state)["wd"])
        m = trainer.model(state)
        hnet = trainer.hnet(state)
        w_learned = np.asarray(m.effective_kernel(hnet)[:, 0], np.float64)
        jac = np.asarray(
            jax.jacobian(lambda z: m.effective_kernel(z)[:, 0])(hnet)[:, 0], np.float64
        )
        jac_exact = response_jacobian(x_train, y_train, lam)
        cosine = float(jac @ jac_exact / (np.linalg.norm(jac) * np.linalg.norm(jac_exact) + 1e-30))
        w_star = ridge_solution(x_train, y_train, lam)
        return {
            "variant": variant,
            "final_lambda": lam,
            "optimal_lambda": lam_opt,
            "optimum_interior": bool(interior),
            "ratio": lam / lam_opt,
            "final_val_loss": val_loss_at(x_train, y_train, x_val, y_val, lam),
            "stn_val_loss": float(np.mean((x_val @ w_learned - y_val) ** 2)),
            "optimal_val_loss": loss_opt,
            "initial_lambda": init_lambda,
            "initial_val_loss": val_loss_at(x_train, y_train, x_val, y_val, init_lambda),
            "jacobian_cosine": cosine,
            "jacobian": jac,
            "jacobian_exact": jac_exact,
            "weight_rel_error": float(np.linalg.norm(w_learned - w_star) / np.linalg.norm(w_star)),
            "final_scale": float(trainer.scales(state)["wd"]),
            "warmup_cycles": blocks.units - len(history["step"]),
            "inner_skipped": int(state.inner_skipped),
            "skipped": int(state.skipped),
            "seconds": seconds,
            "history": {
                "step": history["step"],
                "lambda": history["hparams/wd"],
                "scale": history["scales/wd"],
                "val_loss": history["outer_loss"],
                "exact_val_loss": np.array(
                    [val_loss_at(x_train, y_train, x_val, y_val, v) for v in history["hparams/wd"]]
                ),
            },
        }

    return _common.Job(blocks.units, blocks.done, run)


def plot(path, results: dict[str, dict], variants: Sequence[str]) -> None:
    """Lambda schedules against the optimum and its target band, validation MSE, responses."""
    plt = _common.pyplot()
    first = results[variants[0]]
    opt = first["optimal_lambda"]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.6))
    warm = first["warmup_cycles"]
    for a in ax[:2]:
        if warm:
            a.axvspan(
                0, warm, color="0.9", zorder=0, label=f"warm-up ({warm} cycles, lambda fixed)"
            )
    ax[0].axhspan(
        opt / TARGET_RATIO,
        opt * TARGET_RATIO,
        color="#2ca02c",
        alpha=0.15,
        label=f"target: within {TARGET_RATIO:g}x",
    )
    ax[0].axhline(
        opt,
        color=_common.color("oracle"),
        ls="--",
        zorder=3,
        label=f"closed-form optimum {opt:.3g}",
    )
    ax[1].axhline(
        first["optimal_val_loss"],
        color=_common.color("oracle"),
        ls="--",
        zorder=3,
        label=f"closed-form optimum {first['optimal_val_loss']:.4g}",
    )
    # STN wide underneath, Delta-STN narrow on top: both stay visible where they agree.
    widths = {"stn": 3.5, "delta": 1.5}
    markers = {"stn": dict(marker="o", mfc="none", ms=9), "delta": dict(marker="x", ms=6)}
    for v in variants:
        r = results[v]
        label = _common.variant_label(v)
        c = _common.color(label)
        cycles = np.concatenate([[0], r["history"]["step"]])
        ax[0].plot(
            cycles,
            np.concatenate([[r["initial_lambda"]], r["history"]["lambda"]]),
            color=c,
            lw=widths[v],
            label=f"{label}: final {r['final_lambda']:.3g} ({r['ratio']:.2f}x)",
        )
        ax[1].plot(
            cycles,
            np.concatenate([[r["initial_val_loss"]], r["history"]["exact_val_loss"]]),
            color=c,
            lw=widths[v],
            label=f"{label}: final {r['final_val_loss']:.4g}",
        )
        ax[2].plot(
            r["jacobian_exact"] / np.linalg.norm(r["jacobian_exact"]),
            r["jacobian"] / np.linalg.norm(r["jacobian"]),
            ls="none",
            color=c,
            mew=1.5,
            label=f"{label}: cosine {r['jacobian_cosine']:.3f}",
            **markers[v],
        )
    ax[0].set(
        yscale="log",
        xlabel="cycle (5 train steps + 1 hyper step)",
        ylabel="lambda (log)",
        title="penalty schedule",
        xlim=(0, cycles[-1]),
    )
    ax[1].set(
        xlabel="cycle (5 train steps + 1 hyper step)",
        ylabel="validation MSE of the ridge solution",
        title="validation loss at the tuned lambda",
        xlim=(0, cycles[-1]),
    )
    lim = 1.1 * max(np.abs(a.get_xlim()).max() for a in ax[2:]) if variants else 1.0
    ax[2].plot([-lim, lim], [-lim, lim], color="0.5", lw=1, label="equal")
    ax[2].set(
        xlabel="exact dw*/dlambda, per weight (unit norm)",
        ylabel="learned response, per weight (unit norm)",
        title="best-response direction at the final lambda",
    )
    for a in ax:
        a.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=8, frameon=False)
    fig.suptitle(f"STN on ridge regression (d={len(first['jacobian'])} weights): known answer")
    _common.save_figure(fig, path, dpi=120)


def main(argv=None):
    wall = time.perf_counter()
    parser = _common.make_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=50, help="training examples")
    parser.add_argument("--n-val", type=int, default=200, help="validation examples")
    parser.add_argument("--dim", type=int, default=15, help="features (weights)")
    parser.add_argument("--noise", type=float, default=4.0, help="label noise std")
    parser.add_argument("--data-seed", type=int, default=5, help="seed of the ridge instance")
    parser.add_argument("--steps", type=int, default=1500, help="STN cycles (5 train + 1 hyper)")
    parser.add_argument("--warmup", type=int, default=100, help="warm-up cycles (weights only)")
    parser.add_argument(
        "--variant", choices=["stn", "delta", "both"], default="both", help="which trainer"
    )
    parser.add_argument("--json", type=str, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup = 60, 0
    out = _common.results_dir(args)
    quiet = args.no_progress
    variants = ["stn", "delta"] if args.variant == "both" else [args.variant]

    jobs = {}
    for v in variants:
        _common.phase(
            f"compiling the {_common.variant_label(v)} cycle and running its first block",
            quiet=quiet,
        )
        jobs[v] = ridge_job(
            n_train=args.n_train,
            n_val=args.n_val,
            dim=args.dim,
            noise=args.noise,
            data_seed=args.data_seed,
            seed=args.seed,
            steps=args.steps,
            warmup=args.warmup,
            variant=v,
        )
    bar = _common.progress(
        total=sum(j.units for j in jobs.values()),
        initial=sum(j.done for j in jobs.values()),
        desc=NAME,
        unit="cycle",
        disable=quiet,
    )
    results = {v: job.run(bar) for v, job in jobs.items()}
    bar.close()

    first = results[variants[0]]
    record = {
        "final_lambda": first["final_lambda"],
        "optimal_lambda": first["optimal_lambda"],
        "final_val_loss": first["final_val_loss"],
        "optimal_val_loss": first["optimal_val_loss"],
        "optimum_interior": first["optimum_interior"],
        "config": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "variants": results,
    }
    _common.save_json(out / f"{NAME}.json", record)
    if args.json:
        _common.save_json(args.json, record)
    rows = [
        {
            "method": _common.variant_label(v),
            "lambda": r["final_lambda"],
            "optimal": r["optimal_lambda"],
            "ratio": r["ratio"],
            "val_mse": r["final_val_loss"],
            "optimal_val_mse": r["optimal_val_loss"],
            "jac_cosine": r["jacobian_cosine"],
            "sigma": r["final_scale"],
            "seconds": r["seconds"],
        }
        for v, r in results.items()
    ]
    _common.save_csv(out / f"{NAME}.csv", rows)
    plot(out / f"{NAME}.png", results, variants)
    _common.print_table(
        rows,
        title="STN on ridge regression (known answer). val_mse: of the exact ridge solution at the "
        "final lambda; sigma: final perturbation scale of log lambda; "
        f"targets: ratio within {TARGET_RATIO:g}x, jac_cosine > {TARGET_COSINE:g}",
    )
    setup = f"ridge (n={args.n_train}, d={args.dim}), {args.steps} cycles"
    summary = []
    for row in rows:
        summary += [
            {
                "what": f"{setup}: {row['method']} final lambda / closed-form optimum",
                "result": f"{row['lambda']:.4g} / {row['optimal']:.4g} ({row['ratio']:.2f}x)",
                "target": f"within {TARGET_RATIO:g}x",
            },
            {
                "what": f"{setup}: {row['method']} response-Jacobian cosine (learned vs exact)",
                "result": f"{row['jac_cosine']:.3f}",
                "target": f"> {TARGET_COSINE:g}",
            },
        ]
    wall = time.perf_counter() - wall
    _common.write_summary(out, NAME, summary, seconds=wall, smoke=args.smoke)
    _common.done(out, wall)
    return record


if __name__ == "__main__":
    main()
