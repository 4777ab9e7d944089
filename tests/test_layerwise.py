"""Layer-by-layer execution (`execute.LayerwiseModel`): one decoder layer's weights in memory at a time,
read from the checkpoint, gives what the model in memory gives: observe statistics, the teacher
cache, ESAP of plans (one at a time and in lockstep), the search's plan and history, perplexity and
multiple choice; and it works on a checkpoint larger than the memory the process may use."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

import moeprune
from moeprune.allocate import EvoConfig
from moeprune.criteria import removal_order
from moeprune.data import TokenSet
from moeprune.evaluate import multiple_choice_accuracy, perplexity_by_domain
from moeprune.evaluate.suite import read_jsonl
from moeprune.execute import LayerwiseEvaluator, LayerwiseModel, LocalExecutor, layerwise_evaluator
from moeprune.execute.activations import Activations
from moeprune.fitness import CandidateEvaluator, SearchSet, run_teacher
from moeprune.observe import observe
from moeprune.pipelines.eep import select_experts
from moeprune.pipelines.evoesap import search_allocation
from moeprune.plan import ExpertPlan
from moeprune.recipe import Recipe
from moeprune.surgery import load, mask_experts
from moeprune.testbed import load_testbed, token_split
from moeprune.testbed import testbed_dirs as bundled_testbed
from test_core_matrix import make_plan

FAMILIES = ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "olmoe"]
STATS = (
    "count",
    "gate_sum",
    "norm_sum",
    "gnorm_sum",
    "prob_sum",
    "plogp_sum",
    "gram",
    "dense_err",
    "dense_hidden",
)


def tokens(samples: int = 5, length: int = 9) -> TokenSet:
    ids = torch.randint(3, 128, (samples, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[-1, -3:] = 0  # padding never enters a statistic
    return TokenSet(ids, mask, mask.bool(), [["en", "code"][i % 2] for i in range(samples)])


def search_set(samples: int = 6, length: int = 12) -> SearchSet:
    ids = torch.randint(3, 128, (samples, length), generator=torch.Generator().manual_seed(2))
    return SearchSet.from_tensors(ids, batch_size=4)


def assert_same_stats(got, want, tol: float = 1e-6) -> None:
    assert sorted(got.layers) == sorted(want.layers)
    for index, layer in want.layers.items():
        other = got.layers[index]
        assert other.tokens == layer.tokens
        for name in STATS:
            a, b = getattr(layer, name), getattr(other, name)
            if a is None:
                assert b is None, name
                continue
            assert a.shape == b.shape, (index, name)
            assert a.numel() == 0 or (a.double() - b.double()).abs().max().item() <= tol, (index, name)
    assert got.meta == want.meta


CASES = [(f, "hub") for f in FAMILIES] + [("qwen3_moe", "fused")]


@pytest.mark.parametrize(("family", "layout"), CASES, ids=[f"{f}-{la}" for f, la in CASES])
def test_layerwise_observe_and_logits_equal_in_memory(family, layout, saved):
    path = saved(family, layout)
    model, data = load(path), tokens()
    want = observe(model, data, batch_size=2, dense_tokens=10, progress=False)
    lm = LayerwiseModel(path)
    got = observe(lm, data, batch_size=2, dense_tokens=10, progress=False)  # dispatches to lm.observe
    assert_same_stats(got, want)
    assert lm.bytes_read > 0
    assert all(p.is_meta for p in lm.model.parameters()), "every unit goes back to the meta device"
    ids, mask = data.input_ids, data.attention_mask
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
    (logits,) = lm.batch_logits([(ids, mask)])
    assert (logits - reference).abs().max().item() <= 1e-6


TEACHER_CASES = [(f, "hidden") for f in FAMILIES] + [
    ("qwen3_moe", "sparse"),
    ("mixtral", "dense"),
    ("olmoe", "nucleus"),
]


@pytest.mark.parametrize(("family", "cache"), TEACHER_CASES, ids=[f"{f}-{c}" for f, c in TEACHER_CASES])
def test_layerwise_teacher_and_esap_equal_in_memory(family, cache, saved):
    """The teacher cache (hidden, the default: the final normed states; sparse top-K; dense; nucleus), and ESAP
    of plans (alone and in lockstep, with shared prefixes) == the masked in-memory ESAP."""
    path = saved(family)
    model, search = load(path), search_set()
    want = run_teacher(model, search, cache=cache, top_k=8)
    lm = LayerwiseModel(path)
    got = lm.run_teacher(search, cache=cache, top_k=8)
    assert got.kind == want.kind == cache
    for a, b in zip(want.cache.slices, got.cache.slices, strict=True):
        if cache in ("sparse", "nucleus"):
            assert torch.equal(a.top_ids, b.top_ids)
            assert (a.top_probs - b.top_probs).abs().max().item() <= 1e-6
        else:
            x, y = (a.hidden, b.hidden) if cache == "hidden" else (a.probs, b.probs)
            assert x.shape == y.shape and (x.float() - y.float()).abs().max().item() <= 1e-6
    plans = [
        ExpertPlan.from_removed(make_plan(model, uniform=u, seed=s)) for u in (True, False) for s in (1, 2)
    ]
    first = min(plans[0].removed)
    plans.append(
        ExpertPlan.from_removed({**plans[1].removed, first: plans[0].removed[first]})
    )  # shares a prefix
    memory = CandidateEvaluator(model, want)
    layerwise = LayerwiseEvaluator(lm, got)
    alone = [layerwise.evaluate(p).value for p in plans[:2]]
    lockstep = [r.value for r in layerwise.evaluate_many(plans)]
    expected = [memory.evaluate(p).value for p in plans]
    assert lockstep == pytest.approx(expected, abs=1e-9)
    assert alone == pytest.approx(expected[:2], abs=1e-9)
    assert layerwise.shared_runs > 0, "plans with the same first masks share their first layers"


@pytest.mark.parametrize("prefetch", [False, True], ids=["one-layer", "prefetch"])
def test_one_pass_observes_and_runs_the_teacher(saved, prefetch):
    """Statistics and the teacher cache from one stream of the checkpoint: each unit read once (with
    `prefetch`, the next layer read in a background thread while one runs)."""
    path = saved("qwen3_moe")
    lm = LayerwiseModel(path, prefetch=prefetch)
    stats, teacher = lm.run_pass(calibration=tokens(), batch_size=2, search=search_set(), top_k=8)
    assert_same_stats(stats, observe(load(path), tokens(), batch_size=2, progress=False))
    reference = run_teacher(load(path), search_set(), top_k=8)
    assert torch.equal(teacher.cache.slices[0].top_ids, reference.cache.slices[0].top_ids)
    once = sum(lm.unit_bytes(u) for u in lm.units)
    assert lm.bytes_read == once
    for j in lm._layers("stops early"):  # a stream that stops early frees the layer read ahead too
        if j == 1:
            break
    assert all(p.is_meta for p in lm.model.parameters())


def test_activations_spill_to_files_past_their_budget(saved, tmp_path):
    path = saved("mixtral")
    want = observe(load(path), tokens(), batch_size=2, progress=False)
    lm = LayerwiseModel(path, activation_bytes=1, spill_dir=tmp_path)
    assert_same_stats(lm.observe(tokens(), batch_size=2), want)
    store = Activations(max_bytes=100, folder=tmp_path)
    keys = [store.put(torch.full((10,), float(i))) for i in range(5)]
    assert store.bytes <= 100 and store.spilled > 0
    assert [store.get(k)[0].item() for k in keys] == [0.0, 1.0, 2.0, 3.0, 4.0]
    store.close()
    assert not list(tmp_path.glob("moeprune-activations-*/*"))


# --- the testbed -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def testbed():
    model, tok, model_dir, data_dir = load_testbed()
    return model, tok, model_dir, data_dir, LayerwiseModel(model_dir, dtype="float32")


def test_testbed_observe_equals_in_memory(testbed):
    model, tok, _, data_dir, lm = testbed
    data = token_split(tok, data_dir / "calibration.jsonl", 4, 64)
    assert_same_stats(lm.observe(data), observe(model, data, progress=False))


def _history(outcome) -> list[dict]:
    return outcome.result.history


def _approx(generation: dict) -> dict:
    """A history row with its floats compared to 1e-7."""
    return approx_tree(generation)


def approx_tree(value):
    """`value` (JSON-like: dicts, lists, numbers, strings) with every float compared to 1e-7."""
    if isinstance(value, dict):
        return {k: approx_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [approx_tree(v) for v in value]
    return pytest.approx(value, abs=1e-7) if isinstance(value, float) else value


@pytest.mark.parametrize("racing", [False, True], ids=["exact", "raced"])
def test_layerwise_search_gives_the_in_memory_plan_and_history(testbed, racing):
    """EvoESAP on the testbed (same seed): each generation scored in lockstep, one stream per
    generation (raced: per slice); the same plan, history and fitness values as in memory."""
    model, tok, _, data_dir, lm = testbed
    stats = observe(model, token_split(tok, data_dir / "calibration.jsonl", 4, 64), progress=False)
    order = removal_order(stats, "frequency", 0)
    search = SearchSet.from_tokens(token_split(tok, data_dir / "search.jsonl", 4, 48), min_batches=4)
    options = dict(sparsity=0.5, config=EvoConfig(population=6, generations=3, seed=0), progress=False)
    options |= dict(racing=racing, racing_z=0.5)  # z 0.5: the race drops candidates
    memory = search_allocation(model, order, run_teacher(model, search, cache="hidden"), **options)
    teacher = lm.run_teacher(search, cache="hidden")
    executor = LocalExecutor(lm, teacher, layerwise_evaluator)  # what a run in mode layers uses
    layerwise = search_allocation(lm.model, order, teacher, executor=executor, **options)
    assert layerwise.best == memory.best and layerwise.plan == memory.plan
    # in memory the last MoE block runs on the scored rows only and the experts run slot-sorted
    # (`fitness.replay`, `arch.experts`): the same values up to float rounding, the same decisions
    assert _history(layerwise) == [_approx(g) for g in _history(memory)]
    assert layerwise.result.tokens == memory.result.tokens
    assert layerwise.best_fitness["value"] == pytest.approx(memory.best_fitness["value"], abs=1e-9)
    evaluators = list(executor.scorer.evaluators.values())
    assert all(isinstance(e, LayerwiseEvaluator) for e in evaluators)
    assert len(evaluators) == (4 if racing else 1)  # one per racing slice
    if racing:
        assert layerwise.racing["raced_out"] > 0
    else:
        assert evaluators[0].stats.evaluations == layerwise.result.evaluations


def test_layerwise_eep_selection_gives_the_in_memory_result(testbed):
    """EEP's prune phase in mode layers (each iteration's candidates in one stream): the same kept
    experts, history and score as in memory, seeded with a criterion's plan as a run does."""
    model, tok, _, data_dir, lm = testbed
    search = SearchSet.from_tokens(token_split(tok, data_dir / "search.jsonl", 2, 48))
    options = dict(sparsity=0.5, population=4, iterations=3, seed=0, progress=False)
    memory = select_experts(model, run_teacher(model, search, cache="hidden"), **options)
    teacher = lm.run_teacher(search, cache="hidden")
    layers = select_experts(
        lm.model, teacher, executor=LocalExecutor(lm, teacher, layerwise_evaluator), **options
    )
    assert layers.best == memory.best
    assert layers.history == [_approx(g) for g in memory.history]  # floats to 1e-7 (see above)
    assert layers.best_score == pytest.approx(memory.best_score, abs=1e-7)


