"""Exact expert masking for candidate evaluation, without copying expert weights.

For each masked layer the router runs as a *sliced clone* (router rows and biases of the kept
experts only: what structural surgery would leave), and its expert indices are mapped back to the
original ids so the untouched fused experts compute them. The result is by construction what the
structurally pruned model computes: softmax routers renormalise over the survivors, sigmoid/biased
routers select among the survivors only, group-limited routers see the shrunken groups.

Removed experts get router logit -inf (probability 0 for routers that return probabilities) in what
the router returns besides its choice (for aux losses/recording).

Per-expert router tensors that live on the block rather than on the router (``router_tensors``
outside ``router_attr``, e.g. a correction bias the block passes to ``gate(h, bias)``) are sliced
where they enter the router: any argument that *is* one of those tensors reaches the clone sliced.

The router's forward is wrapped through `arch.patching.Patches` and restored exactly on exit, even on
error; on a model dispatched with an accelerate device map the wrap goes inside accelerate's hook
(inputs moved, weights onloaded as usual) and the sliced clone is cut from the real router weights,
also when they are offloaded to CPU or disk.

Stacked candidates (`mask_stacked`): C plans evaluated in one forward whose batch is the C
candidates' inputs concatenated along dim 0 (candidate-major, equal blocks). Routers act token by
token, so each router call is split into C row blocks, block c routed under plan c, and the outputs
concatenated back; the experts then run once on all C * T tokens.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..arch import MoELayer, get_path, moe_layers
from ..arch.patching import Patches, offloaded_source, onloaded
from ..errors import MoepruneError
from ..plan import ExpertPlan, validate_plan
from .slicing import slice_block_

_PATCH_MARK = "_moeprune_masked"
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def _shallow_clone(module: nn.Module) -> nn.Module:
    """A module sharing tensors with `module` but with its own attribute/parameter dicts and no hooks."""
    clone = copy.copy(module)
    clone.__dict__ = dict(module.__dict__)
    clone._parameters = OrderedDict(module._parameters)
    clone._buffers = OrderedDict(module._buffers)
    clone._modules = OrderedDict((k, _shallow_clone(v)) for k, v in module._modules.items() if v is not None)
    for name in _HOOK_DICTS:
        if hasattr(module, name):
            setattr(clone, name, OrderedDict())
    for name in ("forward", "_hf_hook", "_old_forward"):  # the clone runs its class forward, unhooked
        clone.__dict__.pop(name, None)
    return clone


def sliced_router(layer: MoELayer, keep: list[int]) -> nn.Module:
    """A clone of `layer`'s router holding only the rows/biases of experts `keep`.

    The clone's tensors are real even when the router's weights are offloaded by accelerate (meta on
    the module): they are read through the router's own hooks, on the hooks' execution device."""
    prefix = layer.family.router_attr + "."
    spec = {
        "router_tensors": [
            (p[len(prefix) :], d) for p, d in layer.family.router_tensors if p.startswith(prefix)
        ],
        "expert_tensors": [],
        "count_attrs": [c[len(prefix) :] for c in layer.family.count_attrs if c.startswith(prefix)],
    }
    with onloaded(layer.router) as router:
        clone = _shallow_clone(router)
    for name, tensor in [*clone.named_parameters(), *clone.named_buffers()]:
        if tensor.is_meta:  # offloaded by a hook above the router (one that places the whole block)
            source = offloaded_source(layer.block, f"{layer.family.router_attr}.{name}")
            if source is None:
                raise MoepruneError(
                    f"layer {layer.index}: router tensor '{name}' is offloaded by an accelerate hook above "
                    "the MoE block; load the model with a device_map that places whole decoder layers"
                )
            hook, key = source
            real = hook.weights_map[key].to(hook.execution_device)  # type: ignore[attr-defined]
            owner, _, leaf = name.rpartition(".")
            parent = get_path(clone, owner) if owner else clone
            if isinstance(tensor, nn.Parameter):
                parent._parameters[leaf] = nn.Parameter(real, requires_grad=tensor.requires_grad)
            else:
                parent._buffers[leaf] = real
    slice_block_(clone, keep, spec)
    return clone


def _block_router_args(layer: MoELayer) -> list[tuple[torch.Tensor, int]]:
    """(tensor, expert dim) of the per-expert router tensors held by the block, not the router.

    Read at call time: an offloading hook swaps the block's tensors in and out at every forward."""
    prefix = layer.family.router_attr + "."
    found = [
        (get_path(layer.block, p, None), d)
        for p, d in layer.family.router_tensors
        if not p.startswith(prefix)
    ]
    return [(t, d) for t, d in found if t is not None]


