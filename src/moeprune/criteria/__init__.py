"""Within-layer criteria: `ExpertStats` -> which experts each MoE layer loses first.

Registered names (SPEC's table): random, frequency, soft_frequency, ean, ean_mean, weighted_ean,
reap (scores.py), naee (naee.py), mop (mop.py). Add one with `register(Criterion(...))` or
``@score_criterion(name, summary)``.

    from moeprune.criteria import removal_order, choose_removed, uniform_counts
    order = removal_order(stats, "reap", seed=0)          # {layer: permutation, first removed first}
    plan = choose_removed(stats, "naee", uniform_counts(stats, 0.5))   # ExpertPlan
"""

from ..plan import max_removable, uniform_counts
from . import mop, naee, scores  # noqa: F401  (registration)
from .base import CRITERIA, Criterion, order_by_score, register, score_criterion
from .observe_for import observe_for
from .rank import choose_removed, get_criterion, rank, removal_order, supported_criteria

__all__ = [
    "CRITERIA",
    "Criterion",
    "choose_removed",
    "get_criterion",
    "max_removable",
    "observe_for",
    "order_by_score",
    "rank",
    "register",
    "removal_order",
    "score_criterion",
    "supported_criteria",
    "uniform_counts",
]