def test_layerwise_perplexity_and_multiple_choice_equal_in_memory(testbed):
    model, tok, _, data_dir, lm = testbed
    gen = torch.Generator().manual_seed(0)
    plan = {i: torch.randperm(32, generator=gen)[:12].tolist() for i in range(8)}
    rows = read_jsonl(data_dir / "test.jsonl")[:40]
    items = read_jsonl(data_dir / "multiple_choice.jsonl")[:12]
    with mask_experts(model, plan):
        in_memory = evaluations(model, tok, rows, items, max_tokens_per_domain=600, seq_len=128)
    with lm.masked(plan):
        assert_same_evaluations(
            evaluations(lm, tok, rows, items, max_tokens_per_domain=600, seq_len=128), in_memory
        )


def evaluations(model, tok, rows, items, **ppl_options) -> tuple[dict, object]:
    """(perplexity by domain, multiple-choice predictions) of `model` as it is now."""
    ppl = perplexity_by_domain(model, tok, rows, **ppl_options)
    return ppl, multiple_choice_accuracy(model, tok, items, return_predictions=True)


def assert_same_evaluations(got: tuple[dict, object], want: tuple[dict, object]) -> None:
    """Same tokens per domain, NLL to 1e-6, the same multiple-choice predictions."""
    assert got[0].keys() == want[0].keys()
    for domain, r in want[0].items():
        assert got[0][domain]["tokens"] == r["tokens"]
        assert got[0][domain]["nll"] == pytest.approx(r["nll"], abs=1e-6)
    assert got[1] == want[1]


