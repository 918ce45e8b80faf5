"""solvers: differentiate through an inner optimization, over pytrees, in pure JAX."""

from solvers._linear import (
    CG,
    GMRES,
    BiCGStab,
    Direct,
    LinearSolver,
    Neumann,
    Nystrom,
    SolveStats,
    bicgstab,
    cg,
    direct,
    estimate_inverse_max_eigenvalue,
    gmres,
    neumann,
    nystrom,
)

__all__ = [
    "CG",
    "BiCGStab",
    "Direct",
    "GMRES",
    "LinearSolver",
    "Neumann",
    "Nystrom",
    "SolveStats",
    "bicgstab",
    "cg",
    "direct",
    "estimate_inverse_max_eigenvalue",
    "gmres",
    "neumann",
    "nystrom",
]

from solvers import checks, tree
from solvers._argmin import ArgminInfo, argmin
from solvers._curvature import GaussNewton, gauss_newton
from solvers._implicit import (
    ImplicitSolveWarning,
    custom_fixed_point,
    custom_root,
    implicit_solution,
    root_vjp,
)
from solvers._methods import (
    AbstractMethod,
    DampedAdjoint,
    Forward,
    Hypergradient,
    Implicit,
    InnerLoop,
    Truncated,
    Unrolled,
    windowed_solve,
)
from solvers._status import GuardResult, Status, error_if_failed, guard, status_message

__all__ += [
    "AbstractMethod",
    "DampedAdjoint",
    "GaussNewton",
    "gauss_newton",
    "ArgminInfo",
    "Forward",
    "Hypergradient",
    "InnerLoop",
    "windowed_solve",
    "GuardResult",
    "ImplicitSolveWarning",
    "checks",
    "error_if_failed",
    "guard",
    "status_message",
    "tree",
    "Implicit",
    "Status",
    "Truncated",
    "Unrolled",
    "argmin",
    "custom_fixed_point",
    "custom_root",
    "implicit_solution",
    "root_vjp",
]
