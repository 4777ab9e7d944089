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
from dataclasses import dataclass

from ..allocate import AllocationSpace, EvoConfig, plan_from_counts, search_counts, uniform_allocation
from ..allocate.nearest_uniform import ORDER_FILE
from ..allocate.space import Counts, RemovalOrder
from ..arch import moe_layers
from ..criteria import removal_order
from ..evolve import EvolutionResult, progress_bar
from ..execute import Executor, LocalExecutor, ScoreSpec
from ..fitness import TeacherRun
from ..plan import ExpertPlan
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
            "search_seconds": round(self.result.seconds, 3),
            "total_seconds": round(self.seconds, 3),
            "reuse": self.reuse,
            "teacher": self.teacher,
            "executor": self.executor,
        }

    def kept(self, counts: Counts) -> dict[int, int]:
        return {r.index: r.num_experts - n for r, n in zip(self.space.layers, counts, strict=True)}


def _fitness_dict(r) -> dict:
    return {k: v for k, v in vars(r).items() if v is not None}


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
) -> SearchOutcome:
    """Search the per-layer removal counts of `model` (unpruned, left unchanged) with the within-layer
    `order` fixed (``criteria.removal_order``), scored by `fitness` against `teacher`, by `executor`
    (`moeprune.execute`; default: in this process)."""
    t0 = time.perf_counter()
    space = AllocationSpace.from_layers(
        moe_layers(model), sparsity=sparsity, min_remove=min_remove, max_remove=max_remove
    )
    uniform = uniform_allocation(space)
    plan_from_counts(space, order, uniform)  # a bad order fails before any candidate runs
    executor = executor if executor is not None else LocalExecutor(model, teacher)
    spec = ScoreSpec(fitness=fitness, candidate_batch=candidate_batch, cache_bytes=cache_bytes)
    details: dict[Counts, object] = {}

    def score_many(many: list[Counts]) -> list[float]:
        results = executor.score(spec, [plan_from_counts(space, order, c) for c in many])
        details.update(zip(many, results, strict=True))
        return [r.score for r in results]

    with progress_bar("EvoESAP", config.generations, enabled=progress) as bar:
        result = search_counts(space, score_many, config, state_path=state_path, resume=resume, progress=bar)
    best_r = (
        details.get(result.best) or executor.score(spec, [plan_from_counts(space, order, result.best)])[0]
    )
    uni_r = details.get(uniform) or executor.score(spec, [plan_from_counts(space, order, uniform)])[0]
    return SearchOutcome(
        space=space,
        best=result.best,
        uniform=uniform,
        plan=plan_from_counts(space, order, result.best),
        uniform_plan=plan_from_counts(space, order, uniform),
        best_fitness=_fitness_dict(best_r),
        uniform_fitness=_fitness_dict(uni_r),
        result=result,
        reuse=executor.reuse(spec),
        teacher={
            "kind": teacher.kind,
            "top_k": teacher.top_k,
            "bytes": teacher.cache.nbytes(),
            "seconds": round(teacher.seconds, 3),
            "scored_tokens": teacher.search.num_scored(),
        },
        seconds=time.perf_counter() - t0,
        executor=executor.describe(),
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
        ctx.model, order, ctx.teacher, sparsity=s.sparsity, fitness=search.fitness, config=config,
        state_path=state, resume=ctx.resume, progress=ctx.progress, min_remove=search.min_remove,
        max_remove=search.max_remove, candidate_batch=search.candidate_batch, executor=ctx.executor,
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
