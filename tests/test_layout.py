"""Saved tensor layout == the layout of the family's stock checkpoints on the hub, for every family.

transformers 5 fuses expert weights in memory (``experts.gate_up_proj`` ...) and its conversion
mapping (`transformers.conversion_mapping`) says how each family's original checkpoints are laid out
(per-expert ``experts.<i>.gate_proj.weight`` for Qwen3-MoE, ``experts.<i>.w1.weight`` for Mixtral, fused
for gpt-oss ...). llama.cpp's converter, vLLM and llm-compressor read the original layout. Here the
expected layout is derived from that mapping on the UNPRUNED tiny model (nothing is written per family)
and shrunk to the kept experts; the names moeprune writes for the pruned model must equal it, and the
checkpoint must reload with the stock loader with no missing or unexpected key. ``config.json`` must hold
the new expert count under the family's own keys (``MoEFamily.num_experts_keys``, the hub configs' names).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from transformers.core_model_loading import revert_weight_conversion

from moeprune.arch import FAMILIES as FAMILY
from moeprune.arch import FAMILIES as REGISTERED
from moeprune.arch import moe_layers
from moeprune.surgery import remove_experts_, save_pruned
from tiny_models import FAMILIES, tiny_model

LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
EXPERT = re.compile(r"\.experts\.(\d+)\.")


def hub_layout(model) -> dict[str, tuple[int, ...]]:
    """Names and shapes of `model` in the original (hub) format: transformers' conversion mapping for
    the family, reversed. Tied weights are dropped, as ``save_pretrained`` drops them."""
    state = {k: v for k, v in model.state_dict().items()}
    for tied in getattr(model, "_tied_weights_keys", None) or {}:
        if model.config.get_text_config().tie_word_embeddings:
            state.pop(tied, None)
    return {k: tuple(v.shape) for k, v in revert_weight_conversion(model, state).items()}


def saved_layout(out: Path) -> dict[str, tuple[int, ...]]:
    names: dict[str, tuple[int, ...]] = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():  # noqa: SIM118
                names[k] = tuple(st.get_slice(k).get_shape())
    return names


def uniform_plan(model) -> dict[int, list[int]]:
    """Remove 2 of the 8 experts in every MoE layer (equally per group), not the last ones, so that
    kept experts must be renumbered."""
    plan = {}
    for layer in moe_layers(model):
        size = layer.num_experts // layer.num_groups
        per_group = max(2 // layer.num_groups, 1)
        plan[layer.index] = [g * size + e for g in range(layer.num_groups) for e in range(per_group)]
    return plan


def expected_layout(stock: dict[str, tuple[int, ...]], total: dict[int, int], kept: dict[int, int]):
    """The stock layout with layer l's per-expert tensors ``experts.<i>.`` kept for i < kept[l]
    (renumbered 0..k-1) and every other tensor under the same name."""
    out = {}
    for name, shape in stock.items():
        layer, expert = LAYER.search(name), EXPERT.search(name)
        if layer and expert and int(layer.group(1)) in kept:
            if int(expert.group(1)) >= kept[int(layer.group(1))]:
                continue
        out[name] = shape
    return out


def test_every_registered_family_is_checked():
    assert sorted(REGISTERED) == sorted(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_names_match_the_hub_layout(family, tmp_path):
    model = tiny_model(family)
    stock = hub_layout(model)
    total = {la.index: la.num_experts for la in moe_layers(model)}
    plan = uniform_plan(model)
    kept = {i: len(v) for i, v in remove_experts_(model, plan).items()}
    assert all(kept[i] == total[i] - len(plan[i]) for i in plan)

    out = save_pruned(model, tmp_path / "out", manifest={"removed": plan})
    saved = saved_layout(out)
    want = expected_layout(stock, total, kept)
    assert sorted(saved) == sorted(want), (
        f"{family}: written but not in the hub layout {sorted(set(saved) - set(want))[:4]}, "
        f"missing {sorted(set(want) - set(saved))[:4]}"
    )
    # shapes: per-expert tensors unchanged; any other tensor changes in at most one dimension, the
    # expert one (fused experts, router rows, per-expert biases), scaled by kept/total of its layer
    for name, shape in saved.items():
        if shape == want[name]:
            continue
        layer = LAYER.search(name)
        assert layer is not None and not EXPERT.search(name), f"{name}: {want[name]} -> {shape}"
        i = int(layer.group(1))
        diff = [(a, b) for a, b in zip(want[name], shape, strict=True) if a != b]
        assert len(diff) == 1 and diff[0][0] * kept[i] == diff[0][1] * total[i], (
            f"{name}: {want[name]} -> {shape}"
        )

    # config.json holds the new count under the family's own (hub) keys, not only transformers 5's name
    raw = json.loads((out / "config.json").read_text())
    for key in FAMILY[family].num_experts_keys:
        assert raw.get(key) == kept[min(kept)], f"{family}: config.json {key}={raw.get(key)}"

    reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    x = torch.randint(3, 100, (1, 9))
    with torch.no_grad():
        assert (reloaded.eval()(x).logits - model.eval()(x).logits).abs().max() <= 1e-5
