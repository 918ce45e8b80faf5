"""bilevel: gradient-based bilevel hyperparameter optimization in JAX.

Hyperparameters (weight decay, dropout, per-example weights, learning rates, ...) are tuned by
hypergradients computed through the inner training problem with :mod:`solvers`.
"""

from bilevel import fed, hparams, pbt, stn
from bilevel._bilevel import (
    BilevelOptimizer,
    BilevelState,
    Forward,
    HypergradientInfo,
    TrainingLoop,
    hypergradient,
    implicit_hypergradient,
)
from bilevel._borep import BOREP, BOREPMemory
from bilevel._checkpoint import latest_step, restore_checkpoint, save_checkpoint
from bilevel._fit import EarlyStopping, fit
from bilevel._hd import (
    DEFAULT_HYPER_LR,
    HypergradientLRState,
    hd_adam,
    hd_sgd,
    hypergradient_lr,
)
from bilevel._hyper_adapt import HyperAdaptState, hyper_adapt
from bilevel._maid import MAID, MAIDEstimates, MAIDState
from bilevel._outer import GroupAdamState, NormalizedMomentumState, group_adam, normalized_momentum
from bilevel._population import Population, PopulationState, RoundResult
from bilevel._utils import epoch_minibatches, minibatches, nnx_apply_fn

__version__ = "0.1.0"

__all__ = [
    "BOREP",
    "BOREPMemory",
    "DEFAULT_HYPER_LR",
    "BilevelOptimizer",
    "BilevelState",
    "EarlyStopping",
    "Forward",
    "GroupAdamState",
    "HypergradientInfo",
    "MAID",
    "MAIDEstimates",
    "MAIDState",
    "TrainingLoop",
    "fit",
    "group_adam",
    "hypergradient",
    "implicit_hypergradient",
    "latest_step",
    "epoch_minibatches",
    "minibatches",
    "normalized_momentum",
    "NormalizedMomentumState",
    "Population",
    "PopulationState",
    "RoundResult",
    "nnx_apply_fn",
    "restore_checkpoint",
    "save_checkpoint",
    "HyperAdaptState",
    "HypergradientLRState",
    "__version__",
    "fed",
    "hd_adam",
    "hparams",
    "pbt",
    "stn",
    "hd_sgd",
    "hyper_adapt",
    "hypergradient_lr",
]
