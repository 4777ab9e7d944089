"""EvoESAP: the criterion fixes the order within each layer; an evolutionary search chooses how many
experts each MoE layer loses under the uniform plan's budget, scored by ESAP against the teacher.

Run files (saved beside the checkpoint): ``plan.json`` (counts and removed experts per layer, best
and uniform fitness), ``search_history.json`` (per-generation history, reuse, teacher, timings),
``search_state.json`` (the search checkpoint; `--resume` continues it), ``allocation.png`` and
``fitness.png``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace

from ..allocate import AllocationSpace, EvoConfig, plan_from_counts, search_counts, uniform_allocation
from ..allocate.nearest_uniform import ORDER_FILE
from ..allocate.space import Counts, RemovalOrder
from ..arch import moe_layers
from ..criteria import removal_order
from ..evolve import EvolutionResult, progress_bar
from ..execute import Executor, LocalExecutor, ScoreSpec, search_scoring
from ..fitness import FitnessResult, TeacherRun
from ..plan import ExpertPlan
from ..racing import DEFAULT_SLICES, DEFAULT_Z, Racing
from ..report import allocation_png, history_png
from .base import STATE_FILE, Choice, RunContext

PLAN_FILE = "plan.json"
HISTORY_FILE = "search_history.json"


@dataclass
class SearchOutcome:
    """The best counts of one search, the uniform baseline, and how the search went."""

    space: AllocationSpace
    best: Counts
    uniform: Counts
    plan: ExpertPlan
    uniform_plan: ExpertPlan
    best_fitness: dict
    uniform_fitness: dict
    result: EvolutionResult
    reuse: dict
    teacher: dict
    seconds: float
    executor: dict | None = None
    racing: dict | None = None  # z, slices, tokens per candidate, share of token evaluations saved

    def plan_json(self) -> dict:
        layers = self.space.layers
        return {
            "counts_removed": {str(r.index): n for r, n in zip(layers, self.best, strict=True)},
            "uniform_counts_removed": {str(r.index): n for r, n in zip(layers, self.uniform, strict=True)},
            **self.plan.to_dict(),
            "fitness": self.best_fitness,
            "uniform_fitness": self.uniform_fitness,
        }

    def history_json(self) -> dict:
        return {
            "history": self.result.history,
            "evaluations": self.result.evaluations,
            "racing": self.racing,
            "tokens": self.result.tokens,  # candidate key -> tokens it was scored on
            "raced_out": self.result.raced_out,
            "search_seconds": round(self.result.seconds, 3),
            "total_seconds": round(self.seconds, 3),
            "reuse": self.reuse,
            "teacher": self.teacher,
            "executor": self.executor,
        }

    def kept(self, counts: Counts) -> dict[int, int]:
        return {r.index: r.num_experts - n for r, n in zip(self.space.layers, counts, strict=True)}


def racing_summary(result, tokens_per_candidate: int, scoring) -> dict | None:
    """How a raced search went: its settings, tokens scored, and the share of token evaluations
    saved, 1 - sum(tokens) / (candidates x tokens per candidate); None for an exact search."""
    if not isinstance(scoring, Racing):
        return None
    scored = sum(result.tokens.values())
    return scoring.describe() | {
        "tokens_per_candidate": tokens_per_candidate,
        "tokens_scored": scored,
        "raced_out": len(result.raced_out),
        "saved": round(1 - scored / max(1, tokens_per_candidate * len(result.tokens)), 4),
    }


def search_allocation(
    model,
    order: RemovalOrder,
    teacher: TeacherRun,
    *,
    sparsity: float,
    fitness: str = "esap",
    config: EvoConfig = EvoConfig(),
    state_path=None,
    resume: bool = False,
    progress: bool = True,
    min_remove: dict[int, int] | None = None,
    max_remove: dict[int, int] | None = None,
    candidate_batch: int = 1,
    cache_bytes: int = 512 * 2**20,
    executor: Executor | None = None,
    racing: bool = True,
    racing_z: float = DEFAULT_Z,
    racing_slices: int = DEFAULT_SLICES,
) -> SearchOutcome:
    """Search the per-layer removal counts of `model` (unpruned, left unchanged) with the within-layer
    `order` fixed (``criteria.removal_order``), scored by `fitness` against `teacher`, by `executor`
    (`moeprune.execute`; default: in this process); with `racing`, candidates are raced over
    `racing_slices` slices of the search batches with `racing_z` (`moeprune.racing`)."""
    t0 = time.perf_counter()
    space = AllocationSpace.from_layers(
        moe_layers(model), sparsity=sparsity, min_remove=min_remove, max_remove=max_remove
    )
    uniform = uniform_allocation(space)
    plan_from_counts(space, order, uniform)  # a bad order fails before any candidate runs
    executor = executor if executor is not None else LocalExecutor(model, teacher)
    spec = ScoreSpec(fitness=fitness, candidate_batch=candidate_batch, cache_bytes=cache_bytes)
    scoring = search_scoring(
        executor, spec, len(teacher.records), racing=racing, z=racing_z, slices=racing_slices
    )
    details: dict[Counts, FitnessResult] = {}  # whole results, without per-token values
    partial: dict[Counts, FitnessResult] = {}  # racing: the first slices of the candidates in a race

    def plans(many: list[Counts]) -> list[ExpertPlan]:
        return [plan_from_counts(space, order, c) for c in many]

    def score_many(many: list[Counts]) -> list[FitnessResult]:
        results = scoring(plans(many))  # type: ignore[operator]
        details.update(zip(many, results, strict=True))
        return results

    def score_slice(many: list[Counts], s: int) -> list[FitnessResult]:
        results = scoring.score_slice(plans(many), s)  # type: ignore[union-attr]
        if s == 0:
            partial.clear()  # what is left are the candidates the last race dropped
        for c, r in zip(many, results, strict=True):
            partial[c] = r if s == 0 else partial[c].then(r)
            if s == scoring.slices - 1:  # type: ignore[union-attr]
                details[c] = replace(partial.pop(c), totals=None)
        return results

    raced = isinstance(scoring, Racing)
    score = replace(scoring, score_slice=score_slice) if raced else score_many
    with progress_bar("EvoESAP", config.generations, enabled=progress) as bar:
        result = search_counts(space, score, config, state_path=state_path, resume=resume, progress=bar)
    missing = [c for c in dict.fromkeys((result.best, uniform)) if c not in details]
    if missing and raced:  # scored before a resume: again, on every slice
        score.race(missing, None)  # type: ignore[union-attr]
    elif missing:
        score_many(missing)
    best_r, uni_r = details[result.best], details[uniform]
    return SearchOutcome(
        space=space,
        best=result.best,
        uniform=uniform,
        plan=plan_from_counts(space, order, result.best),
        uniform_plan=plan_from_counts(space, order, uniform),
        best_fitness=best_r.as_dict(),
        uniform_fitness=uni_r.as_dict(),
        result=result,
        reuse=executor.reuse(spec),
        teacher={
            "kind": teacher.kind,
            "top_k": teacher.top_k,
            **({"nucleus_p": teacher.cache.nucleus_p} if teacher.kind == "nucleus" else {}),
            "bytes": teacher.cache.nbytes(),
            **({"probs_kept": teacher.cache.probs_kept} if teacher.kind == "hidden" else {}),
            **({"probs_kept_bytes": teacher.cache.kept_nbytes()} if teacher.cache.probs_kept else {}),
            "seconds": round(teacher.seconds, 3),
            "scored_tokens": teacher.search.num_scored(),
        },
        seconds=time.perf_counter() - t0,
        executor=executor.describe(),
        racing=racing_summary(result, sum(len(p) for p in teacher.positions), scoring),
    )


def evoesap(ctx: RunContext) -> Choice:
    """Observe (or read stats) -> the criterion's order -> search the counts -> the best plan."""
    s, search = ctx.spec, ctx.spec.search
    order = removal_order(ctx.stats(), s.criterion, s.seed)
    state = ctx.state_path()
    config = EvoConfig(
        population=search.population, generations=search.generations, seed=s.seed,
        checkpoint_every=search.checkpoint_every,
    )  # fmt: skip
    outcome = search_allocation(
        ctx.search_model, order, ctx.teacher, sparsity=s.sparsity, fitness=search.fitness, config=config,
        state_path=state, resume=ctx.resume, progress=ctx.progress, min_remove=search.min_remove,
        max_remove=search.max_remove, candidate_batch=search.candidate_batch, executor=ctx.executor,
        racing=search.racing, racing_z=search.racing_z, racing_slices=search.racing_slices,
    )  # fmt: skip
    files: dict[str, str | bytes] = {
        PLAN_FILE: json.dumps(outcome.plan_json(), indent=1) + "\n",
        HISTORY_FILE: json.dumps(outcome.history_json(), indent=1) + "\n",
        "allocation.png": allocation_png(
            {"uniform": outcome.kept(outcome.uniform), "EvoESAP": outcome.kept(outcome.best)}
        ),
        "fitness.png": history_png(outcome.result.history, label=search.fitness),
    }
    # the order the counts cut: `prune --uniform-from` turns the plan into the nearest uniform one with it
    files[ORDER_FILE] = json.dumps({"criterion": s.criterion, "seed": s.seed, "order": order}) + "\n"
    if state.exists():
        files[STATE_FILE] = state.read_text()
    b, u = outcome.best_fitness, outcome.uniform_fitness
    summary = (
        f"EvoESAP ({s.criterion}, {search.fitness}): best {b['value']:.5f} vs uniform {u['value']:.5f}; "
        f"{outcome.result.evaluations} candidates in {outcome.result.seconds:.1f}s (hidden-state reuse hit "
        f"rate {outcome.reuse['hit_rate']:.0%})"
    )
    t = outcome.teacher
    if "probs_kept" in t:  # say which way the hidden cache gives the teacher's probabilities
        summary += (
            f"; teacher: hidden cache, its probabilities kept in memory ({t['probs_kept_bytes'] / 2**20:.0f} MiB)"
            if t["probs_kept"]
            else "; teacher: hidden cache, probabilities recomputed per candidate (T x V over the memory budget)"
        )
    if outcome.racing is not None:
        r = outcome.racing
        summary += f"; racing dropped {r['raced_out']}, saving {r['saved']:.0%} of token evaluations"
    record = {
        "allocation": "evoesap",
        "criterion": s.criterion,
        "sparsity": s.sparsity,
        "fitness": search.fitness,
        "plan": outcome.plan.to_dict(),
        "search": outcome.plan_json() | {"evaluations": outcome.result.evaluations},
    }
    return Choice(
        plan=outcome.plan, record=record, summary=summary, label="EvoESAP", uniform=outcome.uniform_plan,
        files=files, card_plot="allocation.png", details={"outcome": outcome},
    )  # fmt: skip
