"""Structural removal of routed experts, in place, with the config following along."""

from __future__ import annotations

from transformers import PreTrainedModel

from ..arch import family_of, moe_layers
from ..plan import ExpertPlan, validate_plan
from .slicing import slice_block_


def remove_experts_(model: PreTrainedModel, plan: ExpertPlan | dict) -> dict[int, list[int]]:
    """Remove the plan's experts from `model` in place; return the kept original ids per MoE layer.

    Router rows/biases, fused expert tensors and every count attribute are sliced; the config gets
    the new counts (uniform: the family's own keys; non-uniform: also ``num_experts_per_layer``).
    """
    if not isinstance(plan, ExpertPlan):
        plan = ExpertPlan.from_removed(plan)
    family = family_of(model.config)
    layers = moe_layers(model)
    kept = validate_plan(model, plan, layers)
    spec = family.slicing_spec()
    for layer in layers:
        if len(kept[layer.index]) != layer.num_experts:
            slice_block_(layer.block, kept[layer.index], spec)
    set_config_counts(model, {layer.index: len(kept[layer.index]) for layer in layers})
    return kept


def set_config_counts(model: PreTrainedModel, counts: dict[int, int]) -> None:
    """Write per-layer routed-expert counts into the (text) config.

    Uniform counts use only the family's keys, so stock readers (transformers, vLLM) load the model.
    Non-uniform counts also set ``num_experts_per_layer`` (None for dense layers) and the family keys
    to the largest count.
    """
    config = model.config.get_text_config()
    family = family_of(model.config)
    values = set(counts.values())
    for key in family.num_experts_keys + family.extra_config_keys:
        setattr(config, key, max(values))
    if len(values) == 1:
        if hasattr(config, "num_experts_per_layer"):
            delattr(config, "num_experts_per_layer")
    else:
        config.num_experts_per_layer = [counts.get(i) for i in range(config.num_hidden_layers)]