# --- recipe, CLI and the automatic choice ------------------------------------------------------------


def test_device_layers_is_mode_layers():
    base = {"model": "m", "out": "o", "sparsity": 0.5, "criterion": "frequency", "stats": "s"}
    r = Recipe.build(base | {"device": "layers"})
    assert (r.device, r.mode) == ("cpu", "layers")
    r = Recipe.build(base | {"device": "cuda:1:layers"})
    assert (r.device, r.mode) == ("cuda:1", "layers")
    refused = {
        "cannot go with mode memory": base | {"device": "layers", "mode": "memory"},
        "not an accelerate device map": base | {"device": "auto", "mode": "layers"},
        "lm-eval tasks need the model in memory": base
        | {"mode": "layers", "evaluate": {"lm_eval": ["moeprune_mc"]}},
    }
    for message, spec in refused.items():
        with pytest.raises(moeprune.errors.MoepruneError, match=message):
            Recipe.build(spec)


def test_run_in_mode_layers_equals_the_in_memory_run(testbed, tmp_path, capsys, monkeypatch):
    """A whole EvoESAP run with evaluation (observe + teacher in one pass, lockstep search, masked
    evaluation, streamed surgery) == the same recipe in memory; with a memory budget the model does not
    fit, mode auto picks layers by itself and says so in one line."""
    from moeprune import api

    _, _, model_dir, data_dir, _ = testbed
    common = dict(
        criterion="frequency", sparsity=0.5, data={"data": str(data_dir / "calibration.jsonl"), "samples": 4, "seq_len": 64},
        search_data={"data": str(data_dir / "search.jsonl"), "samples": 2, "seq_len": 48}, population=4,
        generations=2, dtype="float32", evaluate={"suite": None, "heldout": {"data": str(data_dir / "search.jsonl"),
        "samples": 2, "seq_len": 48, "seed": 7}},
    )  # fmt: skip
    memory = api.run(
        api.recipe("evoesap", model_dir, tmp_path / "memory", mode="memory", racing=False, **common),
        progress=False,
    )
    layers = api.run(  # racing on by default: layer by layer the search is exact all the same
        api.recipe("evoesap", model_dir, tmp_path / "layers", device="layers", **common), progress=False
    )
    assert yaml.safe_load((tmp_path / "layers" / "recipe.yaml").read_text())["search"]["racing"] is False
    assert layers.choice.plan == memory.choice.plan
    assert layers.kept == memory.kept
    heldout = {k: v["heldout_esap"] for k, v in layers.evaluation.items()}
    assert heldout == pytest.approx({k: v["heldout_esap"] for k, v in memory.evaluation.items()}, abs=1e-5)
    a = json.loads((tmp_path / "memory" / "search_history.json").read_text())["history"]
    b = json.loads((tmp_path / "layers" / "search_history.json").read_text())["history"]
    assert b == [_approx(g) for g in a]  # floats to 1e-7: the in-memory scoring rounds differently
    reloaded = load(tmp_path / "layers")
    assert reloaded.config.num_experts == 16
    capsys.readouterr()
    monkeypatch.setenv("MOEPRUNE_MEMORY_BUDGET", "1MB")
    auto = api.run(api.recipe("evoesap", model_dir, tmp_path / "auto", **common), progress=False)
    assert "running it layer by layer" in capsys.readouterr().err
    assert auto.choice.plan == memory.choice.plan


