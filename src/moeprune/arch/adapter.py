"""Bind a family entry to a loaded model: find its MoE layers, routers, experts and counts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from ..errors import UnsupportedModelError, did_you_mean
from .families import FAMILIES
from .family import MoEFamily

_MISSING = object()


def get_path(obj: object, path: str, default: object = _MISSING) -> object:
    """``get_path(block, "gate.wg.weight")`` -> the attribute at that dotted path (`default`, when
    given, for a path that does not exist)."""
    try:
        for part in path.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        if default is _MISSING:
            raise
        return default
    return obj


def family_of(config: PretrainedConfig) -> MoEFamily:
    """The family entry for a config; a clear error for dense or unknown models."""
    text_config = getattr(config, "get_text_config", lambda: config)()
    model_type = text_config.model_type
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    looks_moe = _mentions_experts(text_config.to_dict())
    if not looks_moe:
        raise UnsupportedModelError(
            f"'{model_type}' is a dense model (no routed experts): moeprune prunes Mixture-of-Experts models only"
        )
    raise UnsupportedModelError(
        f"MoE family '{model_type}' is not supported yet{did_you_mean(model_type, list(FAMILIES))}; "
        "see the README's family table"
    )


def _mentions_experts(config: dict) -> bool:
    """Whether any (nested) config key speaks of experts: MoE configs do, dense ones do not."""
    for key, value in config.items():
        if isinstance(key, str) and "expert" in key and value:
            return True
        if isinstance(value, dict) and _mentions_experts(value):
            return True
    return False


@dataclass
class MoELayer:
    """One sparse MoE block of a loaded model, with its family's names resolved."""

    index: int  # decoder layer index
    block: nn.Module
    family: MoEFamily
    config_top_k: int | None = None  # config[family.top_k_key], for routers without a top_k attribute

    @property
    def router(self) -> nn.Module:
        return get_path(self.block, self.family.router_attr)  # type: ignore[return-value]

    @property
    def experts(self) -> nn.Module:
        return self.block.experts

    @property
    def num_experts(self) -> int:
        return int(get_path(self.block, self.family.expert_tensors[0]).shape[0])

    @property
    def top_k(self) -> int:
        """Experts each token is routed to: the first of the family's ``top_k_attrs`` (the config's
        value for families that read it at every forward)."""
        if self.family.top_k_attrs:
            return int(get_path(self.block, self.family.top_k_attrs[0]))  # type: ignore[arg-type]
        if self.config_top_k is None:
            raise UnsupportedModelError(
                f"{self.family.model_type}: the config has no '{self.family.top_k_key}' (experts per token)"
            )
        return int(self.config_top_k)

    @property
    def num_groups(self) -> int:
        """Expert groups of a group-limited router (1 when routing is not group-limited)."""
        if not self._groups_active():
            return 1
        return getattr(self.router, "num_group", None) or 1

    @property
    def topk_groups(self) -> int:
        """Groups each token may route into (all of them when routing is not group-limited)."""
        if not self._groups_active():
            return 1
        return getattr(self.router, "topk_group", None) or 1

    def _groups_active(self) -> bool:
        if self.family.group_key is None:
            return False
        if self.family.group_active:
            attr, value = self.family.group_active.split("=")
            return getattr(self.router, attr, None) == value
        return True

    def expert_param_count(self) -> int:
        """Parameters that belong to one routed expert (expert tensors + its router rows/biases;
        buffers such as e_score_correction_bias are not parameters and are not counted)."""
        n = 0
        for path, dim in [(p, 0) for p in self.family.expert_tensors] + list(self.family.router_tensors):
            t = get_path(self.block, path, None)
            if isinstance(t, nn.Parameter):
                n += t.numel() // t.shape[dim]
        return n


def moe_layers(model: PreTrainedModel) -> list[MoELayer]:
    """Every sparse MoE block of `model`, by decoder layer index (dense layers are skipped)."""
    family = family_of(model.config)
    layers = get_path(model, family.layers_path)
    found = []
    config_top_k = getattr(model.config.get_text_config(), family.top_k_key, None)
    for index, layer in enumerate(layers):  # type: ignore[arg-type]
        block = getattr(layer, family.block_attr, None) if family.block_attr else layer
        if (
            block is not None
            and type(block).__name__ in family.block_classes
            and get_path(block, family.expert_tensors[0], None) is not None  # not a dense layer of that class
        ):
            found.append(MoELayer(index=index, block=block, family=family, config_top_k=config_top_k))
    if not found:
        raise UnsupportedModelError(
            f"no {family.block_classes[0]} with routed experts found under "
            f"{'.'.join(filter(None, [family.layers_path, '*', family.block_attr]))}: "
            "the model has no MoE layers to prune"
        )
    return found


def attention_name(family: MoEFamily, index: int, layer: nn.Module) -> str | None:
    """The family's token-mixing sub-module that decoder layer `index` holds (None when the family
    declares none); a layer that holds none or several of the declared names is an unknown layout."""
    if not family.attention_attrs:
        return None
    found = [a for a in family.attention_attrs if isinstance(getattr(layer, a, None), nn.Module)]
    if len(found) != 1:
        raise UnsupportedModelError(
            f"{family.model_type}: decoder layer {index} ({type(layer).__name__}) holds "
            f"{found or 'none'} of the attention sub-modules {list(family.attention_attrs)} the family declares"
        )
    return found[0]


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype
