"""Active-expert reduction (EEP): route every token to k' < k experts.

The number of experts a token uses is a config value (the family's ``top_k_key``) that the MoE
modules copy at construction into attributes (the family's ``top_k_attrs``, e.g. ``gate.top_k`` and
the block's ``top_k``). `set_active_experts_` changes exactly those and the config, so the model in memory computes what
a stock reload of the saved config computes (tested on every registered family). With top-k
renormalisation the kept weights are renormalised over the k' experts; without it they keep their
softmax values, as the stock model does for any k.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from ..arch import family_of, get_path, moe_layers
from ..arch.patching import Patches
from ..errors import MoepruneError, UnsupportedModelError
from ..plan import max_active_experts


def _check_k(model: nn.Module, k: int) -> tuple[list, int]:
    """The MoE layers and the current number of active experts, after checking that `k` is valid."""
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
    return layers, old


def _top_k_targets(model: nn.Module, layers: list) -> list[tuple[object, str]]:
    """(object, attribute) of every place that holds the number of active experts: the family's
    ``top_k_attrs`` in every MoE block, and the config key."""
    family = family_of(model.config)
    targets: list[tuple[object, str]] = []
    for layer in layers:
        for path in family.top_k_attrs:
            parent_path, _, name = path.rpartition(".")
            parent = get_path(layer.block, parent_path) if parent_path else layer.block
            if not isinstance(getattr(parent, name, None), int):
                raise UnsupportedModelError(
                    f"{family.model_type}: layer {layer.index} has no integer '{path}' (the family's top-k "
                    "attribute); this transformers version lays the MoE block out differently"
                )
            targets.append((parent, name))
    targets.append((model.config.get_text_config(), family.top_k_key))
    return targets


def active_experts(model: nn.Module) -> int:
    """Experts each token is routed to (the same in every MoE layer)."""
    values = {layer.top_k for layer in moe_layers(model)}
    if len(values) != 1:
        raise MoepruneError(f"the MoE layers route to different numbers of experts: {sorted(values)}")
    return values.pop()


def set_active_experts_(model: nn.Module, k: int) -> int:
    """Route every token to `k` experts from now on (in place); returns the previous number."""
    layers, old = _check_k(model, k)
    for obj, name in _top_k_targets(model, layers):
        setattr(obj, name, k)
    return old


@contextmanager
def reduced_active_experts(model: nn.Module, k: int | None) -> Iterator[nn.Module]:
    """`set_active_experts_` for the duration of the block (None: unchanged); every attribute is
    restored exactly on exit, even on error."""
    if k is None:
        yield model
        return
    layers, _ = _check_k(model, k)
    with Patches() as patches:
        for obj, name in _top_k_targets(model, layers):
            patches.setattr(obj, name, k)
        yield model
