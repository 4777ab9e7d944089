"""Active-expert reduction (EEP): route every token to k' < k experts.

The number of experts a token uses is a config value (the family's ``top_k_key``) that the MoE
modules copy at construction into an attribute (``top_k`` or ``num_experts_per_tok``, on the router,
the block or the experts). `set_active_experts_` changes both, so the model in memory computes what
a stock reload of the saved config computes (tested on every registered family). With top-k
renormalisation the kept weights are renormalised over the k' experts; without it they keep their
softmax values, as the stock model does for any k.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from ..arch import family_of, moe_layers
from ..errors import MoepruneError
from ..plan import max_active_experts

TOP_K_ATTRS = ("top_k", "num_experts_per_tok")


def active_experts(model: nn.Module) -> int:
    """Experts each token is routed to (the same in every MoE layer)."""
    values = {layer.top_k for layer in moe_layers(model)}
    if len(values) != 1:
        raise MoepruneError(f"the MoE layers route to different numbers of experts: {sorted(values)}")
    return values.pop()


def set_active_experts_(model: nn.Module, k: int) -> int:
    """Route every token to `k` experts from now on (in place); returns the previous number."""
    family = family_of(model.config)
    if family.fixed_top_k:
        raise MoepruneError(f"{family.model_type} cannot route to fewer experts: {family.fixed_top_k}")
    layers = moe_layers(model)
    old = active_experts(model)
    fewest = min(max_active_experts(layer) for layer in layers)
    if not 1 <= k <= fewest:
        raise MoepruneError(
            f"active experts must be between 1 and {fewest} (the model routes to {old}), got {k}"
        )
    for layer in layers:
        for module in layer.block.modules():
            for attr in TOP_K_ATTRS:
                if isinstance(getattr(module, attr, None), int) and getattr(module, attr) == old:
                    setattr(module, attr, k)
    setattr(model.config.get_text_config(), family.top_k_key, k)
    return old


@contextmanager
def reduced_active_experts(model: nn.Module, k: int | None) -> Iterator[nn.Module]:
    """`set_active_experts_` for the duration of the block (None: unchanged)."""
    if k is None:
        yield model
        return
    old = set_active_experts_(model, k)
    try:
        yield model
    finally:
        set_active_experts_(model, old)
