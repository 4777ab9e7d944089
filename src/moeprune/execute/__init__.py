"""Candidate executors: where a search's candidates are scored.

``local`` (default) scores them in this process on the run's model; ``ray`` on N Ray actors, each
with its own model copy and prefix cache, candidates sent to the worker that holds their longest
prefix (`schedule`). Both run the same `Scorer`; a search's history and plan do not depend on the
executor or the number of workers (with ``candidate_batch`` 1: stacking rounds differently by stack).
The evolutionary engine (`moeprune.evolve`) keeps owning checkpoint and resume; `slices` gives it
what to score with: the exact score function or racing slice by slice (`moeprune.racing`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .base import Executor, LocalExecutor, Scorer, ScoreSpec, merge_stats
from .schedule import AffinityScheduler, prefix_keys
from .slices import search_scoring, slice_bounds

EXECUTORS = ("local", "ray")

__all__ = [
    "EXECUTORS",
    "AffinityScheduler",
    "Executor",
    "LocalExecutor",
    "ScoreSpec",
    "Scorer",
    "check_executor",
    "make_executor",
    "merge_stats",
    "prefix_keys",
    "search_scoring",
    "slice_bounds",
]


def check_executor(
    kind: str, address: str | None = None, workers: int | None = None, device: str = "cpu"
) -> None:
    """Fail now, with one line, when the executor cannot run: Ray missing, its cluster unreachable or
    too small for `workers` (connects this process to Ray, starting a local cluster without an address)."""
    if kind == "ray":
        from .ray_executor import connect, worker_count

        connect(address, workers or 1)
        worker_count(workers, device)


def make_executor(
    kind: str,
    *,
    model: Callable[[], object],
    teacher,
    source: str,
    moe_indices: Sequence[int],
    device: str = "cpu",
    dtype: str = "auto",
    workers: int | None = None,
    address: str | None = None,
) -> Executor:
    """The executor of a run: `model` is called for the local one only (the driver's model)."""
    if kind == "local":
        return LocalExecutor(model(), teacher)
    if kind == "ray":
        from .ray_executor import RayExecutor

        return RayExecutor(
            source=source, teacher=teacher, moe_indices=moe_indices, device=device, dtype=dtype,
            workers=workers, address=address,
        )  # fmt: skip
    raise ValueError(f"unknown executor '{kind}' (one of {', '.join(EXECUTORS)})")
