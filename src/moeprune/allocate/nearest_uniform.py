"""The uniform plan nearest to a searched (non-uniform) one, for engines that need one expert count.

llama.cpp (GGUF), vLLM and SGLang read ONE routed-expert count per model from the config, so they cannot
serve a checkpoint whose layers keep different numbers of experts (EvoESAP / EEP plans). This module turns
such a plan into the nearest plan that keeps the same number of experts in every MoE layer:

    nearest_uniform(searched, order, groups=..., max_remove=...) -> ExpertPlan

The run directory of ``moeprune search`` holds the searched plan (``plan.json``) but not yet the full
per-layer removal order the search used; `run_order` reads it from ``removal_order.json`` when the
search writes one (``{"criterion": ..., "seed": ..., "order": {"<layer>": [all expert ids]}}``), and
otherwise the caller recomputes it (same criterion, calibration data and seed as the search) and
`check_order` verifies it reproduces the searched plan.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import MoepruneError, PlanError
from ..plan import ExpertPlan

ORDER_FILE = "removal_order.json"
PLAN_FILE = "plan.json"
MANIFEST = "moeprune.json"


def _removed(plan: ExpertPlan | Mapping[int, Sequence[int]]) -> dict[int, list[int]]:
    raw = plan.removed if isinstance(plan, ExpertPlan) else plan
    return {int(k): [int(e) for e in v] for k, v in raw.items()}


def _take(order: Sequence[int], searched: Sequence[int], n: int) -> list[int]:
    """`n` ids from `order` closest to the set `searched`: its members first (in order), then the
    others (in order). With n <= |searched| this is a subset of it, else a superset."""
    inside = set(searched)
    first = [e for e in order if e in inside]
    rest = [e for e in order if e not in inside]
    return (first + rest)[:n]


def uniform_count(
    searched: ExpertPlan | Mapping[int, Sequence[int]],
    num_experts: Mapping[int, int],
    *,
    groups: Mapping[int, int] | None = None,
    max_remove: Mapping[int, int] | None = None,
) -> int:
    """K, the routed experts every MoE layer keeps in the nearest uniform plan: the valid K whose total
    removed, sum_l (E_l - K), is closest to the searched plan's total removed; on a tie the smaller K
    (more removed), as `criteria.uniform_counts` rounds halves up. Valid: 0 <= E_l - K <= max_remove_l and E_l - K a
    multiple of the layer's router groups."""
    removed = _removed(searched)
    groups = groups or {}
    total = sum(len(removed.get(i, ())) for i in num_experts)
    smallest = min(num_experts.values())
    best: tuple[int, int] | None = None
    for k in range(smallest, -1, -1):  # descending K
        ok = all(
            0 <= e - k <= (max_remove or {}).get(i, e) and (e - k) % max(int(groups.get(i, 1)), 1) == 0
            for i, e in num_experts.items()
        )
        if not ok:
            continue
        gap = abs(sum(e - k for e in num_experts.values()) - total)
        if best is None or gap <= best[0]:  # `<=`: on a tie the later, smaller K wins
            best = (gap, k)
    if best is None:
        raise PlanError(
            "no expert count is valid in every MoE layer (router groups or top_k limits differ too much "
            "between layers); a uniform plan does not exist for this model"
        )
    return best[1]


