"""The observer: unchanged model output, hooks always removed, padding excluded, save/load round trip."""

from __future__ import annotations

import json

import pytest
import torch

from moeprune import api
from moeprune.data import TokenSet
from moeprune.errors import MoepruneError
from moeprune.observe import ExpertStats, LayerStats, observe, observing
from moeprune.observe.stats import TENSORS
from tiny_models import FAMILIES, tiny_model


def tokens(samples: int = 3, length: int = 8, pad_last: int = 3) -> TokenSet:
    ids = torch.randint(3, 128, (samples, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if pad_last:
        mask[-1, -pad_last:] = 0
    return TokenSet(ids, mask, mask.bool(), [["en", "code"][i % 2] for i in range(samples)])


def hooks_left(model) -> int:
    n = 0
    for module in model.modules():
        n += len(module._forward_hooks) + len(module._forward_pre_hooks) + ("forward" in module.__dict__)
    return n


@pytest.mark.parametrize("family", FAMILIES)
def test_observation_leaves_logits_unchanged_and_removes_hooks(family):
    model = tiny_model(family)
    data = tokens()
    before = hooks_left(model)
    with torch.no_grad():
        plain = model(input_ids=data.input_ids, attention_mask=data.attention_mask).logits
        with observing(model, dense=True) as obs:
            obs.set_batch(
                data.attention_mask, torch.ones_like(data.attention_mask), torch.zeros_like(data.input_ids)
            )
            seen = model(input_ids=data.input_ids, attention_mask=data.attention_mask).logits
    assert hooks_left(model) == before
    torch.testing.assert_close(seen, plain, rtol=1e-5, atol=1e-5)
    stats = obs.result()
    for ls in stats.values():
        assert ls.tokens == data.num_tokens
        assert ls.count.sum() == ls.tokens * ls.top_k
        assert ls.dense_tokens == data.num_tokens


def test_hooks_removed_on_error():
    model = tiny_model("qwen3_moe")
    before = hooks_left(model)
    with pytest.raises(RuntimeError, match="set_batch"):
        with observing(model):
            model(input_ids=torch.tensor([[3, 4, 5]]))  # no set_batch: the hook raises mid-forward
    assert hooks_left(model) == before
    with pytest.raises(ValueError):
        with observing(model):
            raise ValueError("boom")
    assert hooks_left(model) == before


@pytest.mark.parametrize("family", ["qwen3_moe", "llama4_text"])
def test_padding_is_excluded(family):
    """A padded sample gives exactly the statistics of the same tokens without padding."""
    model = tiny_model(family)
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    alone = TokenSet(ids, torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool), ["en"])
    padded_ids = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 6, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)], dim=1)
    padded = TokenSet(padded_ids, mask, mask.bool(), ["en"])
    a = observe(model, alone, progress=False)
    b = observe(model, padded, progress=False)
    for i, la in a.layers.items():
        lb = b.layers[i]
        assert la.tokens == lb.tokens == 6
        for name in ("count", "gate_sum", "norm_sum", "gnorm_sum", "prob_sum", "plogp_sum", "gram"):
            torch.testing.assert_close(
                getattr(la, name), getattr(lb, name), rtol=1e-5, atol=1e-6
            )  # float32 model


def test_stats_save_load_round_trip(tmp_path):
    model = tiny_model("deepseek_v3")
    stats = api.observe(model, tokens(), dense_tokens=10, progress=False, out_dir=tmp_path / "stats")
    loaded = ExpertStats.load(tmp_path / "stats")
    assert loaded.meta["data_fingerprint"] == tokens().fingerprint
    assert loaded.meta["num_tokens"] == tokens().num_tokens
    assert loaded.meta["domain_names"] == ["code", "en"]
    assert "mop" in loaded.meta["criteria_supported"] and "reap" in loaded.meta["criteria_supported"]
    assert loaded.layers.keys() == stats.layers.keys()
    for i, ls in stats.layers.items():
        assert loaded.layers[i].scalars() == ls.scalars()
        for name in TENSORS:
            assert torch.equal(getattr(loaded.layers[i], name), getattr(ls, name)), name
    meta = json.loads((tmp_path / "stats" / "stats.json").read_text())
    assert meta["model_type"] == "deepseek_v3" and meta["layers"][0]["num_groups"] == 2


def test_dense_subsample_only_when_a_criterion_needs_it():
    model = tiny_model("qwen3_moe")
    cheap = api.observe(model, tokens(), criteria=["reap", "naee"], progress=False)
    assert not cheap.has_dense and "mop" not in cheap.meta["criteria_supported"]
    dense = api.observe(model, tokens(), criteria=["mop"], dense_tokens=5, progress=False)
    assert dense.has_dense and all(ls.dense_tokens == 5 for ls in dense.layers.values())
    assert all(ls.dense_hidden.shape == (5, model.config.hidden_size) for ls in dense.layers.values())


def test_unreadable_stats_directory(tmp_path):
    with pytest.raises(MoepruneError, match="no expert statistics"):
        ExpertStats.load(tmp_path)
    (tmp_path / "stats.json").write_text("{not json")
    (tmp_path / "stats.safetensors").write_bytes(b"junk")
    with pytest.raises(MoepruneError, match="unreadable"):
        ExpertStats.load(tmp_path)


def test_layer_stats_defaults_are_float64_zeros():
    ls = LayerStats(index=0, num_experts=4, top_k=2)
    assert ls.count.dtype == torch.float64 and ls.gram.shape == (4, 4) and ls.dense_tokens == 0