def _masked_forward(layer: MoELayer, clone: nn.Module, keep: list[int]):
    num_experts = layer.num_experts
    kind = layer.family.router_output
    has_block_args = bool(_block_router_args(layer))

    keep_on: dict[torch.device, torch.Tensor] = {}

    def keep_t(device: torch.device) -> torch.Tensor:
        """`keep` as an index tensor on `device` (copied there once per mask, not per call)."""
        if device not in keep_on:
            keep_on[device] = torch.as_tensor(keep, device=device)
        return keep_on[device]

    def sliced(value, block_args):
        for tensor, dim in block_args:
            if value is tensor:
                return value.index_select(dim, keep_t(value.device))
        return value

    def forward(hidden_states, *args, **kwargs):
        if has_block_args:
            block_args = _block_router_args(layer)
            args = tuple(sliced(a, block_args) for a in args)
            kwargs = {k: sliced(v, block_args) for k, v in kwargs.items()}
        out = clone.forward(hidden_states, *args, **kwargs)
        if kind in ("topk", "topk_probs"):
            logits, weights, indices = out  # (T, E'), (T, k), (T, k); probabilities for topk_probs
            ids = keep_t(indices.device)
            fill = float("-inf") if kind == "topk" else 0.0
            full = logits.new_full((*logits.shape[:-1], num_experts), fill)  # (T, E)
            full[..., ids] = logits
            return full, weights, ids[indices]
        scores, logits = out  # dense_scores: (T, E'), (T, E')
        ids = keep_t(scores.device)
        full_scores = scores.new_zeros((*scores.shape[:-1], num_experts))
        full_scores[..., ids] = scores
        full_logits = logits.new_full((*logits.shape[:-1], num_experts), float("-inf"))
        full_logits[..., ids] = logits
        return full_scores, full_logits

    return forward


def _stacked_forward(layer: MoELayer, forwards: list):
    """Router forward over C equal row blocks, block c under ``forwards[c]``."""
    blocks = len(forwards)

    def forward(hidden_states, *args, **kwargs):
        shared = [t for t, _ in _block_router_args(layer)]
        rows = hidden_states.shape[0]  # C * tokens (or C * batch)
        if rows % blocks:
            raise RuntimeError(f"{rows} router rows do not split into {blocks} stacked candidates")
        step = rows // blocks

        def cut(value, c: int):
            per_row = isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == rows
            if per_row and not any(value is t for t in shared):
                return value[c * step : (c + 1) * step]
            return value

        outs = [
            fn(
                hidden_states[c * step : (c + 1) * step],
                *(cut(a, c) for a in args),
                **{k: cut(v, c) for k, v in kwargs.items()},
            )  # fmt: skip
            for c, fn in enumerate(forwards)
        ]
        return tuple(torch.cat(parts, dim=0) for parts in zip(*outs, strict=True))

    return forward


@contextmanager
def mask_stacked(
    model: nn.Module, plans: list[ExpertPlan | dict], layers: list[MoELayer] | None = None
) -> Iterator[list[dict[int, list[int]]]]:
    """Within the block, rows block c of every forward (dim 0 split into ``len(plans)`` equal blocks)
    is computed exactly as the model pruned by ``plans[c]`` computes it; yields the kept ids per plan.
    `layers`: the MoE layers to mask and check the plans against (default: all of the model's).

    With one plan this is `mask_experts`. Patches are removed on exit, even on error."""
    plans = [p if isinstance(p, ExpertPlan) else ExpertPlan.from_removed(p) for p in plans]
    if not plans:
        raise ValueError("mask_stacked needs at least one plan")
    layers = moe_layers(model) if layers is None else layers
    kept = [validate_plan(model, p, layers) for p in plans]
    with Patches() as patches:
        for layer in layers:
            keeps = [k[layer.index] for k in kept]
            if all(len(keep) == layer.num_experts for keep in keeps):
                continue
            router = layer.router
            if getattr(router, _PATCH_MARK, False):
                raise RuntimeError("mask_experts() is already active on this model; masks do not nest")
            forwards = [
                _masked_forward(layer, sliced_router(layer, keep), keep)
                if len(keep) < layer.num_experts
                else None
                for keep in keeps
            ]

            def make(inner, forwards=forwards, layer=layer):
                """The masked router; unmasked candidates run the router's forward as it was (`inner`)."""
                fns = [fn or inner for fn in forwards]
                return fns[0] if len(fns) == 1 else _stacked_forward(layer, fns)

            patches.wrap_forward(router, make)
            patches.setattr(router, _PATCH_MARK, True)
        yield kept


@contextmanager
def mask_experts(
    model: nn.Module, plan: ExpertPlan | dict, layers: list[MoELayer] | None = None
) -> Iterator[dict[int, list[int]]]:
    """Within the block, `model` computes exactly what the model pruned by `plan` computes.

    Yields the kept expert ids per MoE layer (of `layers`, default all). Patches are removed on exit,
    even on error.
    """
    with mask_stacked(model, [plan], layers) as kept:
        yield kept[0]
