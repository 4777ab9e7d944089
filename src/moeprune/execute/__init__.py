"""How the model runs and where a search's candidates are scored.

`layerwise`: a model that does not fit in memory runs one decoder layer at a time, its weights read
from the checkpoint (`LayerwiseModel`, `LayerwiseEvaluator`).

Candidate executors:

``local`` (default) scores them in this process on the run's model; ``ray`` on N Ray actors, each
with its own model copy and prefix cache, candidates sent to the worker that holds their longest
prefix (`schedule`). Both run the same `Scorer`; a search's history and plan do not depend on the
executor or the number of workers (with ``candidate_batch`` 1: stacking rounds differently by stack).
The evolutionary engine (`moeprune.evolve`) keeps owning checkpoint and resume; `slices` gives it
what to score with: the exact score function or racing slice by slice (`moeprune.racing`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .base import Executor, LocalExecutor, Scorer, ScoreSpec, memory_evaluator, merge_stats
from .budget import fits_in_memory, open_model
from .layerwise import LayerwiseModel
from .lockstep import LayerwiseEvaluator, layerwise_evaluator
from .schedule import AffinityScheduler, prefix_keys
from .slices import search_scoring, slice_bounds

EXECUTORS = ("local", "ray")

__all__ = [
    "EXECUTORS",
    "AffinityScheduler",
    "Executor",
    "LayerwiseEvaluator",
    "LayerwiseModel",
    "LocalExecutor",
    "ScoreSpec",
    "Scorer",
    "check_executor",
    "fits_in_memory",
    "layerwise_evaluator",
    "memory_evaluator",
    "make_executor",
    "merge_stats",
    "open_model",
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
    layers: bool = False,
) -> Executor:
    """The executor of a run: `model` is called for the local one only (the driver's model, or with
    `layers` its `LayerwiseModel`); with `layers` every evaluator scores layer by layer."""
    if kind == "local":
        return LocalExecutor(model(), teacher, layerwise_evaluator if layers else memory_evaluator)
    if kind == "ray":
        from .ray_executor import RayExecutor

        return RayExecutor(
            source=source, teacher=teacher, moe_indices=moe_indices, device=device, dtype=dtype,
            workers=workers, address=address, layers=layers,
        )  # fmt: skip
    raise ValueError(f"unknown executor '{kind}' (one of {', '.join(EXECUTORS)})")
