"""`arch.experts.sorted_forward`: transformers' fused experts computed slot-sorted on a CPU."""

from __future__ import annotations

import pytest
import torch

from moeprune.arch import moe_layers
from moeprune.arch.experts import sorted_forward
from tiny_models import tiny_model

# gated / not gated (nemotron_h), plain / transposed (aria_text) / transposed with biases (gpt_oss)
FAMILIES = ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "aria_text", "nemotron_h"]


def routing(tokens: int, experts: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random distinct top-k expert ids (T, k) and positive weights (T, k); expert 0 gets no token."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts - 1, generator=g)[:k] + 1 for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=g) + 0.1
    return ids, weights / weights.sum(-1, keepdim=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_sorted_forward_equals_the_modules_own(family):
    model = tiny_model(family)
    layer = moe_layers(model)[-1]
    experts = layer.experts
    fast = sorted_forward(experts)
    assert fast is not None, f"{family}: expected transformers' fused experts running grouped_mm"
    hidden = torch.randn(
        13, model.config.get_text_config().hidden_size, generator=torch.Generator().manual_seed(1)
    )
    ids, weights = routing(13, layer.num_experts, min(layer.top_k, layer.num_experts - 1), seed=2)
    with torch.inference_mode():
        want = experts(hidden, ids, weights)
        got = fast(hidden, ids, weights)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert got.abs().max() > 0


def test_sorted_forward_keeps_out_of_other_implementations():
    model = tiny_model("qwen3_moe")
    experts = moe_layers(model)[0].experts
    model.set_experts_implementation("eager")
    assert sorted_forward(experts) is None
    assert sorted_forward(moe_layers(tiny_model("llama4_text"))[0].experts) is None  # its own experts class
    assert sorted_forward(None) is None


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "nemotron_h"])
def test_bfloat16_rows_padded_to_a_bucket_give_the_same_outputs(family):
    """In bfloat16 each expert's rows are zero-padded to a multiple of ROW_BUCKET (few oneDNN shapes);
    the padding's outputs (e.g. act(bias) with biases) are dropped: the result is the module's own."""
    model = tiny_model(family).to(torch.bfloat16)
    layer = moe_layers(model)[-1]
    fast = sorted_forward(layer.experts)
    hidden = torch.randn(
        37, model.config.get_text_config().hidden_size, generator=torch.Generator().manual_seed(3)
    )
    ids, weights = routing(37, layer.num_experts, min(layer.top_k, layer.num_experts - 1), seed=4)
    hidden, weights = hidden.to(torch.bfloat16), weights.to(torch.bfloat16)
    with torch.inference_mode():
        want = layer.experts(hidden, ids, weights)
        got = fast(hidden, ids, weights)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
