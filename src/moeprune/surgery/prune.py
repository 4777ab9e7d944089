"""Structural removal of routed experts, in place, with the config following along."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from ..arch import MoELayer, family_of, get_path, moe_layers
from ..arch.patching import offloaded_source, transform_offloaded
from ..errors import MoepruneError
from ..plan import ExpertPlan, validate_plan
from .slicing import slice_block_


def remove_experts_(model: PreTrainedModel, plan: ExpertPlan | dict) -> dict[int, list[int]]:
    """Remove the plan's experts from `model` in place; return the kept original ids per MoE layer.

    Router rows/biases, fused expert tensors and every count attribute are sliced; the config gets
    the new counts (uniform: the family's own keys; non-uniform: also ``num_experts_per_layer``).

    On a model dispatched with accelerate offload, an offloaded tensor is sliced on the module (meta,
    shape only) and where its hook reads the real weights (`_slice_offloaded`): forwards and
    ``save_pretrained`` (which reads offloaded weights through the same hooks) see the pruned model.
    A meta-device skeleton (no hooks) is pruned in shape only (streaming surgery's config and card).
    """
    if not isinstance(plan, ExpertPlan):
        plan = ExpertPlan.from_removed(plan)
    family = family_of(model.config)
    layers = moe_layers(model)
    kept = validate_plan(model, plan, layers)
    spec = family.slicing_spec()
    dispatched = any(hasattr(m, "_hf_hook") for m in model.modules())  # else meta = a skeleton (shapes)
    for layer in layers:
        if len(kept[layer.index]) != layer.num_experts:
            if dispatched:
                _slice_offloaded(layer, kept[layer.index])
            slice_block_(layer.block, kept[layer.index], spec)
    set_config_counts(model, {layer.index: len(kept[layer.index]) for layer in layers})
    return kept


def _slice_offloaded(layer: MoELayer, keep: list[int]) -> None:
    """Make every offloading hook of `layer` read its per-expert tensors sliced to `keep` (lazily, at
    each read: nothing offloaded is loaded here)."""
    family = layer.family
    for path, dim in [*family.router_tensors, *((p, 0) for p in family.expert_tensors)]:
        tensor = get_path(layer.block, path, None)
        if not isinstance(tensor, torch.Tensor) or not tensor.is_meta:
            continue
        source = offloaded_source(layer.block, path)
        if source is None:
            raise MoepruneError(
                f"layer {layer.index}: '{path}' is on the meta device and no accelerate hook on the MoE block "
                "holds its weights; load the model with a device_map that places whole decoder layers"
            )
        hook, key = source
        index = torch.as_tensor(keep, dtype=torch.long)
        transform_offloaded(
            hook, key, lambda real, d=dim, i=index: real.index_select(d, i.to(real.device)), None
        )


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
