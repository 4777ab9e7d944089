"""Statistics + criterion -> per-layer removal order, removed sets for given counts, uniform counts.

    removal_order(stats, "reap")                 -> {layer: [expert ids, first removed first]} (all E)
    choose_removed(stats, "naee", {3: 4, 5: 4})  -> ExpertPlan (the set each count removes)
    uniform_counts(stats, 0.5)                   -> {layer: n} (`moeprune.plan.uniform_counts`)
    rank(stats, "frequency", sparsity=0.5)       -> {layer: removed ids in removal order}

Counts follow `moeprune.plan` (at least top_k experts stay; for group-limited routers with G groups
a multiple of G); the orders of every criterion remove the same number from each group at such counts.
"""

from __future__ import annotations

from ..errors import MoepruneError, PlanError
from ..observe import ExpertStats
from ..plan import ExpertPlan, layer_bounds, uniform_counts
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
        n = layer_bounds(ls).check(int(n))
        if crit.choose is not None:
            removed[index] = [int(e) for e in crit.choose(ls, int(n), seed, options)]
        else:
            removed[index] = [int(e) for e in crit.order(ls, seed, options)[: int(n)]]
    return ExpertPlan.from_removed(removed)


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
