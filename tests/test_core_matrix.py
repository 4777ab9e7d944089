"""The core matrix over every supported family: identity, masked == structural == reloaded."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import moeprune
from moeprune.arch import FAMILIES as REGISTERED
from moeprune.arch import attention_name, family_of, get_path, moe_layers
from moeprune.plan import ExpertPlan
from moeprune.surgery import load, mask_experts, remove_experts_, save_pruned
from tiny_models import FAMILIES, REPLAY_FALLBACK_OVERRIDES, tiny_model

TOL = 1e-5


def test_every_registered_family_is_in_the_matrix():
    assert sorted(REGISTERED) == sorted(FAMILIES)


# every attribute name under which some transformers MoE module keeps its number of active experts
TOP_K_NAMES = {"top_k", "num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "top_k_experts"}


@pytest.mark.parametrize("family", FAMILIES)
def test_declared_architecture_paths_exist(family):
    """The family entry's decoder-stack facts hold on the tiny model: attention sub-module, final norm,
    logits scaling key, and top-k attributes (all of them, equal to the config's top-k)."""
    model = tiny_model(family)
    fam = family_of(model.config)
    text = model.config.get_text_config()
    k = getattr(text, fam.top_k_key)
    for layer in moe_layers(model):
        assert layer.top_k == k
        for path in fam.top_k_attrs:
            assert get_path(layer.block, path) == k, path
        held = {
            f"{name}.{attr}" if name else attr
            for name, module in layer.block.named_modules()
            for attr, value in vars(module).items()
            if attr in TOP_K_NAMES and isinstance(value, int)
        }
        assert held <= set(fam.top_k_attrs), f"undeclared top-k attributes: {held - set(fam.top_k_attrs)}"
    for i, decoder_layer in enumerate(get_path(model, fam.layers_path)):
        name = attention_name(fam, i, decoder_layer)  # raises for a layer holding none / several
        assert (name is None) == (not fam.attention_attrs)
    if fam.final_norm is None:
        assert fam.replay_unsupported, "a family without a final norm path must say why it cannot be replayed"
    else:
        assert isinstance(get_path(model, fam.final_norm), torch.nn.Module)
    if fam.logits_scaling is not None:
        assert hasattr(text, fam.logits_scaling)
    assert (fam.replay_unsupported is not None) == (family in REPLAY_FALLBACK_OVERRIDES)


def make_plan(model, uniform: bool, seed: int = 1) -> dict[int, list[int]]:
    """Random removals: 2 per layer (uniform) or alternating 2/4 (non-uniform), equal per group."""
    gen = torch.Generator().manual_seed(seed)
    plan = {}
    for i, layer in enumerate(moe_layers(model)):
        n = 2 if uniform or i % 2 == 0 else 4
        groups, size = layer.num_groups, layer.num_experts // layer.num_groups
        plan[layer.index] = [
            g * size + e
            for g in range(groups)
            for e in torch.randperm(size, generator=gen)[: n // groups].tolist()
        ]
    return plan


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(0)
    return torch.randint(3, 128, (2, 11))


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_nothing_is_identity(family, inputs):
    model = tiny_model(family)
    ref = logits(model, inputs)
    with mask_experts(model, {}):
        assert torch.equal(logits(model, inputs), ref)
    pruned = copy.deepcopy(model)
    remove_experts_(pruned, {})
    assert torch.equal(logits(pruned, inputs), ref)


@pytest.mark.parametrize("uniform", [True, False], ids=["uniform", "nonuniform"])
@pytest.mark.parametrize("family", FAMILIES)
def test_masked_equals_structural_equals_reloaded(family, uniform, inputs, tmp_path):
    model = tiny_model(family)
    plan = make_plan(model, uniform)
    layers = moe_layers(model)
    theory = param_count(model) - sum(len(plan[la.index]) * la.expert_param_count() for la in layers)
    full = logits(model, inputs)

    with mask_experts(model, plan):
        masked = logits(model, inputs)
    assert torch.equal(logits(model, inputs), full), "masks must be removed on exit"
    assert (masked - full).abs().max() > 1e-3, "the plan should change the output"

    pruned = copy.deepcopy(model)
    kept = remove_experts_(pruned, plan)
    assert {k: len(v) for k, v in kept.items()} == {
        la.index: la.num_experts - len(plan[la.index]) for la in layers
    }
    structural = logits(pruned, inputs)
    assert (masked - structural).abs().max() <= TOL
    assert param_count(pruned) == theory

    out = save_pruned(pruned, tmp_path / "out", manifest={"removed": plan})
    config = AutoConfig.from_pretrained(out)
    reloaded = [load(out)]
    if uniform:
        assert getattr(config, "num_experts_per_layer", None) is None
        assert not (out / "modeling_moeprune.py").exists()
        reloaded.append(AutoModelForCausalLM.from_pretrained(out))  # stock loader
    else:
        assert config.num_experts_per_layer == [
            len(kept[i]) if i in kept else None for i in range(len(config.num_experts_per_layer))
        ]
        reloaded.append(AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True))
    for again in reloaded:
        again.eval()
        assert param_count(again) == theory
        assert (logits(again, inputs) - structural).abs().max() <= TOL
        generated = again.generate(inputs[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert generated.shape == (1, 7)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "llama4_text"])
def test_uniform_checkpoint_config_has_new_counts(family, tmp_path):
    model = tiny_model(family)
    plan = make_plan(model, uniform=True)
    remove_experts_(model, plan)
    out = save_pruned(model, tmp_path / "out", manifest={})
    fam = moeprune.arch.FAMILIES[family]
    config = AutoConfig.from_pretrained(out)
    for key in fam.num_experts_keys:
        assert getattr(config, key) == 6


def test_masks_are_removed_on_error(inputs):
    model = tiny_model("qwen3_moe")
    ref = logits(model, inputs)
    with pytest.raises(RuntimeError, match="boom"):
        with mask_experts(model, {0: [1, 2]}):
            raise RuntimeError("boom")
    assert all("forward" not in la.router.__dict__ for la in moe_layers(model))
    assert torch.equal(logits(model, inputs), ref)


def test_plan_json_round_trip(tmp_path):
    plan = ExpertPlan.from_removed({0: [3, 1], 2: [5]})
    path = tmp_path / "plan.json"
    import json

    path.write_text(json.dumps(plan.to_dict()))
    assert ExpertPlan.from_json(path) == plan


@pytest.mark.parametrize("family", FAMILIES)
def test_stacked_candidates_equal_one_at_a_time(family, inputs):
    """C plans in one forward (batch = C copies of the inputs) == each plan under mask_experts."""
    from moeprune.surgery import mask_stacked

    model = tiny_model(family)
    plans = [make_plan(model, uniform=True, seed=1), {}, make_plan(model, uniform=False, seed=2)]
    one_by_one = []
    for plan in plans:
        with mask_experts(model, plan):
            one_by_one.append(logits(model, inputs))
    with mask_stacked(model, plans) as kept:
        stacked = logits(model, inputs.repeat(len(plans), 1)).split(inputs.shape[0])
    assert len(kept) == len(plans)
    assert all("forward" not in la.router.__dict__ for la in moe_layers(model))
    for c, (got, want) in enumerate(zip(stacked, one_by_one, strict=True)):
        assert (got - want).abs().max() <= TOL, f"candidate {c}"
    assert (one_by_one[0] - one_by_one[1]).abs().max() > 1e-3
