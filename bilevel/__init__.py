"""bilevel: gradient-based bilevel hyperparameter optimization in JAX.

Hyperparameters (weight decay, dropout, per-example weights, learning rates, ...) are tuned by
hypergradients computed through the inner training problem with :mod:`solvers`.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
