"""Pattern weights -> valid per-layer removal counts (the initial plans of the EvoESAP search).

    n_l = min_l + floor_step(R * w_l / sum(w)) capped at max_l,  R = B - sum(min_l)
then the remainder goes, one step at a time, to the layers with the largest fractional part
(ties: lower layer first), then round-robin over the layers with room until the budget is met.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import PlanError
from .space import AllocationSpace, Counts


def counts_from_weights(space: AllocationSpace, weights: Sequence[float]) -> Counts:
    """Valid counts that follow `weights` (>= 0, one per MoE layer) as closely as steps allow."""
    rooms = space.layers
    if len(weights) != len(rooms):
        raise PlanError(f"expected {len(rooms)} weights, got {len(weights)}")
    w = [max(float(x), 0.0) for x in weights]
    if sum(w) <= 0:
        w = [1.0] * len(rooms)
    rest = space.budget - sum(r.min_remove for r in rooms)
    targets = [rest * x / sum(w) for x in w]
    extra = [
        min(r.max_remove - r.min_remove, math.floor(t / r.step) * r.step)
        for r, t in zip(rooms, targets, strict=True)
    ]
    left = rest - sum(extra)
    by_fraction = sorted(range(len(rooms)), key=lambda i: (-(targets[i] - extra[i]), i))
    for i in by_fraction:
        r = rooms[i]
        if left >= r.step and extra[i] + r.step <= r.max_remove - r.min_remove:
            extra[i] += r.step
            left -= r.step
    progress = True
    while left > 0 and progress:
        progress = False
        for i, r in enumerate(rooms):
            if left >= r.step and extra[i] + r.step <= r.max_remove - r.min_remove:
                extra[i] += r.step
                left -= r.step
                progress = True
    if left != 0:
        raise PlanError(
            f"the budget of {space.budget} removed experts cannot be met with the layers' steps and limits"
        )
    return space.check([r.min_remove + e for r, e in zip(rooms, extra, strict=True)])


def uniform_allocation(space: AllocationSpace) -> Counts:
    """The uniform plan of `space`: u = `plan.uniform_counts` at the space's sparsity. A space without
    one (built from a budget, or with user limits that exclude u) spreads its budget in proportion to
    the layers' experts instead."""
    if space.uniform is not None:
        return space.check(space.uniform)
    return counts_from_weights(space, [float(r.num_experts) for r in space.layers])
