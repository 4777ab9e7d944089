"""Small helpers shared by the evaluation functions."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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