def nearest_uniform(
    searched: ExpertPlan | Mapping[int, Sequence[int]],
    order: Mapping[int, Sequence[int]],
    *,
    groups: Mapping[int, int] | None = None,
    max_remove: Mapping[int, int] | None = None,
) -> ExpertPlan:
    """The uniform plan nearest to `searched`.

    `order`: every MoE layer's full removal order (a permutation of its expert ids, first = removed
    first; ``criteria.removal_order``), the layers being the keys. `searched`: removed ids per layer
    (layers not named lose none). `groups`: router groups per layer (group-limited routers, every group
    loses the same number), default 1. `max_remove`: the most a layer may lose (top_k must stay),
    default E_l.

    "Nearest", precisely: (1) the expert count: every layer keeps the same K (`uniform_count`): the
    total removed is the searched total when the number of layers divides it (with equal E_l), else
    the nearest total reachable; (2) the experts: among all plans that keep K in every layer, one with
    the fewest experts whose kept/removed status differs from `searched`, i.e. the smallest symmetric
    difference of the removed sets, which is sum_l |u_l - n_l| (u_l = E_l - K, n_l = searched count):
    a layer that must lose fewer than the search chose drops a subset of the searched removals, one
    that must lose more removes all of them plus more, never a mix. Within those, the tie is broken by
    `order` (the criterion's preference): the subset is the searched removals that come first in the
    order, the extra experts the first others in it. Grouped layers do this within every group. When
    `searched` removes a prefix of each layer's order (EvoESAP plans do), the result removes the first
    u_l of the order, the plan ``moeprune prune --criterion`` would write at that count.
    """
    removed = _removed(searched)
    groups = {int(k): int(v) for k, v in (groups or {}).items()}
    order = {int(k): [int(e) for e in v] for k, v in order.items()}
    num_experts = {i: len(ids) for i, ids in order.items()}
    for i, ids in order.items():
        if sorted(ids) != list(range(len(ids))):
            raise PlanError(f"layer {i}: the removal order must list each of its {len(ids)} experts once")
    stray = sorted(set(removed) - set(order))
    if stray:
        raise PlanError(
            f"the plan names layers {stray} that have no removal order (MoE layers: {sorted(order)})"
        )
    for i, ids in removed.items():
        if len(set(ids)) != len(ids) or not all(0 <= e < num_experts[i] for e in ids):
            raise PlanError(
                f"layer {i}: removed ids {ids} repeat or are out of range 0..{num_experts[i] - 1}"
            )
    k = uniform_count(removed, num_experts, groups=groups, max_remove=max_remove)
    plan: dict[int, list[int]] = {}
    for i, ids in order.items():
        g = max(groups.get(i, 1), 1)
        size, per_group = num_experts[i] // g, (num_experts[i] - k) // g
        taken: list[int] = []
        for grp in range(g):
            members = [e for e in ids if e // size == grp] if g > 1 else ids
            taken += _take(members, [e for e in removed.get(i, ()) if e in set(members)], per_group)
        if taken:
            plan[i] = taken
    return ExpertPlan.from_removed(plan)


def plan_distance(
    a: ExpertPlan | Mapping[int, Sequence[int]], b: ExpertPlan | Mapping[int, Sequence[int]]
) -> int:
    """Experts removed by exactly one of the two plans (symmetric difference, summed over layers)."""
    ra, rb = _removed(a), _removed(b)
    return sum(len(set(ra.get(i, ())) ^ set(rb.get(i, ()))) for i in set(ra) | set(rb))


def check_order(
    searched: ExpertPlan | Mapping[int, Sequence[int]],
    order: Mapping[int, Sequence[int]],
    groups: Mapping[int, int] | None = None,
) -> None:
    """PlanError unless `searched` removes, in every layer (every group), the first experts of `order`
    -- true of the order the search used, so a recomputed order that fails this is not that order."""
    removed = _removed(searched)
    groups = groups or {}
    for i, ids in order.items():
        ids = [int(e) for e in ids]
        g = max(int(groups.get(i, 1)), 1)
        size = len(ids) // g
        got = removed.get(i, [])
        for grp in range(g):
            members = [e for e in ids if e // size == grp] if g > 1 else ids
            mine = [e for e in got if e in set(members)]
            if set(mine) != set(members[: len(mine)]):
                raise PlanError(
                    f"layer {i}: the searched plan removes {sorted(got)}, not the first {len(got)} experts of "
                    "this removal order; give the criterion, calibration data, sample count, sequence length "
                    "and seed the search used"
                )


def run_plan(run_dir: str | Path) -> ExpertPlan:
    """The searched plan of a ``moeprune search`` run directory (its ``plan.json``)."""
    path = Path(run_dir) / PLAN_FILE
    if not path.is_file():
        raise MoepruneError(f"{run_dir} is not a search run directory: it has no {PLAN_FILE}")
    return ExpertPlan.from_removed(json.loads(path.read_text())["removed"])


def run_order(run_dir: str | Path) -> dict[int, list[int]] | None:
    """The search's full removal order from ``removal_order.json``, or None when the run lacks it."""
    path = Path(run_dir) / ORDER_FILE
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    return {int(k): [int(e) for e in v] for k, v in raw["order"].items()}


def run_criterion(run_dir: str | Path) -> str | None:
    """The criterion recorded by the search (its ``moeprune.json`` manifest), if any."""
    for name in (ORDER_FILE, MANIFEST):
        path = Path(run_dir) / name
        if path.is_file():
            value = json.loads(path.read_text()).get("criterion")
            if value:
                return str(value)
    return None


__all__ = [
    "check_order",
    "nearest_uniform",
    "plan_distance",
    "run_criterion",
    "run_order",
    "run_plan",
    "uniform_count",
]
