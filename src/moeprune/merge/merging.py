"""Expert merging (EEP): new expert j of a layer = Σ_i M[j, i] · W_i, on every fused expert tensor.

A `LayerMerge` holds the layer's anchors (the k experts whose router rows stay) and the merging
matrix M (k × E, rows in anchor order). EEP's router mapping T is kept one-hot at the anchors: the
merged model's router is the stock router sliced to the anchors, so the checkpoint is a stock one
for every family (a general T, mixing router probabilities, would need a custom router module).
M = one-hot rows at the anchors is plain pruning.

`merged_weights` writes the merged experts into the anchors' slots of the full model and restores
the originals on exit; with the non-anchors masked (`surgery.mask_experts`) the model then computes
exactly what `merge_experts_` (merge, then structural removal) leaves.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..arch import family_of, get_path, moe_layers
from ..arch.patching import Patches, offloaded_source, transform_offloaded
from ..errors import MoepruneError
from ..plan import ExpertPlan
from ..surgery import remove_experts_


@dataclass(frozen=True)
class LayerMerge:
    anchors: tuple[int, ...]  # (k,) original ids, sorted
    weights: torch.Tensor  # M: (k, E)

    @classmethod
    def one_hot(cls, anchors: tuple[int, ...], num_experts: int) -> LayerMerge:
        m = torch.zeros(len(anchors), num_experts, dtype=torch.float64)
        m[torch.arange(len(anchors)), torch.tensor(anchors)] = 1.0
        return cls(tuple(anchors), m)


MergePlan = Mapping[int, LayerMerge]  # decoder layer index -> merge of that MoE layer


def expert_plan(model: nn.Module, plan: MergePlan) -> ExpertPlan:
    """The experts a merge plan removes: every non-anchor of every merged layer."""
    return ExpertPlan.from_kept(
        {i: m.anchors for i, m in plan.items()},
        {layer.index: layer.num_experts for layer in moe_layers(model)},
    )


def _expert_tensors(model: nn.Module, plan: MergePlan) -> Iterator[tuple[nn.Module, str, LayerMerge]]:
    """(block, path, merge) of every fused expert tensor of every merged layer."""
    family = family_of(model.config)
    for layer in moe_layers(model):
        merge = plan.get(layer.index)
        if merge is None:
            continue
        if merge.weights.shape != (len(merge.anchors), layer.num_experts):
            raise MoepruneError(
                f"layer {layer.index}: merging matrix of shape {tuple(merge.weights.shape)}, expected "
                f"({len(merge.anchors)}, {layer.num_experts})"
            )
        for path in family.expert_tensors:
            if isinstance(get_path(layer.block, path, None), torch.Tensor):
                yield layer.block, path, merge  # tensor (E, ...)


def _merged(tensor: torch.Tensor, merge: LayerMerge) -> torch.Tensor:
    """Σ_i M[j, i] W_i for every anchor j: (E, ...) -> (k, ...)."""
    return torch.tensordot(merge.weights.to(tensor.dtype).to(tensor.device), tensor, dims=([1], [0]))


def _with_merged(tensor: torch.Tensor, merge: LayerMerge) -> torch.Tensor:
    """A copy of `tensor` (E, ...) whose anchor slots hold the merged experts."""
    index = torch.tensor(merge.anchors, device=tensor.device)
    return tensor.index_copy(0, index, _merged(tensor, merge))


def _merge_tensor(block: nn.Module, path: str, merge: LayerMerge, patches: Patches | None) -> None:
    """Write the merged experts into the anchor slots of the tensor at `path` (until `patches`
    restores, when given). An offloaded tensor (accelerate weights map) is merged where the hook
    reads it, at every onload, so the offloaded weights are never all held in memory."""
    tensor = get_path(block, path)
    if tensor.is_meta:
        source = offloaded_source(block, path)
        if source is None:
            raise MoepruneError(
                f"expert tensor '{path}' is on the meta device and no accelerate hook on the MoE block holds it"
            )
        hook, key = source
        transform_offloaded(hook, key, lambda real: _with_merged(real, merge), patches)
        return
    index = torch.tensor(merge.anchors, device=tensor.device)
    with torch.no_grad():
        if patches is not None:
            original = tensor.index_select(0, index)  # a copy
            patches.on_restore(lambda: tensor.data.index_copy_(0, index, original))
        tensor.data.index_copy_(0, index, _merged(tensor.data, merge))


@contextmanager
def merged_weights(model: nn.Module, plan: MergePlan) -> Iterator[nn.Module]:
    """Within the block, each anchor's slot of every fused expert tensor holds Σ_i M[j, i] W_i;
    the originals are back after it, even on error."""
    with Patches() as patches:
        for block, path, merge in _expert_tensors(model, plan):
            _merge_tensor(block, path, merge, patches)
        yield model


def merge_experts_(model: nn.Module, plan: MergePlan) -> dict[int, list[int]]:
    """Merge in place, then remove the non-anchors structurally; returns the kept (anchor) ids."""
    removal = expert_plan(model, plan)
    for block, path, merge in list(_expert_tensors(model, plan)):
        _merge_tensor(block, path, merge, None)
    return remove_experts_(model, removal)