def test_cli_observe_with_device_layers(run_cli, tmp_path):
    model_dir, data_dir = bundled_testbed()
    args = [
        "observe",
        model_dir,
        "--data",
        data_dir / "calibration.jsonl",
        "--num-samples",
        "3",
        "--seq-len",
        "32",
    ]
    code, _, err = run_cli(*args, "--out", tmp_path / "memory")
    assert code == 0, err
    code, _, err = run_cli(*args, "--out", tmp_path / "layers", "--device", "layers")
    assert code == 0, err
    from moeprune.observe import ExpertStats

    a, b = ExpertStats.load(tmp_path / "memory"), ExpertStats.load(tmp_path / "layers")
    assert_same_stats(b, a, tol=1e-4)  # the stats' dtype is the checkpoint's (bf16) in both runs


# --- larger than memory ------------------------------------------------------------------------------

CAPPED = textwrap.dedent(
    """
    import resource, sys
    import torch
    import moeprune  # noqa: F401  (the baseline: a process that only imports moeprune)

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    src, cap, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    from moeprune.data import TokenSet
    from moeprune.execute import LayerwiseEvaluator, LayerwiseModel
    from moeprune.fitness import SearchSet
    from moeprune.plan import ExpertPlan
    from moeprune.surgery import load

    torch.backends.mkldnn.enabled = False  # oneDNN reserves address space for bf16 kernels beyond the cap
    limit = status("VmSize") + cap
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    ids = torch.randint(3, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    data = TokenSet(ids, torch.ones_like(ids), torch.ones_like(ids).bool(), ["en"] * 4)
    plan = ExpertPlan.from_removed({layer: list(range(0, 64, 2)) for layer in range(8)})
    if mode == "layers":
        # one layer at a time: a prefetch thread's malloc arena alone reserves 64 MB of address space
        lm = LayerwiseModel(src, prefetch=False)
        stats, teacher = lm.run_pass(calibration=data, search=SearchSet.from_tokens(data), top_k=16)
        esap = LayerwiseEvaluator(lm, teacher).evaluate(plan).value
        print("tokens", stats.layers[7].tokens, "esap", esap, "read", lm.bytes_read)
    else:
        load(src)
    print("peak address space over the cap base:", status("VmPeak") - (limit - cap))
    """
)


@pytest.mark.slow  # ~30 s: writes 600 MB, two fresh processes
def test_observes_and_scores_a_checkpoint_larger_than_the_memory_cap(tmp_path):
    """A ~600 MB checkpoint, a process allowed 400 MB of address space beyond what importing moeprune
    takes: layer by layer it is observed and a plan scored; loading it in memory fails under the cap."""
    from synthetic import over_the_cap_checkpoint

    src, cap, env = over_the_cap_checkpoint(tmp_path / "src")

    def run(mode: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", CAPPED, str(src), str(cap), mode],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    layers = run("layers")
    assert layers.returncode == 0, layers.stderr[-2000:]
    assert "tokens 128 esap" in layers.stdout
    esap = float(layers.stdout.split("esap")[1].split()[0])
    assert 0.0 < esap < 1.0
    in_memory = run("memory")
    assert in_memory.returncode != 0, "the cap must be too small for the in-memory path"
