"""The few public calls of moeprune. The CLI only parses arguments and calls these."""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedModel

from . import __version__
from .arch import family_of, moe_layers
from .plan import ExpertPlan, validate_plan
from .surgery import load, remove_experts_, save_pruned
from .surgery.checkpoint import skeleton

__all__ = [
    "ExpertPlan",
    "check_model",
    "criterion_plan",
    "load",
    "load_tokenizer",
    "manifest",
    "observe",
    "prune",
    "prune_by_criterion",
    "save",
    "save_search",
    "search",
    "search_set",
]


def check_model(name_or_path: str | Path, plan: ExpertPlan | None = None) -> None:
    """Fail fast, before loading any weight, when `name_or_path` is not a supported MoE model or
    `plan` does not fit it (the check runs on a meta-device skeleton of the model)."""
    model = skeleton(name_or_path)
    if plan is not None:
        validate_plan(model, plan)


def load_tokenizer(name_or_path: str | Path):
    """The model's tokenizer, or None when the checkpoint has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prune(model: PreTrainedModel, plan: ExpertPlan | dict) -> dict[int, list[int]]:
    """Remove the plan's experts from `model` in place; return kept original expert ids per layer."""
    return remove_experts_(model, plan)


def manifest(source: str | Path, kept: dict[int, list[int]], num_experts: dict[int, int], **extra) -> dict:
    """The ``moeprune.json`` record: kept/removed original expert ids per decoder layer index."""
    return {
        "moeprune_version": __version__,
        "source_model": str(source),
        "kept": {str(k): v for k, v in sorted(kept.items())},
        "removed": {str(k): sorted(set(range(num_experts[k])) - set(v)) for k, v in sorted(kept.items())},
        **extra,
    }


def save(
    model: PreTrainedModel,
    out_dir: str | Path,
    *,
    source: str | Path,
    kept: dict[int, list[int]],
    num_experts: dict[int, int],
    tokenizer=None,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
    **extra,
) -> Path:
    """Write the pruned checkpoint, tokenizer, ``moeprune.json`` and `extra_files` ({name: text})
    atomically to `out_dir`."""
    record = manifest(source, kept, num_experts, family=family_of(model.config).model_type, **extra)
    return save_pruned(
        model, out_dir, manifest=record, tokenizer=tokenizer, overwrite=overwrite, extra_files=extra_files
    )


def expert_counts(model: PreTrainedModel) -> dict[int, int]:
    """Routed experts per MoE decoder layer."""
    return {layer.index: layer.num_experts for layer in moe_layers(model)}


# --- observe once, rank experts (issue 4) -------------------------------------------------------


def load_calibration(
    data: str | Path,
    tokenizer,
    *,
    text_field: str = "text",
    domain_field: str | None = "domain",
    split: str = "train",
    data_config: str | None = None,
    seq_len: int = 512,
    num_samples: int | None = None,
    per_domain: bool = False,
    seed: int = 0,
):
    """A `moeprune.data.TokenSet` from a local file or hub dataset (see `moeprune.data`)."""
    from .data import load_data
    from .errors import DataError

    if tokenizer is None:
        raise DataError("the model has no tokenizer, so text data cannot be tokenised")
    return load_data(
        data,
        tokenizer,
        seq_len=seq_len,
        num_samples=num_samples,
        per_domain=per_domain,
        seed=seed,
        text_field=text_field,
        domain_field=domain_field,
        split=split,
        config=data_config,
    )


def observe(
    model: PreTrainedModel,
    data,
    *,
    criteria: list[str] | tuple[str, ...] | None = None,
    dense_tokens: int = 2048,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
):
    """One calibration pass over `data` (a `TokenSet`) -> `ExpertStats`, saved to `out_dir` if given.

    The dense token subsample (``dense_tokens`` tokens, every expert) is recorded only when one of
    `criteria` needs it (None = every registered criterion, so MoP included).
    """
    from .criteria import CRITERIA
    from .observe import observe as run_observe
    from .surgery.checkpoint import atomic_directory, check_output_dir

    names = list(CRITERIA.names()) if criteria is None else list(criteria)
    dense = any(CRITERIA.get(n).needs_dense for n in names)
    if out_dir is not None:
        check_output_dir(out_dir, overwrite)
    stats = run_observe(
        model,
        data,
        batch_size=batch_size,
        dense_tokens=dense_tokens if dense else 0,
        seed=seed,
        progress=progress,
    )
    from .criteria import supported_criteria

    stats.meta["criteria_supported"] = supported_criteria(stats)
    if out_dir is not None:
        atomic_directory(out_dir, overwrite, stats.save)
    return stats


