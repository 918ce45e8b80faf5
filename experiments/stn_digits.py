"""STN on scikit-learn digits: tune input/hidden dropout and input noise online, vs fixed and random.

Data: ``load_digits`` (pixels / 16), 1000 train / 400 validation / 397 test. Network: MLP
64-256-256-10 of ``bilevel.stn.StnLinear`` (ReLU), trained with Adam for ``--epochs`` epochs of
batch 128 (7 batches per epoch). Hyperparameters: input dropout, hidden dropout (init 0.05) and the
standard deviation of Gaussian input noise (pixel intensity, init 0.05), tuned by a Self-Tuning
Network (5 train steps, 1 hyper step per cycle). Baselines, on the same plain MLP
(``nnx.Linear``), schedule and epochs: fixed dropout 0 / 0.2 / 0.5 (no noise), and a random
search of ``--trials`` configurations (dropout rates uniform in [0, 0.8], noise log-uniform in
[1e-3, 1]; all baselines train together, vmapped), its best trial picked by the final validation
loss. Reported: the validation cross-entropy at the end and the lowest one of the evaluations
every 5 epochs, test accuracy, the final hyperparameters. The PyTorch STN reaches a validation
cross-entropy of about 0.05-0.06 on this task.

    python -m experiments.stn_digits                   # default: 300 epochs, 9 random trials
    python -m experiments.stn_digits --variant delta   # Delta-STN
    python -m experiments.stn_digits --smoke
"""

from __future__ import annotations

import time

import numpy as np

from experiments import _common

NAME = "stn_digits"
NAMES = _common.DIGITS_NAMES
METHODS = _common.stn_variants()  # --variant -> STN method class
FIXED = (0.0, 0.2, 0.5)  # fixed dropout rates of the baselines (input and hidden)
FIXED_STYLES = (":", "--", "-.")


def random_configs(rs, k):
    """Random-search draws: dropout rates uniform in [0, 0.8], noise log-uniform in [1e-3, 1]."""
    return {
        "drop_in": rs.uniform(0.0, 0.8, k),
        "drop_hidden": rs.uniform(0.0, 0.8, k),
        "noise": np.exp(rs.uniform(np.log(1e-3), 0.0, k)),
    }


def fixed_label(p: float) -> str:
    """``"fixed dropout 0.2"`` (``"... 0 (no regularization)"`` for 0)."""
    return f"fixed dropout {p:g}" + (" (no regularization)" if p == 0 else "")


