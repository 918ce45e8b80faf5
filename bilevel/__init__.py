"""bilevel: gradient-based bilevel hyperparameter optimization in JAX.

Hyperparameters (weight decay, dropout, per-example weights, learning rates, ...) are tuned by
hypergradients computed through the inner training problem with :mod:`solvers`.
"""

from bilevel import hparams, stn
from bilevel._bilevel import (
    BilevelOptimizer,
    BilevelState,
    Forward,
    HypergradientInfo,
    TrainingLoop,
    hypergradient,
    implicit_hypergradient,
)
from bilevel._checkpoint import latest_step, restore_checkpoint, save_checkpoint
from bilevel._fit import fit
from bilevel._hd import (
    DEFAULT_HYPER_LR,
    HypergradientLRState,
    hd_adam,
    hd_sgd,
    hypergradient_lr,
)
from bilevel._hyper_adapt import HyperAdaptState, hyper_adapt
from bilevel._utils import minibatches, nnx_apply_fn

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_HYPER_LR",
    "BilevelOptimizer",
    "BilevelState",
    "Forward",
    "HypergradientInfo",
    "TrainingLoop",
    "fit",
    "hypergradient",
    "implicit_hypergradient",
    "latest_step",
    "minibatches",
    "nnx_apply_fn",
    "restore_checkpoint",
    "save_checkpoint",
    "HyperAdaptState",
    "HypergradientLRState",
    "__version__",
    "hd_adam",
    "hparams",
    "stn",
    "hd_sgd",
    "hyper_adapt",
    "hypergradient_lr",
]
