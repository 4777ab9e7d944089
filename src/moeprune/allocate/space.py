"""The search space of layer-wise allocations: per-layer removal counts n_l under one global budget.

Constraints (per MoE layer l with E_l routed experts):
    sum_l n_l = B                                  (global budget, e.g. round(sparsity * sum_l E_l))
    min_l <= n_l <= max_l, max_l <= E_l - max(top_k, 1)
    n_l divisible by n_group for group-limited routers (every group loses n_l / n_group experts),
        and each selected group keeps enough experts to fill top_k
plus optional user minimum/maximum removals per layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from ..arch import MoELayer
from ..errors import PlanError
from ..surgery import ExpertPlan

Counts = tuple[int, ...]  # n_l per MoE layer, in decoder order


@dataclass(frozen=True)
class LayerRoom:
    index: int  # decoder layer index
    num_experts: int
    step: int  # n_l must be a multiple of this (n_group, else 1)
    min_remove: int
    max_remove: int

    def allows(self, n: int) -> bool:
        return self.min_remove <= n <= self.max_remove and n % self.step == 0


@dataclass(frozen=True)
class AllocationSpace:
    layers: tuple[LayerRoom, ...]
    budget: int

    @classmethod
    def from_layers(
        cls,
        layers: Sequence[MoELayer],
        *,
        sparsity: float | None = None,
        budget: int | None = None,
        min_remove: Mapping[int, int] | None = None,
        max_remove: Mapping[int, int] | None = None,
    ) -> AllocationSpace:
        """Rooms from the model's MoE layers; budget B = round(sparsity * total experts), rounded to a
        multiple of the gcd of the layers' steps, unless `budget` is given."""
        rooms = []
        for layer in layers:
            e, k, g = layer.num_experts, max(layer.top_k, 1), layer.num_groups
            if g > 1:
                size = e // g
                per_group = size - math.ceil(layer.top_k / max(layer.topk_groups, 1))
                hi = g * max(per_group, 0)
            else:
                hi = e - k
            lo = 0
            if min_remove and layer.index in min_remove:
                lo = int(min_remove[layer.index])
            if max_remove and layer.index in max_remove:
                hi = min(hi, int(max_remove[layer.index]))
            lo = -(-lo // g) * g  # round up to a multiple of the step
            hi = hi // g * g
            if lo > hi:
                raise PlanError(
                    f"layer {layer.index}: no valid removal count between min {lo} and max {hi} "
                    f"({e} experts, top_k={layer.top_k}, step {g})"
                )
            rooms.append(LayerRoom(layer.index, e, g, lo, hi))
        if not rooms:
            raise PlanError("the model has no MoE layers to allocate")
        total = sum(r.num_experts for r in rooms)
        if budget is None:
            if sparsity is None or not 0.0 <= sparsity < 1.0:
                raise PlanError(f"sparsity must be in [0, 1), got {sparsity}")
            gcd = math.gcd(*(r.step for r in rooms))
            budget = round(sparsity * total / gcd) * gcd
        lo_sum, hi_sum = sum(r.min_remove for r in rooms), sum(r.max_remove for r in rooms)
        if not lo_sum <= budget <= hi_sum:
            raise PlanError(
                f"cannot remove {budget} of {total} routed experts: the per-layer limits allow "
                f"{lo_sum}..{hi_sum} (each layer keeps at least top_k experts)"
            )
        return cls(tuple(rooms), int(budget))

    @property
    def total_experts(self) -> int:
        return sum(r.num_experts for r in self.layers)

    def is_valid(self, counts: Sequence[int]) -> bool:
        return (
            len(counts) == len(self.layers)
            and sum(counts) == self.budget
            and all(r.allows(n) for r, n in zip(self.layers, counts, strict=True))
        )

    def check(self, counts: Sequence[int]) -> Counts:
        if len(counts) != len(self.layers):
            raise PlanError(f"expected {len(self.layers)} per-layer counts, got {len(counts)}")
        for r, n in zip(self.layers, counts, strict=True):
            if not r.allows(n):
                raise PlanError(
                    f"layer {r.index}: removing {n} experts is outside {r.min_remove}..{r.max_remove} (step {r.step})"
                )
        if sum(counts) != self.budget:
            raise PlanError(f"the counts remove {sum(counts)} experts, the budget is {self.budget}")
        return tuple(int(n) for n in counts)

    def as_dict(self) -> dict:
        return {"budget": self.budget, "layers": [asdict(r) for r in self.layers]}


RemovalOrder = Mapping[int, Sequence[int]]  # decoder layer -> expert ids, removed first first


def plan_from_counts(space: AllocationSpace, order: RemovalOrder, counts: Sequence[int]) -> ExpertPlan:
    """Remove the first n_l experts of each layer's order (group-limited layers: the first n_l/n_group
    of the order within every group, so each group loses the same number)."""
    removed: dict[int, list[int]] = {}
    for room, n in zip(space.layers, counts, strict=True):
        ids = [int(e) for e in order.get(room.index, ())]
        if sorted(ids) != list(range(room.num_experts)):
            raise PlanError(
                f"layer {room.index}: the removal order must list each of the {room.num_experts} experts once"
            )
        if room.step == 1:
            removed[room.index] = ids[:n]
            continue
        size, per_group = room.num_experts // room.step, n // room.step
        removed[room.index] = [
            e for g in range(room.step) for e in [x for x in ids if x // size == g][:per_group]
        ]
    return ExpertPlan.from_removed({k: v for k, v in removed.items() if v})
