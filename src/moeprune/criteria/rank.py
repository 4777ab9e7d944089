"""Statistics + criterion -> per-layer removal order, removed sets for given counts, uniform counts.

    removal_order(stats, "reap")                 -> {layer: [expert ids, first removed first]} (all E)
    choose_removed(stats, "naee", {3: 4, 5: 4})  -> ExpertPlan (the set each count removes)
    uniform_counts(stats, 0.5)                   -> {layer: n}, the same n in every MoE layer
    rank(stats, "frequency", sparsity=0.5)       -> {layer: removed ids in removal order}

Counts must leave at least top_k experts, and for group-limited routers (G groups) be a multiple of
G; the orders of every criterion remove the same number from each group at such counts.
"""

from __future__ import annotations

import math

from ..errors import MoepruneError, PlanError
from ..observe import ExpertStats, LayerStats
from ..surgery import ExpertPlan
from .base import CRITERIA, Criterion


def get_criterion(name: str, stats: ExpertStats | None = None) -> Criterion:
    """The registered criterion (RegistryError with "did you mean" otherwise); checks the stats hold
    what it needs."""
    criterion = CRITERIA.get(name)
    if stats is not None and criterion.needs_dense and not stats.has_dense:
        raise MoepruneError(
            f"criterion '{name}' needs the dense token subsample, which these statistics lack; "
            f"observe again with '{name}' among the criteria"
        )
    return criterion


def supported_criteria(stats: ExpertStats) -> list[str]:
    return [n for n in CRITERIA.names() if not CRITERIA.get(n).needs_dense or stats.has_dense]


def removal_order(stats: ExpertStats, criterion: str, seed: int = 0, **options) -> dict[int, list[int]]:
    """Each MoE layer's full removal order (a permutation of its expert ids; first = removed first)."""
    crit = get_criterion(criterion, stats)
    return {i: [int(e) for e in crit.order(ls, seed, options)] for i, ls in stats.layers.items()}


def max_removable(ls: LayerStats) -> int:
    """The most experts a layer can lose: top_k must stay, and with G groups the topk_groups selected
    groups must still hold top_k experts."""
    if ls.num_groups <= 1:
        return ls.num_experts - ls.top_k
    size = ls.num_experts // ls.num_groups
    per_group = size - math.ceil(ls.top_k / ls.topk_groups)
    return max(0, per_group) * ls.num_groups


def check_count(ls: LayerStats, n: int) -> None:
    if not 0 <= n <= max_removable(ls):
        raise PlanError(
            f"layer {ls.index}: cannot remove {n} of {ls.num_experts} experts (top_k={ls.top_k}); "
            f"remove 0..{max_removable(ls)}"
        )
    if n % ls.num_groups:
        raise PlanError(
            f"layer {ls.index}: the group-limited router has {ls.num_groups} groups, so the number "
            f"removed must be a multiple of {ls.num_groups}, got {n}"
        )


def choose_removed(
    stats: ExpertStats, criterion: str, counts: dict[int, int], seed: int = 0, **options
) -> ExpertPlan:
    """The experts each layer loses at the given counts (layers not named lose none)."""
    crit = get_criterion(criterion, stats)
    removed: dict[int, list[int]] = {}
    for index, n in counts.items():
        if index not in stats.layers:
            raise PlanError(f"layer {index} is not an MoE layer; MoE layers are {sorted(stats.layers)}")
        ls = stats.layers[index]
        check_count(ls, int(n))
        if crit.choose is not None:
            removed[index] = [int(e) for e in crit.choose(ls, int(n), seed, options)]
        else:
            removed[index] = [int(e) for e in crit.order(ls, seed, options)[: int(n)]]
    return ExpertPlan.from_removed(removed)


def uniform_counts(stats: ExpertStats, sparsity: float) -> dict[int, int]:
    """n = round(sparsity * E) per layer, rounded to a multiple of the layer's groups and capped so
    that top_k experts stay."""
    if not 0.0 <= sparsity < 1.0:
        raise MoepruneError(f"sparsity must be in [0, 1), got {sparsity}")
    counts = {}
    for index, ls in stats.layers.items():
        g = ls.num_groups
        n = g * math.floor(sparsity * ls.num_experts / g + 0.5)
        counts[index] = min(n, max_removable(ls))
    return counts


def rank(
    stats: ExpertStats,
    criterion: str,
    *,
    n_remove: int | dict[int, int] | None = None,
    sparsity: float | None = None,
    seed: int = 0,
    **options,
) -> dict[int, list[int]]:
    """Removed experts per layer, in removal order, for a count per layer (int: every layer) or a
    uniform sparsity. Neither given: the full removal order."""
    if n_remove is None and sparsity is None:
        return removal_order(stats, criterion, seed, **options)
    if n_remove is not None and sparsity is not None:
        raise MoepruneError("give either n_remove or sparsity, not both")
    if sparsity is not None:
        counts = uniform_counts(stats, sparsity)
    elif isinstance(n_remove, int):
        counts = {i: n_remove for i in stats.layers}
    else:
        counts = dict(n_remove)
    plan = choose_removed(stats, criterion, counts, seed, **options)
    crit = get_criterion(criterion, stats)
    result = {}
    for index, removed in plan.removed.items():
        order = crit.order(stats.layers[index], seed, options)
        position = {e: p for p, e in enumerate(order)}
        result[index] = sorted(removed, key=lambda e: position[e])
    return result
