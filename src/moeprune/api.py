"""The few public calls of moeprune. The CLI only parses flags into a `Recipe` and calls `run`.

api.run(recipe)                              # the one path: recipe -> checkpoint (+ evaluation)
api.prune_checkpoint / api.search / api.eep  # the same path, from keyword arguments
load, observe, prune, prune_by_criterion,    # verbs on a model in memory
eep_prune, eep_merge, evaluate, save
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedModel

from .arch import moe_layers
from .data import load_data as load_calibration
from .errors import MoepruneError
from .evaluate import evaluate_model as evaluate
from .pipelines import RunResult, save_checkpoint
from .pipelines import run as _run
from .plan import ExpertPlan, validate_plan
from .recipe import EEPSpec, Recipe, SearchSpec
from .surgery import load, remove_experts_
from .surgery.checkpoint import load_tokenizer, skeleton

__all__ = [
    "ExpertPlan", "RunResult", "check_model", "criterion_plan", "eep", "eep_merge", "eep_prune", "evaluate",
    "evaluate_checkpoints", "expert_counts", "load", "load_calibration", "load_tokenizer", "observe",
    "observe_checkpoint", "prune", "prune_by_criterion", "prune_checkpoint", "recipe", "recipe_fields",
    "run", "save", "search", "search_set", "stream_prune",
]  # fmt: skip


def check_model(name_or_path: str | Path, plan: ExpertPlan | None = None) -> None:
    """Fail fast, before loading any weight, when `name_or_path` is not a supported MoE model or
    `plan` does not fit it (the check runs on a meta-device skeleton of the model); a local folder's
    weight files must be there and whole."""
    from .preflight import check_weights, model_source

    model = skeleton(name_or_path)
    folder = model_source(name_or_path)
    if folder is not None:
        check_weights(folder)
    if plan is not None:
        validate_plan(model, plan)


def expert_counts(model: PreTrainedModel) -> dict[int, int]:
    """Routed experts per MoE decoder layer."""
    return {layer.index: layer.num_experts for layer in moe_layers(model)}


# --- the one path: recipe -> checkpoint -----------------------------------------------------------


def run(recipe: Recipe | str | Path, *, overwrite: bool = False, resume: bool = False, progress: bool = True):
    """Carry out a `Recipe` (or a YAML path): every input checked before any weight loads, the
    allocation's pipeline, evaluation, surgery, the checkpoint saved atomically. Returns `RunResult`."""
    return _run(recipe, overwrite=overwrite, resume=resume, progress=progress)


def _data(d) -> dict:
    return dict(d) if isinstance(d, dict) else {"data": str(d)}


def recipe(allocation: str, model: str | Path, out: str | Path, **options) -> Recipe:
    """A checked `Recipe` from keywords (see `recipe_fields`)."""
    return Recipe.build(recipe_fields(allocation, model, out, **options))


def recipe_fields(allocation: str, model, out, *, data=None, search_data=None, **options) -> dict:
    """Recipe fields from keywords. `data` (calibration) and `search_data` are a path or `DataSpec`
    fields; search options (fitness, cache, population, ...) and EEP options (iterations,
    merge_iterations, active_experts, ...) go into their sections, the rest is top-level."""
    fields: dict = {"model": str(model), "out": str(out), "allocation": allocation}
    first, second = (EEPSpec, SearchSpec) if allocation == "eep" else (SearchSpec, EEPSpec)
    sections = {}
    for spec in (first, second):
        sections[spec] = {k: options.pop(k) for k in list(options) if k in spec.model_fields and k != "data"}
    if data is not None:
        fields["calibration"] = _data(data)
    if search_data is not None:
        fields["search"] = {"data": _data(search_data), **sections[SearchSpec]}
    elif sections[SearchSpec]:
        raise MoepruneError(
            f"{next(iter(sections[SearchSpec]))} is a search option, but no search_data was given"
        )
    if sections[EEPSpec]:
        fields["eep"] = sections[EEPSpec]
    return fields | {k: v for k, v in options.items() if v is not None}


def prune_checkpoint(
    model: str | Path, out: str | Path, *, plan=None, overwrite=False, progress=True, **options
):
    """Prune a checkpoint by a plan file (`plan`) or uniformly by a criterion (`criterion`,
    `sparsity`, `data` or `stats`) and save it to `out`. Returns `RunResult`."""
    allocation = "plan" if plan is not None else "uniform"
    r = recipe(allocation, model, out, plan=None if plan is None else str(plan), **options)
    return run(r, overwrite=overwrite, progress=progress)


