"""The few public calls of moeprune. The CLI only parses arguments and calls these."""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedModel

from . import __version__
from .arch import family_of, moe_layers
from .surgery import ExpertPlan, load, remove_experts_, save_pruned, validate_plan
from .surgery.checkpoint import skeleton

__all__ = ["ExpertPlan", "check_model", "load", "load_tokenizer", "manifest", "prune", "save"]


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
    **extra,
) -> Path:
    """Write the pruned checkpoint, tokenizer and ``moeprune.json`` atomically to `out_dir`."""
    record = manifest(source, kept, num_experts, family=family_of(model.config).model_type, **extra)
    return save_pruned(model, out_dir, manifest=record, tokenizer=tokenizer, overwrite=overwrite)


def expert_counts(model: PreTrainedModel) -> dict[int, int]:
    """Routed experts per MoE decoder layer."""
    return {layer.index: layer.num_experts for layer in moe_layers(model)}