def check_stats(model: PreTrainedModel | str | Path, stats) -> None:
    """Statistics must describe `model`'s MoE layers (same layer indices and expert counts). A name or
    path is checked on the model's meta-device skeleton, before any weight loads."""
    from .errors import MoepruneError

    if isinstance(model, (str, Path)):
        model = skeleton(model)

    have = {i: ls.num_experts for i, ls in stats.layers.items()}
    want = expert_counts(model)
    if have != want:
        raise MoepruneError(
            f"the expert statistics (of '{stats.meta.get('model', '?')}') do not fit this model: "
            f"experts per MoE layer {have} vs {want}"
        )


def criterion_plan(
    stats,
    criterion: str,
    *,
    sparsity: float | None = None,
    counts: dict[int, int] | None = None,
    seed: int = 0,
    **options,
) -> ExpertPlan:
    """The experts `criterion` removes: uniform `sparsity` (same count in every MoE layer, rounded to
    the router's groups, top_k kept) or explicit per-layer `counts`."""
    from .criteria import choose_removed
    from .errors import MoepruneError
    from .plan import uniform_counts

    if (sparsity is None) == (counts is None):
        raise MoepruneError("give exactly one of sparsity or counts")
    counts = uniform_counts(stats, sparsity) if counts is None else counts
    return choose_removed(stats, criterion, counts, seed, **options)


def prune_by_criterion(
    model: PreTrainedModel,
    criterion: str,
    *,
    stats=None,
    data=None,
    sparsity: float | None = None,
    counts: dict[int, int] | None = None,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
    **options,
) -> tuple[ExpertPlan, dict[int, list[int]]]:
    """Prune `model` in place by `criterion`; statistics from `stats` or one pass over `data`
    (a `TokenSet`). Returns the plan and the kept original expert ids per MoE layer."""
    from .criteria import get_criterion
    from .errors import MoepruneError

    get_criterion(criterion)
    if stats is None:
        if data is None:
            raise MoepruneError("criterion pruning needs calibration data or saved expert statistics")
        stats = observe(
            model, data, criteria=[criterion], batch_size=batch_size, seed=seed, progress=progress
        )
    check_stats(model, stats)
    plan = criterion_plan(stats, criterion, sparsity=sparsity, counts=counts, seed=seed, **options)
    return plan, prune(model, plan)


# --- EvoESAP: layer-wise allocation search (issue 5) ---------------------------------------------


def search_set(data, batch_size: int = 8):
    """A `fitness.SearchSet` from a `TokenSet` (or anything with input_ids/attention_mask/score_mask)."""
    from .fitness import SearchSet

    return SearchSet.from_tensors(
        data.input_ids, getattr(data, "attention_mask", None), getattr(data, "score_mask", None), batch_size
    )


