"""The search space of layer-wise allocations: per-layer removal counts n_l under one global budget.

Constraints (per MoE layer l with E_l routed experts; the rules are `moeprune.plan.LayerBounds`):
    sum_l n_l = B                  (global budget: B = sum_l u_l, u = `plan.uniform_counts`)
    min_l <= n_l <= max_l, max_l <= E_l - max(top_k, 1)
    n_l divisible by n_group for group-limited routers (every group loses n_l / n_group experts),
        and each selected group keeps enough experts to fill top_k
plus optional user minimum/maximum removals per layer. The uniform plan u is in the space (unless
the user's limits exclude it), so every plan of the search removes as many experts as uniform.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from ..arch import MoELayer
from ..errors import PlanError
from ..plan import ExpertPlan, LayerBounds, layer_bounds, uniform_counts

Counts = tuple[int, ...]  # n_l per MoE layer, in decoder order


@dataclass(frozen=True)
class AllocationSpace:
    layers: tuple[LayerBounds, ...]
    budget: int
    uniform: Counts | None = None  # u, when built from a sparsity and allowed by the limits

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
        """Bounds from the model's MoE layers (narrowed by `min_remove`/`max_remove`); budget
        B = sum of the uniform counts at `sparsity`, unless `budget` is given."""
        min_remove, max_remove = min_remove or {}, max_remove or {}
        bounds = tuple(
            layer_bounds(layer, min_remove.get(layer.index), max_remove.get(layer.index)) for layer in layers
        )
        if not bounds:
            raise PlanError("the model has no MoE layers to allocate")
        total = sum(b.num_experts for b in bounds)
        uniform = None
        if budget is None:
            if sparsity is None:
                raise PlanError("give a sparsity or a budget")
            per_layer = uniform_counts(layers, sparsity)
            uniform = tuple(per_layer[b.index] for b in bounds)
            budget = sum(uniform)
            if not all(b.allows(n) for b, n in zip(bounds, uniform, strict=True)):
                uniform = None  # the user's limits exclude the uniform plan
        lo_sum, hi_sum = sum(b.min_remove for b in bounds), sum(b.max_remove for b in bounds)
        if not lo_sum <= budget <= hi_sum:
            raise PlanError(
                f"cannot remove {budget} of {total} routed experts: the per-layer limits allow "
                f"{lo_sum}..{hi_sum} (each layer keeps at least top_k experts)"
            )
        return cls(bounds, int(budget), uniform)

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
        return {
            "budget": self.budget,
            "uniform": None if self.uniform is None else list(self.uniform),
            "layers": [asdict(r) for r in self.layers],
        }


RemovalOrder = Mapping[int, Sequence[int]]  # decoder layer -> expert ids, removed first first


def plan_from_counts(space: AllocationSpace, order: RemovalOrder, counts: Sequence[int]) -> ExpertPlan:
    """Remove the first n_l experts of each layer's order (group-limited layers: the first n_l/n_group
    of the order within every group, so each group loses the same number)."""
    removed: dict[int, list[int]] = {}
    for bounds, n in zip(space.layers, counts, strict=True):
        ids = [int(e) for e in order.get(bounds.index, ())]
        if sorted(ids) != list(range(bounds.num_experts)):
            raise PlanError(
                f"layer {bounds.index}: the removal order must list each of the {bounds.num_experts} experts once"
            )
        if bounds.step == 1:
            removed[bounds.index] = ids[:n]
            continue
        per_group = n // bounds.step
        removed[bounds.index] = [
            e for g in range(bounds.step) for e in [x for x in ids if bounds.group_of(x) == g][:per_group]
        ]
    return ExpertPlan.from_removed({k: v for k, v in removed.items() if v})
