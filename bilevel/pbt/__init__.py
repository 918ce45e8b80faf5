"""Population Based Training with hypergradients inside, as one jitted program.

:class:`PBT` trains a population of members - :class:`bilevel.BilevelOptimizer` tuners, plain
Optax training steps (:func:`optax_member`) or any :class:`Member` - as one ``vmap``-ped, jitted
program, optionally sharded over a ``jax.sharding.Mesh``. Every ``interval`` steps the worst
members copy better ones and perturb the hyperparameters PBT owns (exploit / explore, Jaderberg
et al., 2017); a gradient tuner keeps tuning its own hyperparameters inside each member. The
lineage is recorded, so the winning hyperparameter *schedule* can be replayed (:meth:`PBT.replay`).
"""

from bilevel.pbt._members import Member, OptaxMember, OptaxMemberState, optax_member
from bilevel.pbt._population import PBT, Lineage, PBTState, Schedule

__all__ = [
    "PBT",
    "Lineage",
    "Member",
    "OptaxMember",
    "OptaxMemberState",
    "PBTState",
    "Schedule",
    "optax_member",
]
