"""EEP: search which experts each MoE layer keeps (selection search, seeded with the criterion's
plan when one is given), optionally merge every expert into the kept ones (merge search), and route
every token to fewer experts. Both phases score candidates against one teacher run.

Run files: ``eep_history.json`` (both searches) and, after merging, ``merging.json`` (anchors and M
per layer).
"""

from __future__ import annotations

import json

from ..arch import moe_layers
from ..criteria import choose_removed
from ..errors import MoepruneError
from ..evolve import progress_bar
from ..execute import Executor, LocalExecutor, ScoreSpec, search_scoring
from ..fitness import TeacherRun
from ..merge import EEPConfig, MergeConfig, layer_choices, search_merges, search_selections
from ..merge.active import reduced_active_experts
from ..plan import ExpertPlan, uniform_counts, validate_plan
from ..racing import DEFAULT_SLICES, EEP_Z
from .base import STATE_FILES, Choice, RunContext


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
    state_path=None,
    resume: bool = False,
    checkpoint_every: int = 5,
    executor: Executor | None = None,
    racing: bool = True,
    racing_z: float = EEP_Z,
    racing_slices: int = DEFAULT_SLICES,
):
    """EEP's prune phase: which experts each MoE layer keeps, scored by `fitness` against `teacher` by
    exact masking. How many each layer loses is given: a uniform `sparsity`, or `removed_per_layer`.
    `seeds` join the random initial population; with `active_experts` = k' the candidates route every
    token to k' experts (the teacher keeps the model's own top-k). With `state_path` the search is
    checkpointed every `checkpoint_every` iterations; `resume` continues it. `executor` scores the
    candidates (`moeprune.execute`; default: in this process), raced over `racing_slices` slices of
    the search batches with `racing_z` unless `racing` is off (`moeprune.racing`). Returns
    `merge.EEPResult`; the model is left unchanged."""
    if (sparsity is None) == (removed_per_layer is None):
        raise MoepruneError("give exactly one of sparsity or removed_per_layer")
    layers = moe_layers(model)
    if removed_per_layer is None:
        removed_per_layer = uniform_counts(layers, sparsity)
    keep = {layer.index: layer.num_experts - int(removed_per_layer.get(layer.index, 0)) for layer in layers}
    choices = layer_choices(layers, keep)
    cfg = EEPConfig(
        population=population, iterations=iterations, seed=seed, checkpoint_every=checkpoint_every
    )
    with reduced_active_experts(model, active_experts):  # a bad count fails here, before any candidate
        pass
    executor = executor if executor is not None else LocalExecutor(model, teacher)
    spec = ScoreSpec(fitness=fitness, candidate_batch=candidate_batch, active_experts=active_experts)
    race = dict(racing=racing, z=racing_z, slices=racing_slices)
    with progress_bar("EEP prune", iterations, progress) as bar:
        return search_selections(
            choices, search_scoring(executor, spec, len(teacher.records), **race), cfg, seeds=seeds,
            state_path=state_path, resume=resume, progress=bar,
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
    state_path=None,
    resume: bool = False,
    checkpoint_every: int = 5,
    executor: Executor | None = None,
    racing: bool = True,
    racing_z: float = EEP_Z,
    racing_slices: int = DEFAULT_SLICES,
):
    """EEP's merge phase: with `anchors` (the experts each layer keeps) fixed, search the merging
    matrices that fold every expert of a layer into its anchors, scored with the merged weights in
    place (full forward per candidate), raced like `select_experts`. Returns
    `merge.merge_search.MergeResult`; the model is left unchanged (``merge_experts_(model,
    result.best)`` applies it)."""
    layers = moe_layers(model)
    kept = validate_plan(model, anchors, layers)
    num_experts = {layer.index: layer.num_experts for layer in layers}
    cfg = MergeConfig(
        population=population, iterations=iterations, seed=seed, checkpoint_every=checkpoint_every
    )
    with reduced_active_experts(model, active_experts):  # a bad count fails here, before any candidate
        pass
    executor = executor if executor is not None else LocalExecutor(model, teacher)
    # every candidate changes the weights of every layer: no prefix to reuse
    spec = ScoreSpec(fitness=fitness, reuse=False, active_experts=active_experts, merged=True)
    race = dict(racing=racing, z=racing_z, slices=racing_slices)
    with progress_bar("EEP merge", iterations, progress) as bar:
        return search_merges(
            {i: tuple(v) for i, v in kept.items()}, num_experts,
            search_scoring(executor, spec, len(teacher.records), **race), cfg, state_path=state_path,
            resume=resume, progress=bar,
        )  # fmt: skip


def _phase(result) -> dict:
    """A search phase for ``eep_history.json``: its history and how many tokens each candidate was
    scored on (fewer for the ones racing dropped)."""
    return {
        "evaluations": result.evaluations,
        "history": result.history,
        "tokens": result.tokens,
        "raced_out": result.raced_out,
    }


def eep(ctx: RunContext) -> Choice:
    from ..recipe import EEPSpec

    s, search, e = ctx.spec, ctx.spec.search, ctx.spec.eep or EEPSpec()
    seeds, uniform = (), None
    if s.criterion is not None:
        stats = ctx.stats()
        uniform = choose_removed(stats, s.criterion, uniform_counts(stats, s.sparsity), s.seed)
        seeds = (uniform,)
    states = [ctx.state_path(name) for name in STATE_FILES[1:]]
    common = dict(
        resume=ctx.resume,
        checkpoint_every=search.checkpoint_every,
        progress=ctx.progress,
        executor=ctx.executor,
        racing=search.racing,
        racing_z=search.racing_z,
        racing_slices=search.racing_slices,
    )
    result = select_experts(
        ctx.search_model, ctx.teacher, sparsity=s.sparsity, fitness=search.fitness, population=e.population,
        iterations=e.iterations, seed=s.seed, seeds=seeds, active_experts=e.active_experts,
        candidate_batch=search.candidate_batch, state_path=states[0], **common,
    )  # fmt: skip
    history = {"prune": _phase(result)}
    summary = (
        f"EEP prune ({search.fitness}): best {result.best_score:.5f} after {result.evaluations} candidates"
    )
    files: dict[str, str | bytes] = {}
    merges = None
    if e.merge_iterations > 0:
        merged = merge_into_anchors(
            ctx.search_model, ctx.teacher, result.best, fitness=search.fitness, population=e.merge_population,
            iterations=e.merge_iterations, seed=s.seed, active_experts=e.active_experts, state_path=states[1],
            **common,
        )  # fmt: skip
        merges = merged.best
        history["merge"] = _phase(merged)
        merging = {str(i): {"anchors": list(m.anchors), "M": m.weights.tolist()} for i, m in merges.items()}
        files["merging.json"] = json.dumps(merging) + "\n"
        summary += (
            f"; merge: {merged.start_score:.5f} (pruned) -> {merged.best_score:.5f} after "
            f"{merged.evaluations} candidates (merging.json)"
        )
    files["eep_history.json"] = json.dumps(history, indent=1) + "\n"
    files |= {state.name: state.read_text() for state in states if state.exists()}
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