def main(argv=None):
    wall = time.perf_counter()
    parser = _common.make_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=300, help="training epochs of every run")
    parser.add_argument("--batch-size", type=int, default=128, help="examples per train step")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam step on the weights")
    parser.add_argument("--hyper-lr", type=float, default=3e-3, help="Adam step on the hparams")
    parser.add_argument(
        "--variant", choices=sorted(METHODS), default="stn", help="STN or Delta-STN"
    )
    parser.add_argument(
        "--warmup-epochs", type=int, default=0, help="STN epochs of weights-only training first"
    )
    parser.add_argument("--entropy-weight", type=float, default=1e-3, help="STN entropy bonus")
    parser.add_argument("--init-scale", type=float, default=0.5, help="STN perturbation scale")
    parser.add_argument("--trials", type=int, default=9, help="random-search configurations")
    parser.add_argument(
        "--response-rank",
        type=int,
        default=None,
        help="low-rank response kernels W_r = P Q of this rank (default: full)",
    )
    args = parser.parse_args(argv)
    if args.response_rank is not None and args.response_rank < 1:
        parser.error(f"--response-rank must be >= 1, got {args.response_rank}")
    sizes = (64, 256, 256, 10)
    if args.smoke:  # one hidden layer of 128: a smaller program, faster per-example responses
        args.epochs, args.trials, args.warmup_epochs = 4, 2, 0
        sizes = (64, 128, 10)
    if args.trials < 1:
        parser.error(f"--trials must be >= 1, got {args.trials}")
    out = _common.results_dir(args)
    quiet = args.no_progress
    method = _common.variant_label(args.variant)
    if args.response_rank is not None:
        method = f"{method} (rank {args.response_rank})"
    eval_every = 2 if args.smoke else 5

    data = _common.load_digits(seed=args.seed)
    _common.phase(f"compiling the {method} cycle and running its first block", quiet=quiet)
    stn_job = _common.stn_job(
        lambda rngs: _common.StnMlp(sizes, len(NAMES), response_rank=args.response_rank, rngs=rngs),
        data,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        lr=args.lr,
        hyper_lr=args.hyper_lr,
        method=METHODS[args.variant](),
        entropy_weight=args.entropy_weight,
        init_scale=args.init_scale,
        warmup_epochs=args.warmup_epochs,
        eval_every=eval_every,
    )
    _common.phase(
        f"compiling the plain MLP: {len(FIXED)} fixed + {args.trials} random configurations",
        quiet=quiet,
    )
    draws = random_configs(np.random.RandomState(args.seed), args.trials)
    configs = {
        "drop_in": np.concatenate([FIXED, draws["drop_in"]]),
        "drop_hidden": np.concatenate([FIXED, draws["drop_hidden"]]),
        "noise": np.concatenate([np.zeros(len(FIXED)), draws["noise"]]),
    }
    fixed_job = _common.fixed_job(
        lambda rngs: _common.PlainMlp(sizes, rngs=rngs),
        configs,
        data,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        lr=args.lr,
        eval_every=eval_every,
    )
    bar = _common.progress(
        total=stn_job.units + fixed_job.units,
        initial=stn_job.done,
        desc=NAME,
        unit="step",
        disable=quiet,
    )
    stn_result = stn_job.run(bar)
    results, plain_seconds = fixed_job.run(bar)
    bar.close()
    fixed, search = results[: len(FIXED)], results[len(FIXED) :]
    best = min(search, key=lambda r: r["val_loss"])
    per_run = plain_seconds / len(results)  # the runs train together, vmapped

    rows = [
        _common.stn_row(f"{method} (tuned online)", stn_result, stn_result["seconds"]),
        *(_common.stn_row(fixed_label(p), r, per_run) for p, r in zip(FIXED, fixed, strict=True)),
        _common.stn_row(f"random search, best of {args.trials}", best, per_run * args.trials),
    ]
    record = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "stn": stn_result,
        "val_loss": stn_result["val_loss"],
        "best_val_loss": stn_result["best_val_loss"],
        "test_accuracy": stn_result["test_accuracy"],
        "hparams": stn_result["hparams"],
        "fixed": {f"dropout {p:g}": r for p, r in zip(FIXED, fixed, strict=True)},
        "random_search": {"trials": args.trials, "best": best, "all": search},
        "reference": {"pytorch_stn_val_loss": "about 0.05-0.06"},
        "rows": rows,
    }
    _common.save_json(out / f"{NAME}.json", record)
    _common.save_csv(out / f"{NAME}.csv", rows)
    baselines = [
        {
            "label": f"plain MLP, {fixed_label(p)} (test acc {r['test_accuracy']:.1%})",
            "result": r,
            "color": _common.color("fixed"),
            "ls": ls,
        }
        for p, r, ls in zip(FIXED, fixed, FIXED_STYLES, strict=True)
    ]
    baselines.append(
        {
            "label": f"plain MLP, random search: best of {args.trials} "
            f"(test acc {best['test_accuracy']:.1%})",
            "result": best,
            "color": _common.color("random"),
            "ls": "-",
        }
    )
    _common.plot_stn(
        out / f"{NAME}.png",
        stn_result,
        f"{method} on digits (MLP {'-'.join(map(str, sizes))}), {args.epochs} epochs",
        NAMES,
        method=method,
        baselines=baselines,
        reference=(0.05, 0.06, "PyTorch STN: val xent 0.05-0.06"),
    )
    _common.print_table(
        rows,
        title=f"digits MLP, {args.epochs} epochs. val_xent: at the end; best_val_xent: lowest of "
        f"the evaluations every {eval_every} epochs; seconds: training time (the plain runs "
        "train vmapped, their time is split evenly). Reference: PyTorch STN val xent ~0.05-0.06",
    )
    setup = f"digits MLP, {args.epochs} epochs"
    summary = _common.stn_summary(
        rows,
        setup,
        "val xent final / best",
        lambda row: f"{row['val_xent']:.4g} / {row['best_val_xent']:.4g}",
        "0.05-0.06 (PyTorch STN)",
    )
    wall = time.perf_counter() - wall
    _common.write_summary(out, NAME, summary, seconds=wall, smoke=args.smoke)
    _common.done(out, wall)
    return record


if __name__ == "__main__":
    main()
