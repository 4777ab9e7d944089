"""What every executor shares: how a candidate is scored (`ScoreSpec`, `Scorer`) and the `Executor`
interface the searches call; `LocalExecutor` scores in this process, on the run's model.

A search sends candidates and a `ScoreSpec` ("how to score them"), never a closure over the
driver's model: the same `Scorer` code runs in this process (local) or inside every Ray actor on
the actor's own copy of the model, so a candidate's score does not depend on where it ran.

How the `Scorer` builds an evaluator for a spec is the run's execution mode's business: in memory
`memory_evaluator` (a `CandidateEvaluator` with its prefix cache), layer by layer
`lockstep.layerwise_evaluator` (a generation's candidates in one stream of the checkpoint).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace

from ..fitness import CandidateEvaluator, FitnessResult, ReuseStats, TeacherRun

__all__ = [
    "EvaluatorFactory",
    "Executor",
    "LocalExecutor",
    "ScoreSpec",
    "Scorer",
    "memory_evaluator",
    "merge_stats",
]


@dataclass(frozen=True)
class ScoreSpec:
    """How a search's candidates are scored; one `CandidateEvaluator` (and prefix cache) per spec.

    Candidates are `ExpertPlan`s (scored by masking), or with ``merged`` merge plans
    (``{layer: merge.merging.LayerMerge}``: the merged weights are written into the anchors, the
    others masked; layer by layer, into each loaded layer in the evaluator's lockstep). With
    ``slice`` = (start, stop) they are scored on search batches start..stop-1 only and the results
    keep their per-token values (a racing slice, `execute.slices`)."""

    fitness: str = "esap"
    candidate_batch: int = 1  # candidates stacked into one forward (`CandidateEvaluator.evaluate_many`)
    cache_bytes: int = 512 * 2**20  # the hidden-state prefix cache of each evaluator
    reuse: bool = True  # restart from cached hidden states (off for merges: every layer changes)
    active_experts: int | None = None  # route every token to this many experts while scoring
    merged: bool = False
    slice: tuple[int, int] | None = None


def memory_evaluator(model, teacher: TeacherRun, spec: ScoreSpec) -> CandidateEvaluator:
    """The evaluator of `spec` on a model in memory (`teacher`: the spec's slice of the run; a
    slice's results keep their per-token values)."""
    return CandidateEvaluator(
        model, teacher, fitness=spec.fitness, reuse=spec.reuse, cache_bytes=spec.cache_bytes,
        candidate_batch=spec.candidate_batch, keep_tokens=spec.slice is not None,
    )  # fmt: skip


# (model, teacher run, spec) -> the evaluator that scores the spec's candidates on that model
EvaluatorFactory = Callable[[object, TeacherRun, ScoreSpec], CandidateEvaluator]


class Scorer:
    """Scores candidates on one model copy against one teacher run (in this process or in an actor);
    `make_evaluator` builds one evaluator per spec (`memory_evaluator`, or the layer-by-layer one)."""

    def __init__(
        self, model, teacher: TeacherRun, make_evaluator: EvaluatorFactory = memory_evaluator
    ) -> None:
        self.model, self.teacher, self.make_evaluator = model, teacher, make_evaluator
        self.evaluators: dict[ScoreSpec, CandidateEvaluator] = {}

    def evaluator(self, spec: ScoreSpec) -> CandidateEvaluator:
        """The spec's evaluator; a slice's runs on its batches, with their share of the cache bytes."""
        if spec not in self.evaluators:
            teacher, sized = self.teacher, spec
            if spec.slice is not None:
                teacher = self.teacher.subset(*spec.slice)
                share = spec.cache_bytes * len(teacher.records) // len(self.teacher.records)
                sized = replace(spec, cache_bytes=share)
            self.evaluators[spec] = self.make_evaluator(self.model, teacher, sized)
        return self.evaluators[spec]

    def score(self, spec: ScoreSpec, candidates: Sequence) -> list[FitnessResult]:
        from ..merge.active import reduced_active_experts
        from ..merge.merging import expert_plan, merged_weights

        evaluator = self.evaluator(spec)
        model = evaluator.model  # the module it runs (layer by layer: the skeleton its layers load into)
        with reduced_active_experts(model, spec.active_experts):
            if not spec.merged or getattr(evaluator, "scores_merges", False):
                return evaluator.evaluate_many(list(candidates))
            results = []
            for plan in candidates:
                with merged_weights(model, plan):
                    results.append(evaluator.evaluate(expert_plan(model, plan)))
            return results

    def stats(self, spec: ScoreSpec) -> tuple[ReuseStats, int]:
        """Reuse statistics and hidden-cache entries of the spec's evaluator and of its racing
        slices' (a candidate scored on k slices counts k evaluations)."""
        parts = [
            (ev.stats, len(ev.hidden))
            for s, ev in self.evaluators.items()
            if s == spec or (spec.slice is None and replace(s, slice=None) == spec)
        ]
        return _sum_stats(parts)


def _sum_stats(parts: Sequence[tuple[ReuseStats, int]]) -> tuple[ReuseStats, int]:
    total = ReuseStats()
    for stats, _ in parts:
        for f in fields(ReuseStats):
            setattr(total, f.name, getattr(total, f.name) + getattr(stats, f.name))
    return total, sum(n for _, n in parts)


def merge_stats(parts: Sequence[tuple[ReuseStats, int]]) -> dict:
    """Reuse statistics of several evaluators (workers) as one `ReuseStats.as_dict()` + cache entries."""
    total, entries = _sum_stats(parts)
    return total.as_dict() | {"hidden_cache_entries": entries}


class Executor:
    """Scores a search's candidates: `score(spec, candidates)` -> one `FitnessResult` each, in order."""

    kind = "executor"
    workers = 1

    def score(self, spec: ScoreSpec, candidates: Sequence) -> list[FitnessResult]:
        raise NotImplementedError

    def reuse(self, spec: ScoreSpec) -> dict:
        """Hidden-state reuse of the spec's evaluators (summed over workers)."""
        raise NotImplementedError

    def describe(self) -> dict:
        """What ran the candidates, for the run files."""
        return {"kind": self.kind, "workers": self.workers}

    def close(self) -> None:
        """Release the workers (idempotent)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LocalExecutor(Executor):
    """Every candidate in this process, on the run's model (the default): one after another in memory,
    a whole call in one stream layer by layer."""

    kind = "local"

    def __init__(
        self, model, teacher: TeacherRun, make_evaluator: EvaluatorFactory = memory_evaluator
    ) -> None:
        self.scorer = Scorer(model, teacher, make_evaluator)

    def score(self, spec: ScoreSpec, candidates: Sequence) -> list[FitnessResult]:
        return self.scorer.score(spec, candidates)

    def reuse(self, spec: ScoreSpec) -> dict:
        return merge_stats([self.scorer.stats(spec)])
