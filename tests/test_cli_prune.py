"""`moeprune prune --plan`: a real checkpoint for good input, one line + exit 2 for bad input."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from cli_checks import assert_clean_failure
from moeprune.errors import MoepruneError
from tiny_models import tiny_model


def write_plan(path, removed) -> str:
    path.write_text(json.dumps({"removed": removed}))
    return str(path)


def test_prune_with_plan_writes_loadable_checkpoint(run_cli, tiny_dir, tmp_path):
    src = tiny_dir("qwen3_moe")
    out = tmp_path / "out"
    code, _, err = run_cli(
        "prune",
        src,
        "--plan",
        write_plan(tmp_path / "p.json", {"0": [1, 2], "1": [0, 7], "2": [3, 4]}),
        "--out",
        out,
    )
    assert code == 0, err
    manifest = json.loads((out / "moeprune.json").read_text())
    assert manifest["removed"]["0"] == [1, 2] and manifest["kept"]["1"] == [1, 2, 3, 4, 5, 6]
    assert AutoConfig.from_pretrained(out).num_experts == 6
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 6


def test_existing_output_needs_overwrite(run_cli, tiny_dir, tmp_path):
    src = tiny_dir("qwen3_moe")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    plan = write_plan(tmp_path / "p.json", {"0": [1]})
    code, _, err = run_cli("prune", src, "--plan", plan, "--out", out)
    assert code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert (out / "keep.txt").read_text() == "mine"
    code, _, err = run_cli("prune", src, "--plan", plan, "--out", out, "--overwrite")
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "moeprune.json").exists()


@pytest.mark.parametrize(
    "removed, needle",
    [
        ({"5": [1]}, "layer 5 is not an MoE layer"),
        ({"0": [8]}, "out of range"),
        ({"0": [-1]}, "out of range"),
        ({"0": [1, 1]}, "listed twice"),
        ({"0": list(range(8))}, "removes every expert"),
        ({"0": list(range(7))}, "top_k=2"),
    ],
    ids=["not-moe-layer", "id-too-large", "id-negative", "repeated", "every-expert", "below-top-k"],
)
def test_bad_plans(run_cli, tiny_dir, tmp_path, removed, needle):
    out = tmp_path / "out"
    result = run_cli(
        "prune", tiny_dir("qwen3_moe"), "--plan", write_plan(tmp_path / "p.json", removed), "--out", out
    )
    assert_clean_failure(result, out, needle)


def test_dense_layer_of_moe_model_is_rejected(run_cli, tiny_dir, tmp_path):
    out = tmp_path / "out"  # deepseek_v3 tiny: layer 0 is dense (first_k_dense_replace=1)
    result = run_cli(
        "prune",
        tiny_dir("deepseek_v3"),
        "--plan",
        write_plan(tmp_path / "p.json", {"0": [1, 5]}),
        "--out",
        out,
    )
    assert_clean_failure(result, out, "layer 0 is not an MoE layer")


def test_group_limited_router_needs_equal_removal_per_group(run_cli, tiny_dir, tmp_path):
    out = tmp_path / "out"  # 2 groups of 4 experts
    result = run_cli(
        "prune",
        tiny_dir("deepseek_v3"),
        "--plan",
        write_plan(tmp_path / "p.json", {"1": [0, 1]}),
        "--out",
        out,
    )
    assert_clean_failure(result, out, "same number")


@pytest.mark.parametrize(
    "content, needle",
    [
        ("{not json", "not valid JSON"),
        ('{"removed": {"0": "three"}}', "malformed"),
        ('{"removed": {"zero": [1]}}', "malformed"),
        ('{"drop": {"0": [1]}}', "malformed"),
        ("[1, 2]", "malformed"),
    ],
    ids=["not-json", "ids-not-list", "layer-not-int", "wrong-key", "not-object"],
)
def test_malformed_plan_files(run_cli, tiny_dir, tmp_path, content, needle):
    out = tmp_path / "out"
    plan = tmp_path / "p.json"
    plan.write_text(content)
    assert_clean_failure(run_cli("prune", tiny_dir("qwen3_moe"), "--plan", plan, "--out", out), out, needle)


def test_missing_plan_file(run_cli, tiny_dir, tmp_path):
    out = tmp_path / "out"
    result = run_cli("prune", tiny_dir("qwen3_moe"), "--plan", tmp_path / "nope.json", "--out", out)
    assert_clean_failure(result, out, "does not exist")


def test_dense_model_is_rejected(run_cli, tmp_path):
    src = tmp_path / "llama"
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(config).save_pretrained(src)
    out = tmp_path / "out"
    result = run_cli("prune", src, "--plan", write_plan(tmp_path / "p.json", {"0": [1]}), "--out", out)
    assert_clean_failure(result, out, "dense model")


def test_unknown_moe_family_is_rejected(run_cli, tmp_path):
    src = tmp_path / "dbrx"  # an MoE family without a fused-experts layout moeprune supports
    AutoConfig.for_model("dbrx").save_pretrained(src)
    out = tmp_path / "out"
    result = run_cli("prune", src, "--plan", write_plan(tmp_path / "p.json", {"0": [1]}), "--out", out)
    assert_clean_failure(result, out, "not supported")


def test_missing_model_is_rejected(run_cli, tmp_path):
    out = tmp_path / "out"
    result = run_cli(
        "prune", tmp_path / "no-such-model", "--plan", write_plan(tmp_path / "p.json", {}), "--out", out
    )
    assert_clean_failure(result, out, "no-such-model: no such directory")


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    from moeprune.surgery import remove_experts_, save_pruned

    model = tiny_model("olmoe")
    remove_experts_(model, {0: [1]})

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", broken)
    with pytest.raises(MoepruneError, match="writing .* failed \\(disk full\\); nothing was written"):
        save_pruned(model, tmp_path / "out", manifest={})
    assert list(tmp_path.iterdir()) == []
    assert torch.is_tensor(model.model.layers[0].mlp.gate.weight)
