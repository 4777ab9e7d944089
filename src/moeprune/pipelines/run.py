"""The one path from a `Recipe` to a checkpoint: check every input, let the allocation's pipeline
choose, evaluate (baselines by exact masking before surgery, the result after it), apply the choice
in place, save the checkpoint with its card and run files atomically, clean up."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..arch import family_of, moe_layers
from ..errors import Interrupted, MoepruneError
from ..fitness import CandidateEvaluator, SearchSet
from ..merge.active import set_active_experts_
from ..merge.merging import merge_experts_
from ..plan import ExpertPlan
from ..recipe import Recipe
from ..report import evaluation_cells, manifest, markdown_table, model_card
from ..report.memory import memory_usage
from ..surgery import mask_experts, remove_experts_, save_pruned
from ..surgery.checkpoint import is_non_uniform
from .base import IDENTITY_FILE, PIPELINES, STATE_FILES, Choice, RunContext


@dataclass
class RunResult:
    out: Path
    choice: Choice
    kept: dict[int, list[int]]  # original expert ids kept per MoE layer
    num_experts: dict[int, int]  # routed experts per MoE layer before pruning
    evaluation: dict[str, dict] | None  # {column: results} when the recipe evaluates
    seconds: float
    memory: dict = field(default_factory=dict)  # report.memory_usage() at the end of the run


def apply_choice(model, choice: Choice) -> dict[int, list[int]]:
    """Surgery in place: merge or remove, then fewer active experts; the kept original ids."""
    kept = (
        merge_experts_(model, choice.merges)
        if choice.merges is not None
        else remove_experts_(model, choice.plan)
    )
    if choice.active_experts is not None:
        set_active_experts_(model, choice.active_experts)
    return kept


def _evaluate(ctx: RunContext, model, plan: ExpertPlan | None, heldout: CandidateEvaluator | None) -> dict:
    """The recipe's evaluation of `model`, masked by `plan` (None: as it is in memory)."""
    from ..evaluate import evaluate_model

    ev = ctx.spec.evaluate
    result: dict = {}
    with mask_experts(model, plan) if plan is not None else nullcontext():
        if heldout is not None:
            with torch.inference_mode():
                logits = [
                    model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
                    for b in heldout.search.batches
                ]
            result["heldout_esap"] = heldout.score_logits(logits).value
        if ev.suite is not None or ev.lm_eval:
            result |= evaluate_model(
                model, ctx.tokenizer, suite=ev.suite, lm_eval=ev.lm_eval, limit=ev.limit, max_items=ev.max_items,
                max_tokens_per_domain=ev.max_tokens_per_domain,
            )  # fmt: skip
    return result


def save_checkpoint(
    model, out, *, source, kept, num_experts, tokenizer=None, overwrite=False, record=None, files=None,
    card_plot=None, evaluation=None, source_dtype=None, max_shard_size=None, rewrite=None, progress=False,
) -> Path:  # fmt: skip
    """Write the pruned `model` with ``moeprune.json``, the model card and `files`, atomically; the
    weights in `source_dtype` (the input checkpoint's) when the run computed in another dtype. With a
    `rewrite` (`surgery.streaming.StreamingPrune`), `model` is its pruned meta-device skeleton and
    the weights are streamed from the input checkpoint."""
    if (
        isinstance(source_dtype, torch.dtype)
        and rewrite is None
        and next(model.parameters()).dtype != source_dtype
    ):
        model.to(source_dtype)
    info = manifest(source, kept, num_experts, family=family_of(model.config).model_type, **(record or {}))
    table = None
    if evaluation:
        table = "Measured by moeprune before the checkpoint was written (baselines by exact masking):\n\n"
        table += markdown_table({name: evaluation_cells(r) for name, r in evaluation.items()})
    card = model_card(
        info,
        parameters=sum(p.numel() for p in model.parameters()),
        experts={layer.index: layer.num_experts for layer in moe_layers(model)},
        non_uniform=is_non_uniform(model),
        plot=card_plot,
        evaluation=table,
    )
    files = {"README.md": card, **(files or {})}
    if rewrite is not None:
        return rewrite.write(
            out,
            manifest=info,
            files=files,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            progress=progress,
        )
    shards = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    return save_pruned(
        model, out, manifest=info, tokenizer=tokenizer, overwrite=overwrite, files=files, **shards
    )


def _layerwise_columns(ctx: RunContext, choice: Choice) -> dict[str, dict]:
    """The recipe's evaluation layer by layer: every column by exact masking (what the streamed
    surgery writes is what masking computes; EEP's merges written into each loaded layer, and its
    fewer active experts, for the chosen column), held-out ESAP against a dense teacher."""
    from ..execute import LayerwiseEvaluator

    ev, lm = ctx.spec.evaluate, ctx.layers
    heldout = None
    if ctx.heldout_tokens is not None:
        teacher = lm.run_teacher(SearchSet.from_tokens(ctx.heldout_tokens), cache="dense")
        heldout = LayerwiseEvaluator(lm, teacher)
    plans = {}
    if ev.baselines:
        plans["unpruned"] = ExpertPlan({})
        if choice.uniform is not None and choice.label != "uniform":
            plans["uniform"] = choice.uniform
    plans[choice.label] = choice.merges if choice.merges is not None else choice.plan
    columns = {}
    for name, plan in plans.items():
        result: dict = {}
        active = choice.active_experts if name == choice.label else None
        with lm.masked(plan, active_experts=active):
            if heldout is not None:
                result["heldout_esap"] = heldout.evaluate(plan).value
            if ev.suite is not None:
                from ..evaluate import evaluate_model

                result |= evaluate_model(
                    lm, ctx.tokenizer, suite=ev.suite, max_items=ev.max_items,
                    max_tokens_per_domain=ev.max_tokens_per_domain,
                )  # fmt: skip
        columns[name] = result
    return columns