def search(
    model: PreTrainedModel,
    order: dict[int, list[int]],
    search_data,
    out_dir: str | Path,
    *,
    sparsity: float,
    source: str | Path = "",
    tokenizer=None,
    fitness: str = "esap",
    cache: str = "sparse",
    top_k: int = 64,
    population: int = 32,
    generations: int = 50,
    seed: int = 0,
    checkpoint_every: int = 5,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    save_checkpoint: bool = True,
    min_remove: dict[int, int] | None = None,
    max_remove: dict[int, int] | None = None,
    candidate_batch: int = 1,
    **extra,
):
    """EvoESAP: search per-layer removal counts for `model` under a global `sparsity`, keeping the
    within-layer removal `order` fixed (``criteria.removal_order``), scored by `fitness` on
    `search_data` (a `SearchSet` or `TokenSet`). Writes the run files to `out_dir`; with
    `save_checkpoint`, also prunes `model` in place and saves the non-uniform checkpoint there.
    Optional per-layer `min_remove`/`max_remove` bound the counts; `candidate_batch` stacks that many
    candidates into one forward (pays on a GPU); `extra` goes into ``moeprune.json``. Returns the
    `allocate.run.SearchOutcome`."""
    from .allocate import EvoConfig
    from .allocate.run import run_search
    from .fitness import SearchSet

    if not isinstance(search_data, SearchSet):
        search_data = search_set(search_data)
    config = EvoConfig(
        population=population, generations=generations, seed=seed, checkpoint_every=checkpoint_every
    )
    outcome = run_search(
        model,
        order,
        search_data,
        out_dir,
        sparsity=sparsity,
        fitness=fitness,
        cache=cache,
        top_k=top_k,
        config=config,
        resume=resume,
        overwrite=overwrite,
        progress=progress,
        min_remove=min_remove,
        max_remove=max_remove,
        candidate_batch=candidate_batch,
    )
    if save_checkpoint:
        save_search(model, outcome, out_dir, source=source, tokenizer=tokenizer, sparsity=sparsity, **extra)
    return outcome


def save_search(
    model: PreTrainedModel,
    outcome,
    out_dir: str | Path,
    *,
    source="",
    tokenizer=None,
    card_evaluation: str | None = None,
    **extra,
) -> Path:
    """Prune `model` in place by the search's best plan and save the checkpoint into the run
    directory (atomically, keeping the run files: plan, history, state, plots). `card_evaluation`
    (Markdown) goes into the model card's evaluation section."""
    from .allocate.run import STATE_FILE, write_run_files

    out = Path(out_dir)
    counts = expert_counts(model)
    kept = prune(model, outcome.plan)
    record = manifest(
        source,
        kept,
        counts,
        family=family_of(model.config).model_type,
        plan=outcome.plan.to_dict(),
        allocation="evoesap",
        search=outcome.plan_json() | {"evaluations": outcome.result.evaluations},
        **extra,
    )
    state = out / STATE_FILE
    extra_files = {STATE_FILE: state.read_text()} if state.exists() else {}
    save_pruned(
        model,
        out,
        manifest=record,
        tokenizer=tokenizer,
        overwrite=True,
        extra_files=extra_files,
        card_plot="allocation.png",
        card_evaluation=card_evaluation,
    )
    write_run_files(outcome, out, outcome.best_fitness.get("name", "esap"))
    return out


# --- EEP prune phase: which experts each layer keeps, by evolutionary search -----------------------


def eep_prune(
    model: PreTrainedModel,
    search_data,
    *,
    sparsity: float | None = None,
    removed_per_layer: dict[int, int] | None = None,
    fitness: str = "esap",
    cache: str = "sparse",
    top_k: int = 64,
    population: int = 16,
    iterations: int = 100,
    seed: int = 0,
    seeds: tuple[ExpertPlan, ...] = (),
    active_experts: int | None = None,
    progress: bool = True,
    candidate_batch: int = 1,
    state_path: str | Path | None = None,
    resume: bool = False,
    checkpoint_every: int = 5,
):
    """EEP's prune phase on `model`: search which experts each MoE layer keeps, scored by `fitness`
    on `search_data` (a `SearchSet` or `TokenSet`) by exact masking. How many each layer loses is
    given: a uniform `sparsity` (`plan.uniform_counts`), or `removed_per_layer` (e.g. an EvoESAP
    plan's counts). `seeds` (e.g. a criterion's plan) join the random initial population. With
    `active_experts` = k', the candidates route every token to k' experts (the teacher keeps the
    model's own top-k): EEP's active-expert reduction. `candidate_batch` stacks that many candidates
    into one forward (pays on a GPU). With `state_path` the search state is written every
    `checkpoint_every` iterations; `resume` continues from it. Returns `merge.EEPResult`; the model
    is left unchanged (prune it with ``prune(model, result.best)``)."""
    from .errors import MoepruneError
    from .evolve import progress_bar
    from .fitness import CandidateEvaluator, SearchSet
    from .merge import EEPConfig, layer_choices, search_selections
    from .merge.active import reduced_active_experts
    from .plan import uniform_counts

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
    if not isinstance(search_data, SearchSet):
        search_data = search_set(search_data)
    evaluator = CandidateEvaluator(
        model, search_data, fitness=fitness, cache=cache, top_k=top_k, candidate_batch=candidate_batch
    )
    with (
        reduced_active_experts(model, active_experts),
        progress_bar("EEP prune", iterations, progress) as bar,
    ):
        return search_selections(
            choices,
            lambda plans: [r.score for r in evaluator.evaluate_many(plans)],
            cfg,
            seeds=seeds,
            state_path=state_path,
            resume=resume,
            progress=bar,
        )


