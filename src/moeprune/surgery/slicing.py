"""Slice the routed experts of MoE blocks in place: router rows/biases, fused expert tensors, counts.

This file imports nothing from moeprune on purpose: its source is copied verbatim into non-uniform
checkpoints (as ``modeling_moeprune.py``) so that ``from_pretrained(dir, trust_remote_code=True)``
rebuilds the per-layer expert counts without moeprune installed. ``spec`` is
``MoEFamily.slicing_spec()``: plain dicts and lists only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _parent_and_name(root: object, path: str) -> tuple[object, str]:
    *parents, name = path.split(".")
    for part in parents:
        root = getattr(root, part)
    return root, name


def slice_block_(block: nn.Module, keep: Sequence[int], spec: dict) -> None:
    """Keep only experts ``keep`` (original ids, in this order) of one MoE block, in place.

    Router tensors are sliced on their expert dim, expert tensors on dim 0, and every count attribute
    the kernels read is set to ``len(keep)``. Optional tensors that this config leaves out (absent or
    None, e.g. an expert bias behind a config flag) are skipped.
    """
    for path, dim in list(spec["router_tensors"]) + [(p, 0) for p in spec["expert_tensors"]]:
        parent, name = _parent_and_name(block, path)
        tensor = getattr(parent, name, None)
        if tensor is None:
            continue
        index = torch.as_tensor(list(keep), dtype=torch.long, device=tensor.device)
        sliced = tensor.detach().index_select(dim, index)  # (..., len(keep), ...)
        if isinstance(tensor, nn.Parameter):
            setattr(parent, name, nn.Parameter(sliced, requires_grad=tensor.requires_grad))
        else:
            parent._buffers[name] = sliced  # type: ignore[union-attr]
    for path in spec["count_attrs"]:
        parent, name = _parent_and_name(block, path)
        setattr(parent, name, len(keep))


def moe_blocks(model: nn.Module, spec: dict) -> dict[int, nn.Module]:
    """Decoder layer index -> sparse MoE block."""
    layers = model
    for part in spec["layers_path"].split("."):
        layers = getattr(layers, part)
    blocks = {}
    for index, layer in enumerate(layers):  # type: ignore[arg-type]
        block = getattr(layer, spec["block_attr"], None) if spec["block_attr"] else layer
        if block is not None and type(block).__name__ in spec["block_classes"] and _has_experts(block, spec):
            blocks[index] = block
    return blocks


def _has_experts(block: nn.Module, spec: dict) -> bool:
    """False for a block class that also serves dense layers (e.g. a decoder layer whose MoE is optional)."""
    obj: object = block
    for part in spec["expert_tensors"][0].split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return False
    return True


def resize_experts_(model: nn.Module, experts_per_layer: Sequence[int | None], spec: dict) -> None:
    """Give MoE layer i ``experts_per_layer[i]`` routed experts (the first ones; weights are loaded
    afterwards). ``None`` entries (dense layers) are skipped."""
    for index, block in moe_blocks(model, spec).items():
        count = experts_per_layer[index]
        if count is not None:
            slice_block_(block, range(int(count)), spec)


def resizable_class(base: type, spec: dict) -> type:
    """A subclass of the stock ``*ForCausalLM`` class that reads ``config.num_experts_per_layer``."""

    class MoepruneForCausalLM(base):  # type: ignore[misc, valid-type]
        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            resize_experts_(self, config.num_experts_per_layer, spec)

        @classmethod
        def is_custom_code(cls) -> bool:
            # Only the expert counts differ from the stock class: transformers must apply the family's
            # checkpoint key conversions on load exactly as it did (reversed) when the stock class saved.
            return base.is_custom_code()

        @classmethod
        def _supports_default_dynamic_cache(cls) -> bool:
            # generate() picks the cache from the class *name* (e.g. MiniMax's own cache): answer as the base.
            return base._supports_default_dynamic_cache()

    MoepruneForCausalLM.__name__ = MoepruneForCausalLM.__qualname__ = "MoepruneForCausalLM"
    return MoepruneForCausalLM
