"""Which worker scores which candidate: prefix affinity with load balance.

Every worker keeps its own hidden-state prefix cache (`fitness.CandidateEvaluator`): a candidate
restarts at the deepest MoE layer m whose prefix key (m, removed sets of the MoE layers before m)
that worker has cached. The scheduler remembers, per worker, the prefix keys of every candidate it
was sent; a worker that is free takes the pending candidate whose longest prefix it holds (ties:
the one no other worker holds a longer prefix of, then population order). Workers pull work as
they finish, so a slow candidate never holds the others up (load balance), and each has a small
queue so that it never waits for the driver between two candidates.

Where a candidate runs changes only how fast it is scored, never its score.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..plan import ExpertPlan

PrefixKey = tuple[int, tuple[tuple[int, ...], ...]]  # as `fitness.evaluator.PrefixKey`

__all__ = ["AffinityScheduler", "prefix_keys"]


def prefix_keys(plan: ExpertPlan, moe_indices: Sequence[int]) -> list[PrefixKey]:
    """The prefix key of every MoE layer of `plan`, shallow to deep (the evaluator's cache keys)."""
    removed = [tuple(sorted(plan.removed.get(m, ()))) for m in moe_indices]
    return [(m, tuple(removed[:j])) for j, m in enumerate(moe_indices)]


class AffinityScheduler:
    """Per-worker prefix keys and the choice of what a free worker takes next."""

    def __init__(self, workers: int) -> None:
        self.held: list[set[PrefixKey]] = [set() for _ in range(workers)]

    def depth(self, worker: int, keys: Sequence[PrefixKey]) -> int:
        """How many leading MoE layers of a candidate (given its keys) `worker` holds the input of."""
        held = self.held[worker]
        for j in range(len(keys) - 1, -1, -1):
            if keys[j] in held:
                return j + 1
        return 0

    def rank(self, worker: int, keys: Sequence[PrefixKey], index: int) -> tuple[int, int, int]:
        """How well `worker` suits a candidate: its depth, its lead over the best other worker, order."""
        mine = self.depth(worker, keys)
        others = (self.depth(w, keys) for w in range(len(self.held)) if w != worker)
        return mine, mine - max(others, default=0), -index

    def take(
        self, worker: int, pending: Sequence[int], keys: Sequence[Sequence[PrefixKey]], count: int
    ) -> list[int]:
        """Up to `count` of the `pending` candidate indices for `worker` (best first); records their
        keys as held by it."""
        chosen: list[int] = []
        left = list(pending)
        for _ in range(min(count, len(left))):
            pick = max(left, key=lambda i: self.rank(worker, keys[i], i))
            left.remove(pick)
            chosen.append(pick)
            self.held[worker].update(keys[pick])
        return chosen

    def forget(self, worker: int) -> None:
        """`worker` lost its cache (it was restarted)."""
        self.held[worker].clear()
