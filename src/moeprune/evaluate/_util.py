"""Small helpers shared by the evaluation functions."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch


@contextlib.contextmanager
def inference_mode(model: torch.nn.Module) -> Iterator[None]:
    """eval() + no_grad, and router logits switched off (MoE configs with output_router_logits=True would
    otherwise add an aux loss that breaks on padded/cached inputs); everything is restored on exit."""
    cfg = getattr(model, "config", None)
    old_router = getattr(cfg, "output_router_logits", None)
    was_training = model.training
    if old_router:
        cfg.output_router_logits = False
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if old_router:
            cfg.output_router_logits = old_router
        model.train(was_training)


def model_device(model: torch.nn.Module) -> torch.device:
    from ..arch.patching import input_device

    return input_device(model)


def layer_by_layer(model) -> bool:
    """Whether `model` is an `execute.LayerwiseModel` (weights read one decoder layer at a time)."""
    return getattr(model, "runs_layer_by_layer", False)


def batch_logits(model, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[torch.Tensor]:
    """Logits (B, T, V) of each (input ids, attention mask) batch, in order: one forward per batch, or
    one stream of the layers for all of them (a model executed layer by layer)."""
    if layer_by_layer(model):
        yield from model.batch_logits(batches)
        return
    device = model_device(model)
    for x, mask in batches:
        yield model(input_ids=x.to(device), attention_mask=mask.to(device)).logits
