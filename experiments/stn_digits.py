"""STN on scikit-learn digits: tune input/hidden dropout and input noise online, vs fixed and random.

Data: ``load_digits`` (pixels / 16), 1000 train / 400 validation / 397 test. Network: MLP
64-256-256-10 of ``bilevel.stn.StnLinear`` (ReLU), trained with Adam for ``--epochs`` epochs of
batch 128 (7 batches per epoch). Hyperparameters: input dropout, hidden dropout (init 0.05) and the
standard deviation of Gaussian input noise (init 0.05), tuned by a Self-Tuning Network (5 train
steps, 1 hyper step per cycle). Baselines on the same plain MLP (``nnx.Linear``) and schedule:
fixed dropout 0 / 0.2 / 0.5 (no noise), and a random search whose number of trials matches the
STN run's wall time. Reported: the validation cross-entropy at the end and the best one seen
during training (evaluated every few epochs), test accuracy, the final hyperparameters.

    python -m experiments.stn_digits              # a few minutes on a laptop CPU
    python -m experiments.stn_digits --smoke
"""

from __future__ import annotations

import numpy as np

from experiments import _common

NAMES = _common.DIGITS_NAMES
METHODS = _common.stn_variants()  # --variant -> STN method class


def random_configs(rs, k):
    """Random-search draws: dropout rates uniform in [0, 0.8], noise log-uniform in [1e-3, 1]."""
    return {
        "drop_in": rs.uniform(0.0, 0.8, k),
        "drop_hidden": rs.uniform(0.0, 0.8, k),
        "noise": np.exp(rs.uniform(np.log(1e-3), 0.0, k)),
    }


def main(argv=None):
    parser = _common.make_parser("stn_digits", __doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam step on the weights")
    parser.add_argument("--hyper-lr", type=float, default=3e-3, help="Adam step on hparams")
    parser.add_argument("--variant", choices=["stn", "delta"], default="stn")
    parser.add_argument("--entropy-weight", type=float, default=1e-3)
    parser.add_argument("--init-scale", type=float, default=0.5, help="perturbation scale")
    parser.add_argument(
        "--max-trials", type=int, default=64, help="cap on the random-search trials"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.max_trials = 4, 4
    out = _common.results_dir(args)
    data = _common.load_digits(seed=args.seed)
    sizes = (64, 256, 256, 10)
    eval_every = 2 if args.smoke else 5
    show = not args.no_progress

    stn_result = _common.run_stn(
        lambda rngs: _common.StnMlp(sizes, 3, rngs=rngs),
        data,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        lr=args.lr,
        hyper_lr=args.hyper_lr,
        method=METHODS[args.variant](),
        entropy_weight=args.entropy_weight,
        init_scale=args.init_scale,
        warmup_epochs=0 if args.smoke else 5,
        eval_every=eval_every,
        desc=args.variant,
        show_progress=show,
    )
    plain = lambda rngs: _common.PlainMlp(sizes, rngs=rngs)
    common = dict(
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        lr=args.lr,
        eval_every=eval_every,
    )
    fixed_cfg = {
        "drop_in": np.array([0.0, 0.2, 0.5]),
        "drop_hidden": np.array([0.0, 0.2, 0.5]),
        "noise": np.zeros(3),
    }
    rs = np.random.RandomState(args.seed)
    if args.smoke:
        # One compiled run for the fixed baselines and two random draws.
        trials = 2
        draws = random_configs(rs, trials)
        both = {k: np.concatenate([fixed_cfg[k], draws[k]]) for k in fixed_cfg}
        results, seconds = _common.train_fixed(plain, both, data, **common)
        fixed, search = results[:3], results[3:]
        per_run = seconds / len(results)
        search_seconds = per_run * trials
    else:
        fixed, fixed_seconds = _common.train_fixed(plain, fixed_cfg, data, **common)
        per_run = fixed_seconds / 3
        # As many trials as fit in the STN run's wall time.
        trials = min(args.max_trials, max(2, round(stn_result["seconds"] / max(per_run, 1e-9))))
        search, search_seconds = _common.train_fixed(
            plain, random_configs(rs, trials), data, **common
        )
    best = min(search, key=lambda r: r["val_loss"])

    rows = [
        _common.stn_row(
            f"{args.variant.upper()} (tuned online)", stn_result, stn_result["seconds"]
        ),
        *(
            _common.stn_row(f"fixed dropout {p:g}", r, per_run)
            for p, r in zip((0.0, 0.2, 0.5), fixed, strict=True)
        ),
        _common.stn_row(
            f"random search ({trials} trials, best by final val)", best, search_seconds
        ),
    ]
    record = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "stn": {k: v for k, v in stn_result.items()},
        "val_loss": stn_result["val_loss"],
        "best_val_loss": stn_result["best_val_loss"],
        "test_accuracy": stn_result["test_accuracy"],
        "hparams": stn_result["hparams"],
        "fixed": {f"dropout {p:g}": r for p, r in zip((0.0, 0.2, 0.5), fixed, strict=True)},
        "random_search": {"trials": trials, "best": best, "all": search},
        "reference": {
            "pytorch_stn_val_loss": "about 0.05-0.06",
            "no_dropout_val_loss": "about 0.14",
        },
        "rows": rows,
    }
    _common.save_json(out / "stn_digits.json", record)
    _common.save_csv(out / "stn_digits.csv", rows)
    _common.plot_schedule(out / "stn_digits.png", stn_result, f"{args.variant.upper()} on digits")
    _common.print_table(
        rows, title=f"digits MLP, {args.epochs} epochs (reference: PyTorch STN val CE ~0.05-0.06)"
    )
    return record


if __name__ == "__main__":
    main()
