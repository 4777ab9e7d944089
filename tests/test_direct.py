"""Decoder layers read straight into place (`execute.direct`): a recipe learned from transformers'
conversion gives the same tensors, is trusted only when two layers agree, and is refused where the
conversion is not a tiling of whole checkpoint tensors; the head's float32 work in pieces gives the
same fitness."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeprune.arch import get_path
from moeprune.execute import LayerwiseModel
from moeprune.execute.direct import Recipes, Target, learn, load, signature, template
from moeprune.fitness import CandidateEvaluator, SearchSet, run_teacher
from moeprune.plan import ExpertPlan
from moeprune.surgery.streaming import Stored
from test_core_matrix import make_plan
from tiny_models import tiny_model

FAMILIES = ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "olmoe"]


@pytest.mark.parametrize("layout", ["hub", "fused"])
@pytest.mark.parametrize("family", FAMILIES)
def test_recipe_loads_what_transformers_converts(family, layout, saved):
    """Every layer loaded by a trusted recipe equals transformers' conversion of it (values, dtype,
    shape); per-expert checkpoints of the stacked-experts families get one."""
    lm = LayerwiseModel(saved(family, layout))
    n = lm.replay.num_layers
    reference = {}
    for j in range(n):  # first stream: transformers' loader, recipes learned from layers 0 and 1
        lm._load(j)
        reference[j] = {k: get_path(lm.model, k).clone() for k in lm.units[j]}
        lm._free(j)
    if family in ("qwen3_moe", "olmoe") and layout == "hub":
        assert lm._recipes._trusted, "two layers with the same keys give a trusted recipe"
    before = lm.bytes_read
    for j in range(n):
        lm._load(j)
        for k, want in reference[j].items():
            got = get_path(lm.model, k)
            assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), k
        lm._free(j)
    assert lm.bytes_read - before == sum(lm.unit_bytes(j) for j in range(n))
    j = n - 1  # through a host buffer per checkpoint tensor, as to a GPU: the same tensors
    recipe = lm._recipes.get(lm._signatures[j])
    if recipe is not None:
        for name, got in load(recipe, j, lm.stored, staged=True):
            assert torch.equal(got, reference[j][name]), name


def _stored(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, Stored]:
    """Tensors written back to back into one raw file, as `Stored` entries."""
    path, out, at = tmp_path / "raw.bin", {}, 0
    with open(path, "wb") as f:
        for key, t in tensors.items():
            data = t.contiguous().view(torch.uint8).numpy().tobytes()
            f.write(data)
            out[key] = Stored(path, "F32", tuple(t.shape), at, len(data))
            at += len(data)
    return out


def test_learn_tiles_whole_tensors_and_refuses_other_layouts(tmp_path):
    gen = torch.Generator().manual_seed(0)
    gate = [torch.randn(3, 4, generator=gen) for _ in range(2)]
    up = [torch.randn(3, 4, generator=gen) for _ in range(2)]
    keys = {f"m.layers.5.e.{e}.{w}": t for e in range(2) for w, t in (("gate", gate[e]), ("up", up[e]))}
    stored = _stored(tmp_path, keys)
    fused = torch.cat([torch.stack(gate), torch.stack(up)], dim=1)  # (E, 2I, H), as transformers fuses
    sources = {"layers.5.gate_up": sorted(keys)}
    recipe = learn({"layers.5.gate_up": fused}, sources, stored, 5)
    assert recipe == (
        Target(
            "layers.{}.gate_up",
            (2, 6, 4),
            torch.float32,
            (
                ("m.layers.{}.e.0.gate", 0),
                ("m.layers.{}.e.0.up", 12),
                ("m.layers.{}.e.1.gate", 24),
                ("m.layers.{}.e.1.up", 36),
            ),
        ),
    )
    assert learn({"layers.5.gate_up": fused.transpose(1, 2).contiguous()}, sources, stored, 5) is None
    assert learn({"layers.5.gate_up": fused * 2}, sources, stored, 5) is None
    assert (
        learn({"layers.5.gate_up": fused.to(torch.bfloat16)}, sources, stored, 5)[0].dtype == torch.bfloat16
    )


def test_recipes_are_trusted_when_two_layers_agree():
    sig = signature(["layers.1.w"], ["m.layers.1.w"], 1)
    assert sig == signature(["layers.2.w"], ["m.layers.2.w"], 2)
    assert template("m.layers.12.e.12.w", 12) == "m.layers.{}.e.12.w"
    one = (Target("layers.{}.w", (2,), torch.float32, (("m.layers.{}.w", 0),)),)
    other = (Target("layers.{}.w", (2,), torch.bfloat16, (("m.layers.{}.w", 0),)),)
    recipes = Recipes()
    recipes.add(sig, 1, one)
    assert recipes.get(sig) is None and not recipes.wants(sig, 1) and recipes.wants(sig, 2)
    recipes.add(sig, 2, one)
    assert recipes.get(sig) == one and not recipes.wants(sig, 3)
    doubtful = Recipes()
    doubtful.add(sig, 1, one)
    doubtful.add(sig, 2, other)
    assert doubtful.get(sig) is None and not doubtful.wants(sig, 3)


@pytest.mark.parametrize("cache", ["hidden", "sparse"])
def test_head_in_pieces_gives_the_same_fitness(cache):
    """`head_piece`: the float32 work after the head's matmul a few rows at a time, the same values."""
    model = tiny_model("qwen3_moe")
    ids = torch.randint(3, 128, (6, 12), generator=torch.Generator().manual_seed(2))
    teacher = run_teacher(model, SearchSet.from_tensors(ids, batch_size=4), cache=cache, top_k=8)
    plans = [ExpertPlan.from_removed(make_plan(model, uniform=u, seed=1)) for u in (True, False)]
    whole = CandidateEvaluator(model, teacher, head_rows=16)
    pieces = CandidateEvaluator(model, teacher, head_rows=16)
    pieces.head_piece = 3
    for plan in plans:
        a, b = whole.evaluate(plan), pieces.evaluate(plan)
        assert a.value == b.value and a.as_dict() == b.as_dict()
