"""EEP: search which experts each MoE layer keeps (selection search, seeded with the criterion's
plan when one is given), optionally merge every expert into the kept ones (merge search), and route
every token to fewer experts. Both phases score candidates against one teacher run.

Run files: ``eep_history.json`` (both searches) and, after merging, ``merging.json`` (anchors and M
per layer).
"""

from __future__ import annotations

import json
from contextlib import contextmanager

from ..allocate import AllocationSpace
from ..allocate import uniform_counts as spread_uniform
from ..arch import moe_layers
from ..criteria import choose_removed, uniform_counts
from ..errors import MoepruneError
from ..fitness import CandidateEvaluator, TeacherRun
from ..merge import EEPConfig, eep_prune_search, layer_choices
from ..merge.active import reduced_active_experts
from ..merge.merge_search import MergeConfig, eep_merge_search
from ..merge.merging import expert_plan, merged_weights
from ..surgery import ExpertPlan, validate_plan
from .base import PIPELINES, Choice, RunContext


@contextmanager
def _bar(name: str, total: int, enabled: bool):
    """A rich progress bar over iterations with the best score; yields ``update(it, best)``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn(name), BarColumn(), MofNCompleteColumn(), TextColumn("best {task.fields[best]}"),
        TimeElapsedColumn(), disable=not enabled, transient=True,
    ) as bar:  # fmt: skip
        task = bar.add_task(name, total=total, best="-")
        yield lambda it, best: bar.update(task, completed=it, best=f"{best:.5f}")


def select_experts(
    model,
    teacher: TeacherRun,
    *,
    sparsity: float | None = None,
    removed_per_layer: dict[int, int] | None = None,
    fitness: str = "esap",
    population: int = 16,
    iterations: int = 100,
    seed: int = 0,
    seeds: tuple[ExpertPlan, ...] = (),
    active_experts: int | None = None,
    progress: bool = True,
    candidate_batch: int = 1,
):
    """EEP's prune phase: which experts each MoE layer keeps, scored by `fitness` against `teacher` by
    exact masking. How many each layer loses is given: a uniform `sparsity`, or `removed_per_layer`.
    `seeds` join the random initial population; with `active_experts` = k' the candidates route every
    token to k' experts (the teacher keeps the model's own top-k). Returns `merge.EEPResult`; the
    model is left unchanged."""
    if (sparsity is None) == (removed_per_layer is None):
        raise MoepruneError("give exactly one of sparsity or removed_per_layer")
    layers = moe_layers(model)
    if removed_per_layer is None:
        space = AllocationSpace.from_layers(layers, sparsity=sparsity)
        removed_per_layer = dict(zip([r.index for r in space.layers], spread_uniform(space), strict=True))
    keep = {layer.index: layer.num_experts - int(removed_per_layer.get(layer.index, 0)) for layer in layers}
    choices = layer_choices(layers, keep)
    cfg = EEPConfig(population=population, iterations=iterations, seed=seed)
    evaluator = CandidateEvaluator(model, teacher, fitness=fitness, candidate_batch=candidate_batch)
    with reduced_active_experts(model, active_experts), _bar("EEP prune", iterations, progress) as update:
        return eep_prune_search(
            choices, lambda plan: evaluator.evaluate(plan).score, cfg, seeds=seeds, progress=update,
            score_many=lambda plans: [r.score for r in evaluator.evaluate_many(plans)],
        )  # fmt: skip


def merge_into_anchors(
    model,
    teacher: TeacherRun,
    anchors: ExpertPlan,
    *,
    fitness: str = "esap",
    population: int = 8,
    iterations: int = 300,
    seed: int = 0,
    active_experts: int | None = None,
    progress: bool = True,
):
    """EEP's merge phase: with `anchors` (the experts each layer keeps) fixed, search the merging
    matrices that fold every expert of a layer into its anchors, scored with the merged weights in
    place (full forward per candidate). Returns `merge.merge_search.MergeResult`; the model is left
    unchanged (``merge_experts_(model, result.best)`` applies it)."""
    layers = moe_layers(model)
    kept = validate_plan(model, anchors, layers)
    num_experts = {layer.index: layer.num_experts for layer in layers}
    cfg = MergeConfig(population=population, iterations=iterations, seed=seed)
    # every candidate changes the weights of every layer: no prefix to reuse
    evaluator = CandidateEvaluator(model, teacher, fitness=fitness, reuse=False)

    def score(plan) -> float:
        with merged_weights(model, plan):
            return evaluator.evaluate(expert_plan(model, plan)).score

    with reduced_active_experts(model, active_experts), _bar("EEP merge", iterations, progress) as update:
        return eep_merge_search(
            {i: tuple(v) for i, v in kept.items()}, num_experts, score, cfg, progress=update
        )


@PIPELINES.register("eep")
def eep(ctx: RunContext) -> Choice:
    from ..recipe import EEPSpec

    s, search, e = ctx.spec, ctx.spec.search, ctx.spec.eep or EEPSpec()
    seeds, uniform = (), None
    if s.criterion is not None:
        stats = ctx.stats()
        uniform = choose_removed(stats, s.criterion, uniform_counts(stats, s.sparsity), s.seed)
        seeds = (uniform,)
    result = select_experts(
        ctx.model, ctx.teacher, sparsity=s.sparsity, fitness=search.fitness, population=e.population,
        iterations=e.iterations, seed=s.seed, seeds=seeds, active_experts=e.active_experts,
        progress=ctx.progress, candidate_batch=search.candidate_batch,
    )  # fmt: skip
    history = {"prune": {"evaluations": result.evaluations, "history": result.history}}
    summary = (
        f"EEP prune ({search.fitness}): best {result.best_score:.5f} after {result.evaluations} candidates"
    )
    files: dict[str, str | bytes] = {}
    merges = None
    if e.merge_iterations > 0:
        merged = merge_into_anchors(
            ctx.model, ctx.teacher, result.best, fitness=search.fitness, population=e.merge_population,
            iterations=e.merge_iterations, seed=s.seed, active_experts=e.active_experts, progress=ctx.progress,
        )  # fmt: skip
        merges = merged.best
        history["merge"] = {"evaluations": merged.evaluations, "history": merged.history}
        merging = {str(i): {"anchors": list(m.anchors), "M": m.weights.tolist()} for i, m in merges.items()}
        files["merging.json"] = json.dumps(merging) + "\n"
        summary += (
            f"; merge: {merged.start_score:.5f} (pruned) -> {merged.best_score:.5f} after "
            f"{merged.evaluations} candidates (merging.json)"
        )
    files["eep_history.json"] = json.dumps(history, indent=1) + "\n"
    record = {
        "allocation": "eep",
        "selection": "eep_prune" + (" + eep_merge" if merges is not None else ""),
        "fitness": search.fitness,
        "sparsity": s.sparsity,
        "plan": result.best.to_dict(),
    }
    if s.criterion is not None:
        record["criterion"] = f"{s.criterion} (seed of the search)"
    if e.active_experts is not None:
        record["active_experts"] = e.active_experts
    return Choice(
        plan=result.best, record=record, summary=summary, label="EEP", uniform=uniform, merges=merges,
        active_experts=e.active_experts, files=files, details={"prune": result, "merge": history.get("merge")},
    )  # fmt: skip
