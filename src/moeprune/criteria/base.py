"""The criterion registry and the group-aware turn of per-expert scores into a removal order."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..observe import LayerStats
from ..registry import Registry

# (layer statistics, seed, options) -> removal order: a permutation of range(E), first = removed first
OrderFn = Callable[[LayerStats, int, dict], list[int]]
# (layer statistics, number to remove, seed, options) -> the removed expert ids
ChooseFn = Callable[[LayerStats, int, int, dict], list[int]]


@dataclass(frozen=True)
class Criterion:
    """A within-layer criterion: a full removal order, and optionally a better set for a given count
    (criteria whose best sets do not nest, e.g. exact NAEE); by default the order's prefix."""

    name: str
    order: OrderFn
    choose: ChooseFn | None = None
    needs_dense: bool = False  # needs the all-experts token subsample (observe dense_tokens > 0)
    summary: str = ""


CRITERIA: Registry[Criterion] = Registry("criterion")


def register(criterion: Criterion) -> Criterion:
    return CRITERIA.register(criterion.name)(criterion)


def score_criterion(name: str, summary: str):
    """Register ``score(layer_stats, seed) -> (E,) array`` as a criterion: lowest score removed first."""

    def decorator(score: Callable[[LayerStats, int], np.ndarray]):
        def order(ls: LayerStats, seed: int, options: dict) -> list[int]:
            return order_by_score(np.asarray(score(ls, seed), dtype=np.float64), ls.num_groups)

        register(Criterion(name=name, order=order, summary=summary))
        return score

    return decorator


def group_of(expert: int, num_experts: int, num_groups: int) -> int:
    return expert // (num_experts // num_groups)


def order_by_score(scores: np.ndarray, num_groups: int = 1) -> list[int]:
    """Ascending score (ties: lower id first). With G expert groups the order goes in rounds: round j
    holds the j-th lowest expert of every group (by score within the round), so every prefix whose
    length is a multiple of G removes the same number from each group."""
    e = len(scores)
    ranked = sorted(range(e), key=lambda i: (scores[i], i))
    if num_groups <= 1:
        return ranked
    per_group = [[i for i in ranked if group_of(i, e, num_groups) == g] for g in range(num_groups)]
    return interleave_groups(per_group, key=lambda i: (scores[i], i))


def interleave_groups(per_group: Sequence[Sequence[int]], key: Callable[[int], object]) -> list[int]:
    """Round j = the j-th expert of every group's own order, sorted by `key` within the round."""
    order: list[int] = []
    for j in range(max(len(g) for g in per_group)):
        order += sorted((g[j] for g in per_group if j < len(g)), key=key)
    return order
