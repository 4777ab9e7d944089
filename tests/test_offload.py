"""Models dispatched by accelerate with a device map that offloads decoder layers (issue 12).

The tiny checkpoint is reloaded with ``device_map`` putting its first decoder layer on the CPU and the
others on disk (``offload_folder``): those layers' weights are meta tensors on the modules, and
accelerate's hooks load them from the weights map at every forward. Observing, masking, ESAP, merged
weights and fewer active experts must leave every hook in place and compute exactly what the same
model in memory computes; pruning and saving must write the pruned real weights.
"""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import cpu_offload
from accelerate.hooks import remove_hook_from_module
from transformers import AutoModelForCausalLM

from moeprune.arch import moe_layers
from moeprune.arch.patching import Patches, is_offloaded, patched
from moeprune.fitness import CandidateEvaluator, SearchSet
from moeprune.merge.active import active_experts, reduced_active_experts
from moeprune.merge.merging import LayerMerge, merged_weights
from moeprune.observe import observe
from moeprune.surgery import load, mask_experts, mask_stacked, remove_experts_, save_pruned
from test_observe import tokens
from tiny_models import tiny_model

OFFLOAD_FAMILIES = ["qwen3_moe", "deepseek_v3", "gpt_oss"]  # plain | group-limited + biased | biases
TOL = 1e-5


def device_map(model) -> dict[str, str]:
    """Layer 0 on the CPU (the main device here), every later decoder layer on disk."""
    mapping = {f"model.{name}": "cpu" for name, _ in model.model.named_children() if name != "layers"}
    mapping["lm_head"] = "cpu"
    for i in range(len(model.model.layers)):
        mapping[f"model.layers.{i}"] = "cpu" if i == 0 else "disk"
    return mapping


def load_offloaded(path, model, folder, mixed: bool):
    """`path` reloaded with `device_map`; ``mixed``: layer 1 instead CPU-offloaded by accelerate's
    `cpu_offload` with its MoE block preloaded whole (weights in a CPU dict, one hook for the block)."""
    mapping = device_map(model)
    if mixed:
        mapping["model.layers.1"] = "cpu"
    offloaded = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, device_map=mapping, offload_folder=str(folder)
    ).eval()
    if mixed:
        block = type(moe_layers(offloaded)[0].block).__name__
        remove_hook_from_module(
            offloaded.model.layers[1], recurse=True
        )  # one hook per module, as dispatch does
        cpu_offload(offloaded.model.layers[1], torch.device("cpu"), preload_module_classes=[block])
    return offloaded


