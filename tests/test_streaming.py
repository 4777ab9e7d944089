"""Streaming surgery (the checkpoint rewritten tensor by tensor) == in-memory surgery, on every family
of the matrix, in both on-disk layouts; FP8 block-scaled checkpoints; shard indexes; permissions; and a
checkpoint larger than the memory the pruning process may use."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig
from transformers.conversion_mapping import get_checkpoint_conversion_mapping

from moeprune import api
from moeprune.arch import moe_layers
from moeprune.errors import MoepruneError
from moeprune.merge.merging import LayerMerge, merge_experts_
from moeprune.surgery import ExpertPlan, load, mask_experts, remove_experts_, save_pruned
from moeprune.surgery.streaming import INDEX
from test_core_matrix import make_plan
from tiny_models import FAMILIES, tiny_model

SHARD = "20KB"
TOL = 1e-5


def layouts(family: str) -> list[str]:
    """'hub': what save_pretrained writes (the family's conversion reverted, e.g. per-expert tensors);
    'fused': the in-memory names. One layout when transformers has no conversion for the family."""
    return ["hub", "fused"] if get_checkpoint_conversion_mapping(family) else ["hub"]


# every family in each of its layouts; uniform plans on one layout, non-uniform on the other (both
# plans on the families that have one layout)
CASES = [
    (family, layout, uniform)
    for family in FAMILIES
    for layout, uniform in (
        zip(layouts(family), (False, True), strict=True)
        if len(layouts(family)) == 2
        else [("hub", True), ("hub", False)]
    )
]


def save_source(model, path: Path, layout: str) -> Path:
    model.save_pretrained(path, max_shard_size=SHARD, save_original_format=layout == "hub")
    return path


def read_all(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    out = {}
    for file in files:
        with safe_open(file, "pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    return out


def assert_same_tensors(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert torch.equal(got[key], want[key]), key


def assert_sharded(path: Path, limit: int | None) -> None:
    """Several shards with an index that names every tensor; each shard within `limit` unless it
    holds a single larger tensor (None: transformers' save_pretrained, which splits by in-memory
    tensors, before a fused tensor becomes many per-expert ones)."""
    files = sorted(path.glob("*.safetensors"))
    assert len(files) > 1 and (path / INDEX).is_file()
    weight_map = json.loads((path / INDEX).read_text())["weight_map"]
    assert sorted(set(weight_map.values())) == [f.name for f in files]
    assert sorted(weight_map) == sorted(read_all(path))
    for file in files:
        with safe_open(file, "pt") as f:
            sizes = [f.get_tensor(k).nbytes for k in f.keys()]
        assert limit is None or sum(sizes) <= limit or len(sizes) == 1


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(0)
    return torch.randint(3, 128, (2, 11))


@pytest.mark.parametrize(
    ("family", "layout", "uniform"), CASES, ids=[f"{f}-{la}-{'uni' if u else 'non'}" for f, la, u in CASES]
)
def test_streaming_equals_in_memory_surgery(family, layout, uniform, inputs, tmp_path):
    model = tiny_model(family)
    plan = make_plan(model, uniform)
    src = save_source(model, tmp_path / "src", layout)
    pruned = copy.deepcopy(model)
    remove_experts_(pruned, plan)
    memory = save_pruned(pruned, tmp_path / "memory", manifest={}, max_shard_size=SHARD)

    streamed = api.stream_prune(src, plan, tmp_path / "stream", max_shard_size=SHARD)

    if layout == "hub":  # the same files as save_pruned's
        want = read_all(memory)
    else:  # the in-memory names, as the source has them (tied weights are not saved)
        saved = read_all(src)
        want = {k: v for k, v in pruned.state_dict().items() if k in saved}
    got = read_all(streamed)
    assert_same_tensors(got, want)
    assert json.loads((streamed / "config.json").read_text()) == json.loads(
        (memory / "config.json").read_text()
    )
    assert (streamed / "modeling_moeprune.py").exists() == (not uniform)
    assert_sharded(streamed, 20_000)
    record = json.loads((streamed / "moeprune.json").read_text())
    assert record["removed"] == {str(k): sorted(v) for k, v in plan.items()}
    assert record["family"] == family

    with mask_experts(model, plan):
        masked = logits(model, inputs)
    reloaded = load(streamed)
    assert (logits(reloaded, inputs) - masked).abs().max() <= TOL
    state = pruned.state_dict()
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("layout", ["hub", "fused"])
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_streamed_merge_equals_in_memory_merge(family, layout, tmp_path, inputs):
    if layout not in layouts(family):
        pytest.skip(f"{family} has one on-disk layout")
    model = tiny_model(family)
    gen = torch.Generator().manual_seed(0)
    merges = {}
    for layer in moe_layers(model):
        removed = set(make_plan(model, uniform=True)[layer.index])
        anchors = tuple(e for e in range(layer.num_experts) if e not in removed)
        weights = LayerMerge.one_hot(anchors, layer.num_experts).weights.float()
        weights += 0.1 * torch.rand(weights.shape, generator=gen)
        merges[layer.index] = LayerMerge(anchors, weights)
    src = save_source(model, tmp_path / "src", layout)
    merged = copy.deepcopy(model)
    merge_experts_(merged, merges)

    streamed = api.stream_prune(src, None, tmp_path / "stream", merges=merges, max_shard_size=SHARD)

    reloaded = load(streamed)
    state = merged.state_dict()
    for key, value in reloaded.state_dict().items():
        assert torch.allclose(value, state[key], atol=1e-6), key
    assert (logits(reloaded, inputs) - logits(merged, inputs)).abs().max() <= TOL


# --- FP8 block-scaled checkpoints ------------------------------------------------------------------

BLOCK = 128


def fp8_blockwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 weight_scale_inv of shape (ceil(out/128), ceil(in/128)))."""
    out_f, in_f = weight.shape
    rows, cols = -(-out_f // BLOCK), -(-in_f // BLOCK)
    padded = torch.zeros(rows * BLOCK, cols * BLOCK)
    padded[:out_f, :in_f] = weight
    blocks = padded.view(rows, BLOCK, cols, BLOCK)
    scale = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12) / torch.finfo(torch.float8_e4m3fn).max
    q = (blocks / scale[:, None, :, None]).view(rows * BLOCK, cols * BLOCK)[:out_f, :in_f]
    return q.to(torch.float8_e4m3fn), scale


def fp8_checkpoint(path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny DeepSeek-V3 with every linear weight of the decoder layers in block-scaled FP8 (as
    DeepSeek-V3/R1 ship), per-expert layout, 3 shards. moe_intermediate_size 160 gives expert
    scales of shape (2, 1) and (1, 2)."""
    from transformers import AutoModelForCausalLM

    from tiny_models import tiny_config

    config = tiny_config("deepseek_v3")
    config.moe_intermediate_size = 160
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    src = path / "src"
    model.save_pretrained(src)
    state = read_all(src)
    fp8 = {}
    for key, value in state.items():
        if ".layers." in key and key.endswith("proj.weight") and value.dim() == 2:
            fp8[key], fp8[key + "_scale_inv"] = fp8_blockwise(value.float())
        else:
            fp8[key] = value
    (src / "model.safetensors").unlink()
    keys = sorted(fp8)
    weight_map = {}
    for i, part in enumerate(
        (keys[: len(keys) // 3], keys[len(keys) // 3 : 2 * len(keys) // 3], keys[2 * len(keys) // 3 :])
    ):
        name = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({k: fp8[k] for k in part}, str(src / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (src / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [BLOCK, BLOCK],
    }
    (src / "config.json").write_text(json.dumps(cfg))
    return src, fp8


def test_fp8_block_scaled_checkpoint_prunes_weights_with_their_scales(tmp_path):
    src, tensors = fp8_checkpoint(tmp_path)
    plan = {1: [0, 5], 2: [2, 7]}  # 2 groups of 4: one expert out of each group
    out = api.stream_prune(src, plan, tmp_path / "out", max_shard_size="60KB")
    got = read_all(out)
    kept = {1: [1, 2, 3, 4, 6, 7], 2: [0, 1, 3, 4, 5, 6]}
    want = {}
    for key, value in tensors.items():
        parts = key.split(".")
        if ".mlp.experts." in key:
            layer, expert = int(parts[2]), int(parts[5])
            if expert not in kept[layer]:
                continue
            parts[5] = str(kept[layer].index(expert))
        elif key.endswith(("mlp.gate.weight", "mlp.gate.e_score_correction_bias")):
            value = value[kept[int(parts[2])]]
        want[".".join(parts)] = value
    assert_same_tensors(got, want)
    scale = got["model.layers.1.mlp.experts.5.gate_proj.weight_scale_inv"]
    assert got["model.layers.1.mlp.experts.5.gate_proj.weight"].dtype == torch.float8_e4m3fn
    assert scale.shape == (2, 1) and got["model.layers.1.mlp.experts.5.down_proj.weight_scale_inv"].shape == (
        1,
        2,
    )
    assert torch.equal(scale, tensors["model.layers.1.mlp.experts.7.gate_proj.weight_scale_inv"])
    config = json.loads((out / "config.json").read_text())
    assert config["n_routed_experts"] == 6 and config["quantization_config"]["quant_method"] == "fp8"
    assert (out / INDEX).is_file()


def test_merging_an_fp8_checkpoint_is_refused(tmp_path):
    src, _ = fp8_checkpoint(tmp_path)
    merges = {1: LayerMerge.one_hot((1, 2, 3, 4, 6, 7), 8), 2: LayerMerge.one_hot((0, 1, 3, 4, 5, 6), 8)}
    with pytest.raises(MoepruneError, match="cannot merge experts of an FP8 checkpoint") as e:
        api.stream_prune(src, None, tmp_path / "out", merges=merges)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


# --- shards, permissions, CLI -----------------------------------------------------------------------


def test_in_memory_save_is_sharded_with_an_index_above_the_shard_size(tmp_path):
    model = tiny_model("qwen3_moe")
    remove_experts_(model, {0: [1], 1: [2], 2: [3]})
    one = save_pruned(model, tmp_path / "one", manifest={})
    assert (one / "model.safetensors").is_file() and not (one / INDEX).exists()
    many = save_pruned(model, tmp_path / "many", manifest={}, max_shard_size=SHARD)
    assert_sharded(many, None)
    with pytest.raises(MoepruneError, match="max shard size"):
        save_pruned(model, tmp_path / "bad", manifest={}, max_shard_size="lots")


def test_streamed_shards_default_to_the_input_shard_size(tmp_path):
    model = tiny_model("qwen3_moe")
    src = save_source(model, tmp_path / "src", "hub")
    largest = max(f.stat().st_size for f in src.glob("*.safetensors"))
    out = api.stream_prune(src, {0: [1]}, tmp_path / "out")
    files = sorted(out.glob("*.safetensors"))
    assert len(files) > 1 and all(f.stat().st_size <= largest + 4096 for f in files)


def test_output_folders_have_normal_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        model = tiny_model("qwen3_moe")
        src = save_source(model, tmp_path / "src", "hub")
        streamed = api.stream_prune(src, {0: [1]}, tmp_path / "stream")
        remove_experts_(model, {0: [1]})
        saved = save_pruned(model, tmp_path / "memory", manifest={})
    finally:
        os.umask(umask)
    for out in (streamed, saved):
        assert out.stat().st_mode & 0o777 == 0o755


def test_other_files_are_carried_over_and_old_weights_are_not(tmp_path):
    from tiny_tokenizer import tiny_tokenizer

    model = tiny_model("qwen3_moe")
    src = save_source(model, tmp_path / "src", "hub")
    tiny_tokenizer().save_pretrained(src)
    (src / "LICENSE").write_text("licence text\n")
    (src / "original").mkdir()
    (src / "original" / "consolidated.00.pth").write_bytes(b"unpruned")
    (src / "original" / "params.json").write_text("{}")
    out = api.stream_prune(src, {0: [1]}, tmp_path / "out")
    names = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert {"LICENSE", "tokenizer.json", "generation_config.json", "original/params.json"} <= names
    assert "original/consolidated.00.pth" not in names
    assert "moeprune" in (out / "README.md").read_text()


@pytest.mark.parametrize("mode", ["auto", "stream", "memory"])
def test_cli_prune_modes(mode, run_cli, tmp_path, monkeypatch):
    model = tiny_model("qwen3_moe")
    src = save_source(model, tmp_path / "src", "hub")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(ExpertPlan.from_removed({0: [1, 2], 2: [0]}).to_dict()))
    calls = []
    from moeprune.surgery.streaming import StreamingPrune

    monkeypatch.setattr(StreamingPrune, "write", _spy(StreamingPrune.write, calls))
    code, _, err = run_cli(
        "prune",
        str(src),
        "--plan",
        str(plan),
        "--out",
        str(tmp_path / "out"),
        "--mode",
        mode,
        "--max-shard-size",
        SHARD,
    )
    assert code == 0, err
    assert bool(calls) == (mode != "memory")
    assert_sharded(tmp_path / "out", 20_000 if calls else None)
    reference = copy.deepcopy(model)
    remove_experts_(reference, {0: [1, 2], 2: [0]})
    state = reference.state_dict()
    for key, value in load(tmp_path / "out").state_dict().items():
        assert torch.equal(value, state[key]), key


def test_cli_stream_mode_needs_a_plan_known_without_the_model(run_cli, tmp_path):
    src = save_source(tiny_model("qwen3_moe"), tmp_path / "src", "hub")
    code, _, err = run_cli(
        "prune",
        str(src),
        "--criterion",
        "frequency",
        "--sparsity",
        "0.25",
        "--data",
        "x.jsonl",
        "--out",
        str(tmp_path / "out"),
        "--mode",
        "stream",
    )
    assert code == 2 and "mode stream needs a plan known without running the model" in err


def _spy(fn, calls):
    def wrapper(*args, **kwargs):
        calls.append(args)
        return fn(*args, **kwargs)

    return wrapper


# --- larger than memory --------------------------------------------------------------------------

CAPPED = textwrap.dedent(
    """
    import resource, sys
    import moeprune  # noqa: F401  (the baseline: a process that only imports moeprune)
    from moeprune import api

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    src, out, cap, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    limit = status("VmSize") + cap
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    plan = {layer: list(range(0, 64, 2)) for layer in range(8)}
    if mode == "stream":
        api.stream_prune(src, plan, out)
    else:
        model = api.load(src)
        api.save(model, out, source=src, kept=api.prune(model, plan), num_experts={i: 64 for i in range(8)})
    print("peak address space over the cap base:", status("VmPeak") - (limit - cap))
    """
)


@pytest.mark.slow  # ~20 s: writes 600 MB, two fresh processes
def test_prunes_a_checkpoint_larger_than_the_memory_cap(tmp_path):
    """A ~600 MB checkpoint, a process allowed 400 MB of address space beyond what importing moeprune
    takes: streaming prunes it; loading it in memory fails under the same cap."""
    from synthetic import over_the_cap_checkpoint

    src, cap, env = over_the_cap_checkpoint(tmp_path / "src")
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))

    def run(mode: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", CAPPED, str(src), str(tmp_path / mode), str(cap), mode],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    streamed = run("stream")
    assert streamed.returncode == 0, streamed.stderr[-2000:]
    out = tmp_path / "stream"
    assert AutoConfig.from_pretrained(out).num_experts == 32
    written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert 0.45 * size < written < 0.55 * size
    with safe_open(
        out
        / json.loads((out / INDEX).read_text())["weight_map"]["model.layers.7.mlp.experts.31.up_proj.weight"],
        "pt",
    ) as f:
        got = f.get_tensor("model.layers.7.mlp.experts.31.up_proj.weight")
    src_map = json.loads((src / INDEX).read_text())["weight_map"]
    with safe_open(src / src_map["model.layers.7.mlp.experts.63.up_proj.weight"], "pt") as f:
        assert torch.equal(got, f.get_tensor("model.layers.7.mlp.experts.63.up_proj.weight"))

    in_memory = run("memory")
    assert in_memory.returncode != 0, "the cap must be too small for the in-memory path"


def test_a_streamed_non_uniform_checkpoint_streams_again(tmp_path, inputs):
    """Input already non-uniform (the resizable class, remote code): pruned again == in memory."""
    model = tiny_model("qwen3_moe")
    first = make_plan(model, uniform=False)
    once = api.stream_prune(
        save_source(model, tmp_path / "src", "hub"), first, tmp_path / "once", max_shard_size=SHARD
    )
    again = {i: [0] for i in first}
    twice = api.stream_prune(once, again, tmp_path / "twice", max_shard_size=SHARD)
    reference = load(once)
    remove_experts_(reference, again)
    reloaded = load(twice)
    state = reference.state_dict()
    assert sorted(reloaded.state_dict()) == sorted(state)
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert (logits(reloaded, inputs) - logits(reference, inputs)).abs().max() <= TOL
    assert AutoConfig.from_pretrained(twice).num_experts_per_layer == [5, 3, 5]
    assert "Qwen3MoeForCausalLM" in (twice / "modeling_moeprune.py").read_text()