def eep_merge(
    model: PreTrainedModel,
    search_data,
    anchors: ExpertPlan,
    *,
    fitness: str = "esap",
    cache: str = "sparse",
    top_k: int = 64,
    population: int = 8,
    iterations: int = 300,
    seed: int = 0,
    active_experts: int | None = None,
    progress: bool = True,
    state_path: str | Path | None = None,
    resume: bool = False,
    checkpoint_every: int = 5,
):
    """EEP's merge phase: with `anchors` (the experts each layer keeps, e.g. ``eep_prune(...).best``)
    fixed, search the merging matrices that fold every expert of a layer into its anchors, scored by
    `fitness` on `search_data` with the merged weights in place (exact masking, full forward per
    candidate), routing to `active_experts` experts per token when given. With `state_path` the
    search state is written every `checkpoint_every` iterations; `resume` continues from it.
    Returns `merge.MergeResult`; ``merge_experts_(model, result.best)`` applies it. The model is
    left unchanged."""
    from .evolve import progress_bar
    from .fitness import CandidateEvaluator, SearchSet
    from .merge import MergeConfig, search_merges
    from .merge.active import reduced_active_experts
    from .merge.merging import expert_plan, merged_weights

    layers = moe_layers(model)
    kept = validate_plan(model, anchors, layers)
    num_experts = {layer.index: layer.num_experts for layer in layers}
    cfg = MergeConfig(
        population=population, iterations=iterations, seed=seed, checkpoint_every=checkpoint_every
    )
    if not isinstance(search_data, SearchSet):
        search_data = search_set(search_data)
    # every candidate changes the weights of every layer: no prefix to reuse
    evaluator = CandidateEvaluator(model, search_data, fitness=fitness, cache=cache, top_k=top_k, reuse=False)

    def score(plan) -> float:
        with merged_weights(model, plan):
            return evaluator.evaluate(expert_plan(model, plan)).score

    with (
        reduced_active_experts(model, active_experts),
        progress_bar("EEP merge", iterations, progress) as bar,
    ):
        return search_merges(
            {i: tuple(v) for i, v in kept.items()},
            num_experts,
            score,
            cfg,
            state_path=state_path,
            resume=resume,
            progress=bar,
        )