MODES = ["disk", "mixed"]  # layers 1.. on disk | layer 1 CPU-offloaded (block preloaded), 2.. on disk


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(in-memory model, the same checkpoint dispatched with offload) per family and mode."""
    cache = {}

    def make(family: str, mode: str = "disk"):
        if (family, mode) not in cache:
            path = tmp_path_factory.mktemp(f"offload-{family}")
            tiny_model(family).save_pretrained(path / "model")
            memory = AutoModelForCausalLM.from_pretrained(path / "model", dtype=torch.float32).eval()
            offloaded = load_offloaded(path / "model", memory, path / "offload", mode == "mixed")
            assert is_offloaded(offloaded) and not is_offloaded(memory)
            assert any(la.router.weight.is_meta for la in moe_layers(offloaded)), "a router must be offloaded"
            cache[family, mode] = memory, offloaded
        return cache[family, mode]

    return make


def hook_state(model) -> list:
    """Everything accelerate put on the modules: hook objects, wrapped forwards, original forwards."""
    return [
        (name, m.__dict__.get("_hf_hook"), m.__dict__.get("forward"), m.__dict__.get("_old_forward"))
        for name, m in model.named_modules()
    ]


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(3))


def logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


def plan_for(model) -> dict[int, list[int]]:
    """Two experts of every MoE layer, one per group for group-limited routing."""
    plan = {}
    for la in moe_layers(model):
        size = la.num_experts // la.num_groups
        plan[la.index] = [0, size + 1] if la.num_groups > 1 else [1, 4]
    return plan


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", OFFLOAD_FAMILIES)
def test_offloaded_model_computes_what_the_model_in_memory_does(family, mode, pair, ids):
    memory, offloaded = pair(family, mode)
    torch.testing.assert_close(logits(offloaded, ids), logits(memory, ids), rtol=0, atol=TOL)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", OFFLOAD_FAMILIES)
def test_observe_leaves_offload_hooks_and_logits_intact(family, mode, pair, ids):
    memory, offloaded = pair(family, mode)
    before, hooks = logits(offloaded, ids), hook_state(offloaded)
    n_hooks = sum(h is not None for _, h, _, _ in hooks)
    data = tokens()
    stats = observe(offloaded, data, batch_size=2, dense_tokens=4, progress=False)
    assert hook_state(offloaded) == hooks
    assert sum(h is not None for _, h, _, _ in hook_state(offloaded)) == n_hooks
    torch.testing.assert_close(logits(offloaded, ids), before, rtol=0, atol=0)
    want = observe(memory, data, batch_size=2, dense_tokens=4, progress=False)
    for index, got in stats.layers.items():
        torch.testing.assert_close(got.count, want.layers[index].count)
        torch.testing.assert_close(got.gnorm_sum, want.layers[index].gnorm_sum, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.dense_err, want.layers[index].dense_err, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", OFFLOAD_FAMILIES)
def test_masked_logits_and_esap_equal_in_memory(family, mode, pair, ids):
    memory, offloaded = pair(family, mode)
    plan = plan_for(memory)
    full, hooks = logits(offloaded, ids), hook_state(offloaded)
    with mask_experts(memory, plan):
        want = logits(memory, ids)
    with mask_experts(offloaded, plan):
        got = logits(offloaded, ids)
    assert not got.isnan().any()
    assert (want - full).abs().max() > 1e-3, "the plan should change the output"
    torch.testing.assert_close(got, want, rtol=0, atol=TOL)
    assert hook_state(offloaded) == hooks, "masking must leave accelerate's hooks in place"
    torch.testing.assert_close(logits(offloaded, ids), full, rtol=0, atol=0)

    with mask_stacked(offloaded, [plan, {}]):
        both = logits(offloaded, ids.repeat(2, 1)).split(ids.shape[0])
    torch.testing.assert_close(both[0], want, rtol=0, atol=TOL)
    torch.testing.assert_close(both[1], full, rtol=0, atol=TOL)

    search = SearchSet.from_tensors(ids, torch.ones_like(ids), batch_size=1)
    esap_memory = CandidateEvaluator(memory, search, cache="dense").evaluate(plan).value
    esap_offloaded = CandidateEvaluator(offloaded, search, cache="dense").evaluate(plan).value
    assert esap_offloaded == pytest.approx(esap_memory, abs=1e-6)
    assert 0.0 < esap_offloaded < 1.0
    assert hook_state(offloaded) == hooks


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_merged_weights_and_fewer_active_experts_under_offload(family, mode, pair, ids):
    memory, offloaded = pair(family, mode)
    full, hooks = logits(offloaded, ids), hook_state(offloaded)
    merge = {}
    for la in moe_layers(memory):
        m = LayerMerge.one_hot((0, 2, 5, 7), la.num_experts).weights.clone()
        m[1, 3] = 0.5  # anchor 2 absorbs half of expert 3
        merge[la.index] = LayerMerge((0, 2, 5, 7), m)
    wants = []
    for model in (memory, offloaded):
        with merged_weights(model, merge), mask_experts(model, plan_for(model)):
            wants.append(logits(model, ids))
    torch.testing.assert_close(wants[1], wants[0], rtol=0, atol=TOL)
    k = active_experts(memory)
    with reduced_active_experts(memory, k - 1):
        want = logits(memory, ids)
    with reduced_active_experts(offloaded, k - 1):
        got = logits(offloaded, ids)
    torch.testing.assert_close(got, want, rtol=0, atol=TOL)
    assert hook_state(offloaded) == hooks
    torch.testing.assert_close(logits(offloaded, ids), full, rtol=0, atol=0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", OFFLOAD_FAMILIES)
def test_prune_and_save_under_offload_reload_to_masked_logits(family, mode, tmp_path, ids):
    memory = tiny_model(family)
    memory.save_pretrained(tmp_path / "model")
    offloaded = load_offloaded(tmp_path / "model", memory, tmp_path / "off", mode == "mixed")
    plan = plan_for(memory)
    with mask_experts(memory, plan):
        masked = logits(memory, ids)
    remove_experts_(offloaded, plan)
    torch.testing.assert_close(logits(offloaded, ids), masked, rtol=0, atol=TOL)
    out = save_pruned(offloaded, tmp_path / "pruned", manifest={"removed": plan})
    again = load(out).eval()
    assert not is_offloaded(again)
    assert [la.num_experts for la in moe_layers(again)] == [la.num_experts for la in moe_layers(offloaded)]
    torch.testing.assert_close(logits(again, ids), masked, rtol=0, atol=TOL)


def test_patches_restore_exactly_even_on_error():
    model = tiny_model("qwen3_moe")
    router = moe_layers(model)[0].router
    layer = model.model.layers[0]
    attention = layer.self_attn
    with pytest.raises(RuntimeError, match="boom"):
        with Patches() as p:
            p.setattr(layer, "self_attn", torch.nn.Identity())  # a submodule
            p.wrap_forward(router, lambda inner: lambda *a, **k: inner(*a, **k))  # a class attribute
            p.setattr(router, "top_k", 1)  # an instance attribute
            p.setattr(model.config, "num_experts_per_tok", 1)  # a config key
            raise RuntimeError("boom")
    assert layer.self_attn is attention and "self_attn" not in layer.__dict__
    assert "forward" not in router.__dict__ and router.top_k == 2 and model.config.num_experts_per_tok == 2
    with patched(router, "top_k", 1):
        assert router.top_k == 1
    assert router.top_k == 2


# --- the CLI with an accelerate device map (--device auto[:limits]) ------------------------------


def test_cli_device_auto_with_disk_offload_gives_the_in_memory_results(run_cli, tmp_path):
    """`--device auto:cpu=SIZE` puts what does not fit on disk; `prune --criterion` and `search` end on
    the same experts and plan as on the CPU, and the run's offload folder is gone afterwards."""
    from tiny_tokenizer import TEXT, save_tiny_checkpoint

    save_tiny_checkpoint(tmp_path / "model")
    (tmp_path / "text.txt").write_text(TEXT)
    common = ("--criterion", "frequency", "--sparsity", "0.5", "--data", tmp_path / "text.txt",
              "--num-samples", "4", "--seq-len", "32")  # fmt: skip
    search = ("--search-data", tmp_path / "text.txt", "--search-samples", "2", "--search-seq-len", "32",
              "--population", "4", "--generations", "2")  # fmt: skip
    results = {}
    for device in ("cpu", "auto:cpu=40KB"):
        name = device.split(":")[0]
        code, _, err = run_cli("prune", tmp_path / "model", *common, "--out", tmp_path / f"p-{name}",
                               "--device", device, "--mode", "memory")  # fmt: skip
        assert code == 0, err
        code, _, err = run_cli("search", tmp_path / "model", *common, *search, "--out", tmp_path / f"s-{name}",
                               "--device", device)  # fmt: skip
        assert code == 0, err
        results[name] = [json.loads((tmp_path / f"{d}-{name}" / "moeprune.json").read_text())["removed"]
                         for d in ("p", "s")]  # fmt: skip
        assert not (tmp_path / f".s-{name}.run").exists()
    assert results["cpu"] == results["auto"]
    recipe = json.loads((tmp_path / "s-auto" / "moeprune.json").read_text())["recipe"]
    assert recipe["device"] == "auto:cpu=40KB"
    pruned = load(tmp_path / "p-auto")
    reference = load(tmp_path / "p-cpu")
    for key, value in reference.state_dict().items():
        assert torch.equal(value, pruned.state_dict()[key]), key