def search(model: str | Path, out: str | Path, *, resume=False, overwrite=False, progress=True, **options):
    """EvoESAP on a checkpoint: `criterion`, `sparsity`, `data` (calibration), `search_data`, search
    options (fitness, cache, top_k, population, generations, candidate_batch, ...). Returns `RunResult`
    (``result.choice.details["outcome"]`` holds the search)."""
    return run(
        recipe("evoesap", model, out, **options), overwrite=overwrite, resume=resume, progress=progress
    )


def eep(model: str | Path, out: str | Path, *, resume=False, overwrite=False, progress=True, **options):
    """EEP on a checkpoint: `sparsity`, `search_data`, optional `criterion` + `data` (seed plan), EEP
    options (population, iterations, merge_population, merge_iterations, active_experts). Returns
    `RunResult`."""
    return run(recipe("eep", model, out, **options), overwrite=overwrite, resume=resume, progress=progress)


# --- verbs on a model in memory -------------------------------------------------------------------


def prune(model: PreTrainedModel, plan: ExpertPlan | dict) -> dict[int, list[int]]:
    """Remove the plan's experts from `model` in place; return kept original expert ids per layer."""
    return remove_experts_(model, plan)


def observe(model: PreTrainedModel, data, *, criteria=None, out_dir=None, overwrite: bool = False, **options):
    """One calibration pass over `data` (a `TokenSet`) -> `ExpertStats`, saved to `out_dir` if given.
    The dense token subsample is recorded only when one of `criteria` needs it (None: every criterion).
    `options`: dense_tokens, batch_size, seed, progress."""
    from .criteria import observe_for
    from .surgery.checkpoint import atomic_directory, check_output_dir

    if out_dir is not None:
        check_output_dir(out_dir, overwrite)
    stats = observe_for(model, data, criteria, **options)
    if out_dir is not None:
        atomic_directory(out_dir, overwrite, stats.save)
    return stats


def observe_checkpoint(model, out, *, data, criteria=None, overwrite=False, seed=0, device="cpu", **options):
    """Observe a checkpoint once and save its `ExpertStats` to `out` (for ``prune --stats``). `data`: a
    path or `DataSpec` fields; `criteria`: the ones to support (None: all, MoP's dense subsample too);
    `device` as in a recipe; `options`: dense_tokens, batch_size, progress. Inputs are checked
    before any weight loads."""
    import os
    import tempfile

    from .criteria import get_criterion
    from .execute import open_model
    from .recipe import DataSpec, placement, split_device
    from .surgery.checkpoint import check_output_dir, output_lock

    d = DataSpec.build(_data(data))
    check_output_dir(out, overwrite, inputs=(d.data,), model=model)
    for name in criteria or []:
        get_criterion(name)
    offload = Path(tempfile.gettempdir()) / f"moeprune-offload-{os.getpid()}"
    placement(split_device(device)[0])  # a device this machine lacks fails here
    check_model(model)
    with output_lock(out):
        tokens = load_calibration(
            d.data, load_tokenizer(model), text_field=d.text_field, seq_len=d.seq_len, num_samples=d.samples,
            per_domain=d.per_domain, seed=seed if d.seed is None else d.seed,
        )  # fmt: skip
        loaded = open_model(model, device, offload_folder=offload)  # DEVICE:layers: layer by layer
        return observe(
            loaded, tokens, criteria=criteria, out_dir=out, overwrite=overwrite, seed=seed, **options
        )


def evaluate_checkpoints(models, *, suite="testbed", lm_eval=(), device="cpu", dtype=None, **options) -> dict:
    """`evaluate` each checkpoint (loaded in `dtype`, default: the checkpoint's own): {name: results}.
    `suite`: a directory, "testbed" or None; `options`: limit, max_items, lm_eval_include."""
    import os
    import tempfile

    from .execute import open_model
    from .recipe import placement, split_device

    if suite is None and not lm_eval:
        raise MoepruneError("nothing to evaluate: give a suite or lm-eval tasks")
    if suite not in (None, "testbed") and not Path(suite).is_dir():
        raise MoepruneError(
            f"suite {suite}: no such directory (a folder with test.jsonl, generation.jsonl, ...)"
        )
    include = options.get("lm_eval_include")
    if include is not None and not Path(include).is_dir():
        raise MoepruneError(f"lm-eval include {include}: no such directory")
    offload = Path(tempfile.gettempdir()) / f"moeprune-offload-{os.getpid()}"
    placement(split_device(device)[0], dtype or "auto")  # a device this machine lacks fails here
    for name in models:
        check_model(name)  # every model readable before the first one loads
    results = {}
    for name in models:  # loaded (or opened layer by layer) one at a time
        model = open_model(name, device, dtype, offload)
        results[name] = evaluate(model, load_tokenizer(name), suite=suite, lm_eval=list(lm_eval), **options)
    return results


