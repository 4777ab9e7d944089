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


def _expert_tensors(model: nn.Module, plan: MergePlan) -> Iterator[tuple[torch.Tensor, LayerMerge]]:
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
            tensor = get_path(layer.block, path)
            if isinstance(tensor, torch.Tensor):
                yield tensor, merge  # (E, ...)


def _merged(tensor: torch.Tensor, merge: LayerMerge) -> torch.Tensor:
    """Σ_i M[j, i] W_i for every anchor j: (E, ...) -> (k, ...)."""
    return torch.tensordot(merge.weights.to(tensor.dtype), tensor, dims=([1], [0]))


@contextmanager
def merged_weights(model: nn.Module, plan: MergePlan) -> Iterator[nn.Module]:
    """Within the block, each anchor's slot of every fused expert tensor holds Σ_i M[j, i] W_i."""
    saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for tensor, merge in _expert_tensors(model, plan):
                index = torch.tensor(merge.anchors, device=tensor.device)
                merged = _merged(tensor, merge)  # (k, ...)
                saved.append((tensor, index, tensor.index_select(0, index).clone()))
                tensor.index_copy_(0, index, merged)
        yield model
    finally:
        with torch.no_grad():
            for tensor, index, original in reversed(saved):
                tensor.index_copy_(0, index, original)


def merge_experts_(model: nn.Module, plan: MergePlan) -> dict[int, list[int]]:
    """Merge in place, then remove the non-anchors structurally; returns the kept (anchor) ids."""
    removal = expert_plan(model, plan)
    with torch.no_grad():
        for tensor, merge in _expert_tensors(model, plan):
            index = torch.tensor(merge.anchors, device=tensor.device)
            tensor.index_copy_(0, index, _merged(tensor, merge))
    return remove_experts_(model, removal)
