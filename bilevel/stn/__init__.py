"""Self-Tuning Networks for Flax NNX: best-response layers, perturbation, regularizers, trainer.

A Self-Tuning Network (MacKay et al., ICLR 2019) fits a structured approximation of the
best-response function ``w*(lambda)`` inside the network and tunes its hyperparameters online,
including ones the training loss cannot be differentiated by (dropout rates, augmentation
magnitudes), producing hyperparameter schedules. Delta-STN (Bae and Grosse, NeurIPS 2020) is
``Trainer(..., method=stn.DeltaSTN())``: variants are strategy objects (``stn.STN()``,
``stn.DeltaSTN(linearize=False)``) that carry their behaviour.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from bilevel import stn
  >>> layer = stn.StnLinear(8, 4, num_hparams=2, rngs=nnx.Rngs(0))
  >>> layer(jnp.ones((3, 8)), jnp.zeros((3, 2))).shape
  (3, 4)
"""

from bilevel.stn._augment import brightness, contrast, cutout, dropout, gaussian_noise, translate
from bilevel.stn._layers import (
    ResponseParam,
    StnConv,
    StnLinear,
    effective_l2,
    mip_encoding,
    stn_layers,
)
from bilevel.stn._methods import STN, DeltaSTN, StnHparams, StnMethod
from bilevel.stn._perturb import entropy, perturb, scale_from_param, scale_to_param
from bilevel.stn._trainer import Trainer, TrainerState

__all__ = [
    "STN",
    "DeltaSTN",
    "ResponseParam",
    "StnConv",
    "StnHparams",
    "StnLinear",
    "StnMethod",
    "Trainer",
    "TrainerState",
    "brightness",
    "contrast",
    "cutout",
    "dropout",
    "effective_l2",
    "entropy",
    "gaussian_noise",
    "mip_encoding",
    "perturb",
    "scale_from_param",
    "scale_to_param",
    "stn_layers",
    "translate",
]