def criterion_plan(
    stats, criterion: str, *, sparsity=None, counts=None, seed: int = 0, **options
) -> ExpertPlan:
    """The experts `criterion` removes: uniform `sparsity` (round(s * E_l) in every MoE layer, rounded
    to the router's groups, top_k kept) or explicit per-layer `counts`."""
    from .criteria import choose_removed, uniform_counts

    if (sparsity is None) == (counts is None):
        raise MoepruneError("give exactly one of sparsity or counts")
    counts = uniform_counts(stats, sparsity) if counts is None else counts
    return choose_removed(stats, criterion, counts, seed, **options)


def prune_by_criterion(
    model, criterion: str, *, stats=None, data=None, sparsity=None, counts=None, seed=0, batch_size=8,
    progress=True, **options,
) -> tuple[ExpertPlan, dict[int, list[int]]]:  # fmt: skip
    """Prune `model` in place by `criterion`; statistics from `stats` or one pass over `data` (a
    `TokenSet`). Returns the plan and the kept original expert ids per MoE layer."""
    from .criteria import get_criterion, observe_for

    get_criterion(criterion)
    if stats is None:
        if data is None:
            raise MoepruneError("criterion pruning needs calibration data or saved expert statistics")
        stats = observe_for(model, data, [criterion], batch_size=batch_size, seed=seed, progress=progress)
    stats.check_fits(expert_counts(model))
    plan = criterion_plan(stats, criterion, sparsity=sparsity, counts=counts, seed=seed, **options)
    return plan, prune(model, plan)


def search_set(data, batch_size: int | None = None):
    """A `fitness.SearchSet` from a `TokenSet` (or anything with input_ids/attention_mask/score_mask)."""
    from .fitness import SearchSet

    return SearchSet.from_tokens(data, batch_size)


def _teacher(model, search_data, cache: str, top_k: int, teacher, nucleus_p: float = 0.95):
    from .fitness import run_teacher

    return (
        teacher
        if teacher is not None
        else run_teacher(model, search_set(search_data), cache=cache, top_k=top_k, nucleus_p=nucleus_p)
    )


def eep_prune(model, search_data, *, cache="hidden", top_k=64, teacher=None, nucleus_p=0.95, **options):
    """EEP's prune phase on a model in memory (left unchanged), scored on `search_data` or against a
    given `teacher` (`fitness.TeacherRun`); `options`: see `pipelines.eep.select_experts`."""
    from .pipelines.eep import select_experts

    return select_experts(model, _teacher(model, search_data, cache, top_k, teacher, nucleus_p), **options)


def eep_merge(
    model,
    search_data,
    anchors: ExpertPlan,
    *,
    cache="hidden",
    top_k=64,
    teacher=None,
    nucleus_p=0.95,
    **options,
):
    """EEP's merge phase with `anchors` fixed (model unchanged); `options`: see
    `pipelines.eep.merge_into_anchors`. ``merge.merging.merge_experts_(model, result.best)`` applies it."""
    from .pipelines.eep import merge_into_anchors

    run = _teacher(model, search_data, cache, top_k, teacher, nucleus_p)
    return merge_into_anchors(model, run, anchors, **options)


def stream_prune(source, plan, out_dir, *, merges=None, max_shard_size=None, overwrite=False, progress=False, **extra):  # fmt: skip
    """Streaming surgery: rewrite the safetensors checkpoint `source` (a directory, or a hub id in the
    local cache) into a pruned one at `out_dir`, tensor by tensor, without building the model. `plan`
    says which experts go; or `merges` ({layer: (anchors, M (k, E))} or EEP `LayerMerge`s) write
    Σ_i M[j, i] W_i into each anchor j. Shards are at most `max_shard_size` (default: the input's
    largest). The same checkpoint as `prune` + `save`; `extra` goes into ``moeprune.json``."""
    from .surgery.streaming import StreamingPrune

    rewrite = StreamingPrune(source, plan, merges=merges)
    return save_checkpoint(
        rewrite.model, out_dir, source=source, kept=rewrite.kept, num_experts=rewrite.num_experts,
        overwrite=overwrite, record={"plan": rewrite.plan.to_dict(), **extra}, rewrite=rewrite,
        max_shard_size=max_shard_size, progress=progress,
    )  # fmt: skip


def save(model, out_dir, *, source, kept, num_experts, tokenizer=None, overwrite=False, extra_files=None,
         max_shard_size=None, **extra):  # fmt: skip
    """Write the pruned `model`, tokenizer, ``moeprune.json`` (with `extra`), the model card and
    `extra_files` ({name: text}) atomically to `out_dir`; weights above `max_shard_size` are sharded."""
    return save_checkpoint(
        model, out_dir, source=source, kept=kept, num_experts=num_experts, tokenizer=tokenizer,
        overwrite=overwrite, record=extra, files=extra_files, max_shard_size=max_shard_size,
    )  # fmt: skip
