"""Active-expert reduction: the model in memory == a stock reload of its saved config, every family."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeprune.arch import family_of
from moeprune.errors import MoepruneError
from moeprune.merge.active import active_experts, reduced_active_experts, set_active_experts_
from tiny_models import FAMILIES, tiny_model


def logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_reduced_top_k_equals_stock_reload(family, tmp_path):
    model = tiny_model(family)
    k = active_experts(model)
    if family_of(model.config).fixed_top_k:
        with pytest.raises(MoepruneError, match="cannot route to fewer experts"):
            set_active_experts_(model, k - 1)
        return
    if k < 2:
        pytest.skip("routes to one expert already")
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    full = logits(model, ids)
    with reduced_active_experts(model, k - 1):
        reduced = logits(model, ids)
    assert torch.equal(logits(model, ids), full), "the original top-k must be back"
    assert (reduced - full).abs().max() > 1e-4, "fewer active experts should change the output"
    set_active_experts_(model, k - 1)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert active_experts(reloaded) == k - 1
    torch.testing.assert_close(logits(reloaded, ids), reduced, rtol=0, atol=1e-5)


def test_bad_active_expert_count():
    model = tiny_model("qwen3_moe")
    with pytest.raises(MoepruneError, match="between 1 and"):
        set_active_experts_(model, 0)
    with pytest.raises(MoepruneError, match="between 1 and"):
        set_active_experts_(model, 99)
