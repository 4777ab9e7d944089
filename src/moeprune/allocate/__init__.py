"""Layer-wise allocation: how many experts each MoE layer loses under one global budget.

Allocators (registry `ALLOCATORS`): ``uniform`` (the uniform plan of `moeprune.plan`), ``given``
(counts supplied by the user) and ``evoesap`` (evolutionary search maximising a fitness: the
`CountsProblem` of `count_search`, run by `moeprune.evolve`).
"""

from .count_search import CountsProblem, EvoConfig, initial_population, mutate, search_counts
from .counts import counts_from_weights, uniform_allocation
from .patterns import INIT_PATTERNS
from .space import AllocationSpace, Counts, RemovalOrder, plan_from_counts
from .strategies import ALLOCATORS

__all__ = [
    "ALLOCATORS",
    "INIT_PATTERNS",
    "AllocationSpace",
    "Counts",
    "CountsProblem",
    "EvoConfig",
    "RemovalOrder",
    "counts_from_weights",
    "initial_population",
    "mutate",
    "plan_from_counts",
    "search_counts",
    "uniform_allocation",
]
