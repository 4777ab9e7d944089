"""Racing on an executor: what a search scores its candidates with, exactly or slice by slice.

The search batches b = 0..B-1 are cut into S = min(slices, B) contiguous slices of whole batches,
as equal as possible (the first B mod S slices one batch longer): the per-batch computation and the
prefix cache stay valid, and the slices' chunk sums combine into the one-pass result bit for bit
(`fitness.totals`). Each slice is a `ScoreSpec` of its own (``slice=(start, stop)``, one evaluator
per slice), so a raced search runs unchanged on the local and the Ray executor. With fewer than two
slices (one search batch, or ``slices=1``) the search is exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from ..racing import DEFAULT_SLICES, DEFAULT_Z, Racing
from .base import Executor, ScoreSpec

__all__ = ["search_scoring", "slice_bounds"]


def slice_bounds(batches: int, slices: int) -> list[tuple[int, int]]:
    """(start, stop) of each slice of `batches` search batches (module docstring)."""
    count = max(1, min(slices, batches))
    size, extra = divmod(batches, count)
    bounds, start = [], 0
    for i in range(count):
        stop = start + size + (i < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


def search_scoring(
    executor: Executor,
    spec: ScoreSpec,
    batches: int,
    *,
    racing: bool = True,
    z: float = DEFAULT_Z,
    slices: int = DEFAULT_SLICES,
) -> Callable | Racing:
    """What `evolve.evolve` scores `spec`'s candidates with on `executor`: a `Racing` over
    `batches` search batches when `racing` is on and there are at least two slices, else the exact
    score function (one `fitness.FitnessResult` per candidate)."""
    bounds = slice_bounds(batches, slices) if racing else []
    if len(bounds) < 2:
        return lambda candidates: executor.score(spec, candidates)
    specs = [replace(spec, slice=b) for b in bounds]
    return Racing(lambda candidates, s: executor.score(specs[s], candidates), len(specs), z)