def eep(
    model: PreTrainedModel,
    search_data,
    out_dir: str | Path,
    *,
    sparsity: float,
    source: str | Path = "",
    tokenizer=None,
    seeds: tuple[ExpertPlan, ...] = (),
    fitness: str = "esap",
    cache: str = "sparse",
    top_k: int = 64,
    population: int = 16,
    iterations: int = 100,
    merge_population: int = 16,
    merge_iterations: int = 0,
    active_experts: int | None = None,
    seed: int = 0,
    candidate_batch: int = 1,
    overwrite: bool = False,
    resume: bool = False,
    checkpoint_every: int = 5,
    progress: bool = True,
    **extra,
) -> dict:
    """EEP end to end on `model` (changed in place): the prune phase (`eep_prune`, seeded with
    `seeds`), the merge phase when `merge_iterations` > 0 (`eep_merge`, then the merged experts
    folded into the kept ones), `active_experts` routing, and the checkpoint saved into `out_dir`
    with ``eep_history.json`` (and ``merging.json``: anchors and M per layer). Both searches write
    their state into `out_dir` (``eep_prune_state.json``, ``eep_merge_state.json``) every
    `checkpoint_every` iterations; `resume` continues an interrupted run there with the same
    settings. `extra` goes into ``moeprune.json``. Returns ``{"prune": EEPResult, "merge":
    MergeResult | None, "out": Path}``."""
    import json

    from .allocate.run import check_run_dir
    from .merge.active import set_active_experts_
    from .merge.merging import merge_experts_

    states = ("eep_prune_state.json", "eep_merge_state.json")
    run_dir = check_run_dir(out_dir, resume, overwrite, states)  # created by the first checkpoint
    for name in states if overwrite and not resume else ():
        (run_dir / name).unlink(missing_ok=True)
    result = eep_prune(
        model, search_data, sparsity=sparsity, fitness=fitness, cache=cache, top_k=top_k, population=population,
        iterations=iterations, seed=seed, seeds=seeds, active_experts=active_experts,
        candidate_batch=candidate_batch, state_path=run_dir / states[0], resume=resume,
        checkpoint_every=checkpoint_every, progress=progress,
    )  # fmt: skip
    counts = expert_counts(model)
    merged = None
    if merge_iterations > 0:
        merged = eep_merge(
            model, search_data, result.best, fitness=fitness, cache=cache, top_k=top_k,
            population=merge_population, iterations=merge_iterations, seed=seed, active_experts=active_experts,
            state_path=run_dir / states[1], resume=resume, checkpoint_every=checkpoint_every, progress=progress,
        )  # fmt: skip
        kept = merge_experts_(model, merged.best)
    else:
        kept = prune(model, result.best)
    if active_experts is not None:
        set_active_experts_(model, active_experts)
        extra["active_experts"] = active_experts
    history = {"prune": {"evaluations": result.evaluations, "history": result.history}}
    files = {}
    if merged is not None:
        history["merge"] = {"evaluations": merged.evaluations, "history": merged.history}
        merging = {
            str(i): {"anchors": list(m.anchors), "M": m.weights.tolist()} for i, m in merged.best.items()
        }
        files["merging.json"] = json.dumps(merging) + "\n"
    files["eep_history.json"] = json.dumps(history, indent=1) + "\n"
    files |= {name: (run_dir / name).read_text() for name in states if (run_dir / name).exists()}
    out = save(
        model, run_dir, source=source, kept=kept, num_experts=counts, tokenizer=tokenizer, overwrite=True,
        extra_files=files, selection="eep_prune" + (" + eep_merge" if merged is not None else ""),
        fitness=fitness, sparsity=sparsity, plan=result.best.to_dict(), **extra,
    )  # fmt: skip
    return {"prune": result, "merge": merged, "out": out}


def evaluate(
    model: PreTrainedModel,
    tokenizer,
    *,
    suite: str | Path | None = "testbed",
    lm_eval: tuple[str, ...] | list[str] = (),
    limit: int | float | None = None,
    max_items: int | None = None,
    lm_eval_include: str | Path | None = None,
) -> dict:
    """Evaluate a loaded model: ``{"suite": evaluate_suite(...), "lm_eval": {task: {metric: value}}}``.

    `suite`: a suite directory, "testbed" (the bundled one) or None. `lm_eval`: lm-eval task names,
    run in process on this model; ``moeprune_mc`` / ``moeprune_generation`` are the suite's own sets
    (the testbed's when `suite` is None). `limit` caps lm-eval documents per task, `max_items` the
    suite's generation / multiple-choice items."""
    import tempfile

    from .errors import MoepruneError
    from .evaluate import default_suite_dir, evaluate_suite
    from .evaluate.lm_eval_bridge import lm_eval_tasks, suite_task_dir

    suite_dir = default_suite_dir() if suite == "testbed" else (Path(suite) if suite is not None else None)
    if suite_dir is not None and not suite_dir.is_dir():
        raise MoepruneError(f"suite directory {suite_dir} does not exist (a folder with test.jsonl, ...)")
    out: dict = {}
    if suite_dir is not None:
        out["suite"] = evaluate_suite(model, tokenizer, suite_dir, max_items=max_items)
    if lm_eval:
        with tempfile.TemporaryDirectory() as tmp:
            include = [suite_task_dir(suite_dir or default_suite_dir(), tmp)]  # SUITE_TASKS
            if lm_eval_include is not None:
                include.append(lm_eval_include)
            out["lm_eval"] = lm_eval_tasks(model, tokenizer, list(lm_eval), limit=limit, include_path=include)
    return out


