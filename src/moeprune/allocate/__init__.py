"""Layer-wise allocation: how many experts each MoE layer loses under one global budget.

The uniform plan (`uniform_allocation`, the one of `moeprune.plan`) and EvoESAP's search of the
counts (the `CountsProblem` of `count_search`, run by `moeprune.evolve`); the registry of
allocations a run can use is `pipelines.PIPELINES`.
"""

from .count_search import CountsProblem, EvoConfig, initial_population, mutate, search_counts
from .counts import counts_from_weights, uniform_allocation
from .patterns import INIT_PATTERNS
from .space import AllocationSpace, Counts, RemovalOrder, plan_from_counts

__all__ = [
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
