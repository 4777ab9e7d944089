"""The allocators, by name: each returns valid per-layer removal counts for an `AllocationSpace`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..errors import MoepruneError
from ..evolve import score_each
from ..registry import Registry
from .count_search import EvoConfig, search_counts
from .counts import uniform_allocation
from .space import AllocationSpace, Counts

__all__ = ["ALLOCATORS", "Allocator"]

Allocator = Callable[..., Counts]
ALLOCATORS: Registry[Allocator] = Registry("allocator")


@ALLOCATORS.register("uniform")
def uniform(space: AllocationSpace, **_) -> Counts:
    """The uniform plan u (`plan.uniform_counts`): every layer loses the same share of its experts."""
    return uniform_allocation(space)


@ALLOCATORS.register("given")
def given(space: AllocationSpace, *, counts: Sequence[int] | None = None, **_) -> Counts:
    """Counts supplied by the user, checked against the space."""
    if counts is None:
        raise MoepruneError("the 'given' allocator needs counts=[n_l per MoE layer]")
    return space.check(counts)


@ALLOCATORS.register("evoesap")
def evoesap(
    space: AllocationSpace,
    *,
    score: Callable[[Counts], float] | None = None,
    config: EvoConfig | None = None,
    **kw,
) -> Counts:
    """The best counts of an evolutionary search maximising ``score`` (see `count_search`); `kw`
    goes to `search_counts` (state_path, resume, progress)."""
    if score is None:
        raise MoepruneError("the 'evoesap' allocator needs a score function (counts -> fitness)")
    return search_counts(space, score_each(score), config or EvoConfig(), **kw).best