def run(recipe, *, overwrite: bool = False, progress: bool = True) -> dict:
    """Carry out a `recipe.Recipe` (or a YAML path): load and validate everything, prune by the
    recipe's allocation, save the checkpoint with ``recipe.yaml`` beside it, then (``evaluate``)
    reload the checkpoint and write ``evaluation.json``. Returns ``{"out", "evaluation"}``."""
    import json

    from .criteria import removal_order
    from .recipe import EEPSpec, Recipe
    from .surgery.checkpoint import check_output_dir

    r = recipe if isinstance(recipe, Recipe) else Recipe.from_yaml(recipe)
    out = Path(r.out)
    check_output_dir(out, overwrite)
    check_model(r.model)
    tokenizer = load_tokenizer(r.model)

    def tokens(spec):
        return load_calibration(
            spec.data, tokenizer, text_field=spec.text_field, seq_len=spec.seq_len, num_samples=spec.samples,
            seed=r.seed,
        )  # fmt: skip

    calib = tokens(r.calibration) if r.calibration is not None else None
    search_tokens = tokens(r.search.data) if r.search is not None else None
    placement = {} if r.device == "cpu" else {"device_map": r.device}
    model = load(r.model, **placement)
    stats = observe(model, calib, criteria=[r.criterion], seed=r.seed, progress=progress) if calib else None
    common = dict(source=r.model, tokenizer=tokenizer, recipe=r.model_dump(exclude_none=True))
    if r.allocation == "uniform":
        counts = expert_counts(model)
        plan, kept = prune_by_criterion(model, r.criterion, stats=stats, sparsity=r.sparsity, seed=r.seed)
        save(
            model, out, kept=kept, num_experts=counts, overwrite=overwrite, plan=plan.to_dict(),
            criterion=r.criterion, sparsity=r.sparsity, allocation="uniform", **common,
        )  # fmt: skip
    elif r.allocation == "evoesap":
        s = r.search
        search(
            model, removal_order(stats, r.criterion, r.seed), search_tokens, out, sparsity=r.sparsity,
            fitness=s.fitness, cache=s.cache, top_k=s.top_k, population=s.population, generations=s.generations,
            seed=r.seed, overwrite=overwrite, progress=progress, candidate_batch=s.candidate_batch,
            criterion=r.criterion, **common,
        )  # fmt: skip
    else:
        s, e = r.search, r.eep or EEPSpec()
        seeds = (criterion_plan(stats, r.criterion, sparsity=r.sparsity, seed=r.seed),) if stats else ()
        eep(
            model, search_tokens, out, sparsity=r.sparsity, seeds=seeds, fitness=s.fitness, cache=s.cache,
            top_k=s.top_k, population=e.population, iterations=e.iterations, merge_population=e.merge_population,
            merge_iterations=e.merge_iterations, active_experts=e.active_experts, seed=r.seed,
            candidate_batch=s.candidate_batch, overwrite=overwrite, **common,
        )  # fmt: skip
    (out / "recipe.yaml").write_text(r.to_yaml())
    results = None
    if r.evaluate is not None:
        del model
        dtype = "float32" if r.device == "cpu" else "auto"
        pruned = load(out, dtype=dtype, **placement)
        ev = r.evaluate
        results = evaluate(
            pruned, tokenizer, suite=ev.suite, lm_eval=ev.lm_eval, limit=ev.limit, max_items=ev.max_items
        )
        (out / "evaluation.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    return {"out": out, "evaluation": results}