def _evaluation_json(columns: dict[str, dict], ev, label: str) -> str:
    return json.dumps(columns if ev.baselines else columns[label], indent=1, default=str) + "\n"


def _streaming(ctx: RunContext, choice: Choice):
    """A `StreamingPrune` of the input checkpoint when the weights need not be loaded (``mode``:
    auto streams a local safetensors checkpoint whose plan was chosen without the model), else None."""
    from ..errors import MoepruneError
    from ..surgery.streaming import StreamingPrune, local_checkpoint

    spec = ctx.spec
    if spec.mode == "memory" or ctx.model_loaded:
        return None
    if local_checkpoint(ctx.source) is None:
        if spec.mode == "stream":
            raise MoepruneError(
                f"mode stream needs a local safetensors checkpoint (a directory or a cached hub id), not '{ctx.source}'"
            )
        return None
    plan = choice.plan if choice.merges is None else None
    rewrite = StreamingPrune(ctx.source, plan, merges=choice.merges)
    if choice.active_experts is not None:  # the config the rewrite writes routes to fewer experts
        set_active_experts_(rewrite.model, choice.active_experts)
    return rewrite


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `threads` inside the block, restored after (None: as they are)."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(
    recipe: Recipe | str | Path, *, overwrite: bool = False, resume: bool = False, progress: bool = True
) -> RunResult:
    """Carry out `recipe` (a `Recipe` or a YAML path). Every input is checked before any weight loads."""
    t0 = time.perf_counter()
    spec = recipe if isinstance(recipe, Recipe) else Recipe.from_yaml(recipe)
    ctx = RunContext(spec, overwrite=overwrite, resume=resume, progress=progress)
    try:
        with torch_threads(spec.threads):
            result = _carry_out(ctx, t0)
    except BaseException as e:
        note = ctx.abandon()
        if isinstance(e, MoepruneError) and note != "nothing was written":
            e.args = (f"{e}; {note}",)
        elif isinstance(e, KeyboardInterrupt | Interrupted):
            e.moeprune_note = note
        raise
    finally:
        ctx.close()
    return result


def _carry_out(ctx: RunContext, t0: float) -> RunResult:
    spec = ctx.spec  # as checked (data lengths fitted to the model)
    choice = PIPELINES.get(spec.allocation)(ctx)
    ev = spec.evaluate
    files = dict(choice.files) | {"recipe.yaml": spec.to_yaml()}
    if any(name in files for name in STATE_FILES) and ctx.identity is not None:
        files[IDENTITY_FILE] = ctx.identity_json()  # what `--resume` of the finished run must match
    record = choice.record | {"recipe": spec.model_dump(exclude_none=True)}
    rewrite = _streaming(ctx, choice) if ev is None or ctx.layerwise else None
    if rewrite is not None:
        columns = _layerwise_columns(ctx, choice) if ev is not None else {}
        if columns:
            files["evaluation.json"] = _evaluation_json(columns, ev, choice.label)
        out = save_checkpoint(
            rewrite.model, ctx.out, source=ctx.source, kept=rewrite.kept, num_experts=ctx.num_experts,
            overwrite=ctx.overwrite, record=record | {"surgery": "streamed"}, files=files,
            max_shard_size=spec.max_shard_size, rewrite=rewrite, progress=ctx.progress,
            card_plot=choice.card_plot, evaluation=columns or None,
        )  # fmt: skip
        ctx.clean_up()
        return RunResult(
            out,
            choice,
            rewrite.kept,
            ctx.num_experts,
            columns or None,
            time.perf_counter() - t0,
            memory_usage(),
        )
    model = ctx.model
    columns: dict[str, dict] = {}
    heldout = None
    if ev is not None:
        if ctx.heldout_tokens is not None:
            heldout = CandidateEvaluator(
                model, SearchSet.from_tokens(ctx.heldout_tokens), cache="dense", reuse=False
            )
        if ev.baselines:
            columns["unpruned"] = _evaluate(ctx, model, ExpertPlan({}), heldout)
            if choice.uniform is not None and choice.label != "uniform":
                columns["uniform"] = _evaluate(ctx, model, choice.uniform, heldout)
    kept = apply_choice(model, choice)
    if ev is not None:
        columns[choice.label] = _evaluate(ctx, model, None, heldout)
    if columns:
        files["evaluation.json"] = _evaluation_json(columns, ev, choice.label)
    out = save_checkpoint(
        model, ctx.out, source=ctx.source, kept=kept, num_experts=ctx.num_experts, tokenizer=ctx.tokenizer,
        overwrite=ctx.overwrite, record=record, files=files, card_plot=choice.card_plot, evaluation=columns or None,
        source_dtype=getattr(ctx.skeleton.config, "dtype", None), max_shard_size=spec.max_shard_size,
    )  # fmt: skip
    ctx.clean_up()
    return RunResult(
        out, choice, kept, ctx.num_experts, columns or None, time.perf_counter() - t0, memory_usage()
    )
