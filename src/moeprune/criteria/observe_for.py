"""One observation pass that records what the given criteria need (`observe` + the dense subsample
only when a criterion such as MoP asks for it)."""

from __future__ import annotations

from collections.abc import Sequence

from ..observe import ExpertStats, observe
from .base import CRITERIA
from .rank import supported_criteria


def observe_for(
    model,
    data,
    criteria: Sequence[str] | None = None,
    *,
    dense_tokens: int = 2048,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> ExpertStats:
    """Statistics of one pass over `data` (a `TokenSet`) for `criteria` (None: every registered one).

    The dense token subsample (`dense_tokens` tokens, every expert) is recorded only when one of the
    criteria needs it; ``meta["criteria_supported"]`` lists what the statistics can rank by."""
    names = CRITERIA.names() if criteria is None else list(criteria)
    dense = any(CRITERIA.get(n).needs_dense for n in names)
    stats = observe(
        model,
        data,
        batch_size=batch_size,
        dense_tokens=dense_tokens if dense else 0,
        seed=seed,
        progress=progress,
    )
    stats.meta["criteria_supported"] = supported_criteria(stats)
    return stats
