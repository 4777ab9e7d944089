"""Layer-wise allocation: how many experts each MoE layer loses under one global budget.

Allocators (registry `ALLOCATORS`): ``uniform``, ``given`` (counts supplied by the user) and
``evoesap`` (evolutionary search maximising a fitness, see `evolution`).
"""

from .counts import counts_from_weights, uniform_counts
from .evolution import EvoConfig, EvoResult, evolve, initial_population, mutate
from .patterns import INIT_PATTERNS
from .space import AllocationSpace, Counts, LayerRoom, plan_from_counts
from .strategies import ALLOCATORS

__all__ = [
    "ALLOCATORS",
    "INIT_PATTERNS",
    "AllocationSpace",
    "Counts",
    "EvoConfig",
    "EvoResult",
    "LayerRoom",
    "counts_from_weights",
    "evolve",
    "initial_population",
    "mutate",
    "plan_from_counts",
    "uniform_counts",
]
