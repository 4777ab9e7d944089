"""ESAP / KL / NLL, teacher caches, candidate masking vs structural pruning, layer-resumed forwards."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from moeprune.arch import moe_layers
from moeprune.errors import MoepruneError, RegistryError
from moeprune.fitness import (
    FITNESS,
    CandidateEvaluator,
    SearchSet,
    TeacherSlice,
    run_teacher,
    speculative_acceptance,
    teacher_slice,
)
from moeprune.fitness.metrics import esap
from moeprune.plan import ExpertPlan
from moeprune.surgery import mask_experts, remove_experts_
from tiny_models import FAMILIES, REPLAY_FALLBACK_OVERRIDES, tiny_model


def search_set(seed: int = 0, n: int = 4, length: int = 12) -> SearchSet:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row
    return SearchSet.from_tensors(ids, mask, batch_size=2)


def some_plan(model, seed: int = 0, share: float = 0.5) -> ExpertPlan:
    """Remove a seeded share of each MoE layer (group-limited layers: the same number per group)."""
    g = torch.Generator().manual_seed(seed)
    removed = {}
    for layer in moe_layers(model):
        e, groups = layer.num_experts, layer.num_groups
        size = e // groups
        per_group = min(int(size * share), size - max(1, -(-layer.top_k // layer.topk_groups)))
        removed[layer.index] = [
            grp * size + int(i)
            for grp in range(groups)
            for i in torch.randperm(size, generator=g)[:per_group]
        ]
    return ExpertPlan.from_removed(removed)


@pytest.fixture(scope="module")
def mixtral():
    return tiny_model("mixtral")


def test_esap_hand_computed():
    # p: teacher, q: draft; ESAP_t = 1 - TV = sum min(p, q)
    p = torch.tensor([[0.5, 0.3, 0.2], [1.0, 0.0, 0.0]])
    q = torch.tensor([[0.2, 0.3, 0.5], [0.5, 0.5, 0.0]])
    # TV_1 = (0.3 + 0 + 0.3) / 2 = 0.3, TV_2 = (0.5 + 0.5) / 2 = 0.5  -> ESAP = 1 - 0.4 = 0.6
    value, _, _ = esap(q.clamp_min(1e-30).log(), TeacherSlice(probs=p), torch.zeros(2, dtype=torch.long))
    assert value.mean().item() == pytest.approx(0.6, abs=1e-6)
    # top-1 sparse cache: K = {argmax p}; lower = min(p_K, q_K), upper adds min(p_tail, q_tail)
    _, lower, upper = esap(
        q.clamp_min(1e-30).log(), teacher_slice(p.log(), "sparse", 1), torch.zeros(2, dtype=torch.long)
    )
    assert lower.tolist() == pytest.approx([0.2, 0.5], abs=1e-6)
    assert upper.tolist() == pytest.approx([0.2 + 0.5, 0.5 + 0.0], abs=1e-6)
    assert (lower <= value + 1e-6).all() and (value <= upper + 1e-6).all()


def test_unpruned_esap_is_one(mixtral):
    s = search_set()
    for cache in ("dense", "sparse"):
        r = CandidateEvaluator(mixtral, s, cache=cache, top_k=8).evaluate({})
        assert r.value == pytest.approx(1.0, abs=1e-5)
    kl = CandidateEvaluator(mixtral, s, fitness="kl_teacher_draft", cache="dense").evaluate({})
    assert kl.value == pytest.approx(0.0, abs=1e-5)


def test_sparse_bound_contains_dense(mixtral):
    s = search_set()
    dense = CandidateEvaluator(mixtral, s, cache="dense")
    sparse = CandidateEvaluator(mixtral, s, cache="sparse", top_k=16)
    assert sparse.teacher.nbytes() < dense.teacher.nbytes() / 3
    for seed in range(3):
        plan = some_plan(mixtral, seed)
        d, sp = dense.evaluate(plan), sparse.evaluate(plan)
        assert sp.lower - 1e-6 <= d.value <= sp.upper + 1e-6
        assert d.value < 1.0


def test_nucleus_keeps_the_smallest_set_covering_p():
    # sorted: 0.4 (token 2), 0.3 (0), 0.2 (3), 0.06 (1), 0.04 (4)
    p = torch.tensor([[0.3, 0.06, 0.4, 0.2, 0.04], [0.96, 0.01, 0.01, 0.01, 0.01]])
    t = teacher_slice(p.log(), "nucleus", 4, nucleus_p=0.75)
    kept = [sorted(t.top_ids[i][t.top_probs[i] > 0].tolist()) for i in range(2)]
    assert kept == [[0, 2, 3], [0]]  # 0.4 + 0.3 < 0.75 <= 0.4 + 0.3 + 0.2; 0.96 alone covers it
    assert t.tail.tolist() == pytest.approx([0.1, 0.04], abs=1e-6)
    assert t.nucleus and t.top_probs.shape == (2, 4)  # stored padded to K_max: sparse's bytes
    # capped at K_max: p = 0.99 needs all 5 of the first row, K_max = 2 keeps the top 2
    t = teacher_slice(p.log(), "nucleus", 2, nucleus_p=0.99)
    assert (t.top_probs[0] > 0).sum() == 2 and t.tail[0].item() == pytest.approx(0.3, abs=1e-6)
    # hand-made draft: the bounds treat every entry past the nucleus as the tail, and hold
    q = torch.tensor([[0.1, 0.3, 0.2, 0.2, 0.2], [0.5, 0.2, 0.1, 0.1, 0.1]])
    t = teacher_slice(p.log(), "nucleus", 5, nucleus_p=0.75)
    value, lower, upper = esap(q.log(), t, torch.zeros(2, dtype=torch.long))
    dense, _, _ = esap(q.log(), TeacherSlice(probs=p), torch.zeros(2, dtype=torch.long))
    assert lower.tolist() == pytest.approx([0.1 + 0.2 + 0.2, 0.5], abs=1e-6)
    assert upper.tolist() == pytest.approx([0.5 + min(0.1, 0.5), 0.5 + min(0.04, 0.5)], abs=1e-6)
    assert value.tolist() == pytest.approx(((lower + upper) / 2).tolist(), abs=1e-7)
    assert (lower <= dense + 1e-6).all() and (dense <= upper + 1e-6).all()
    # KL on the nucleus + tail outcomes: a lower bound of the exact KL (log-sum inequality)
    for name in ("kl_teacher_draft", "kl_draft_teacher"):
        fn = FITNESS.get(name).fn
        coarse, _, _ = fn(q.log(), t, torch.zeros(2, dtype=torch.long))
        exact, _, _ = fn(q.log(), TeacherSlice(probs=p), torch.zeros(2, dtype=torch.long))
        assert (coarse <= exact + 1e-6).all() and (coarse >= -1e-6).all()


def test_nucleus_bound_contains_dense(mixtral):
    s = search_set()
    dense = CandidateEvaluator(mixtral, s, cache="dense")
    nucleus = CandidateEvaluator(mixtral, s, cache="nucleus", top_k=32, nucleus_p=0.2)
    sparse = CandidateEvaluator(mixtral, s, cache="sparse", top_k=32)
    assert nucleus.teacher.kind == "nucleus" and nucleus.teacher.nucleus_p == 0.2
    assert nucleus.teacher.nbytes() == sparse.teacher.nbytes()  # padded to K_max
    assert any((sl.top_probs == 0).any() for sl in nucleus.teacher.slices)  # some nuclei are short
    for seed in range(3):
        plan = some_plan(mixtral, seed)
        d, n, sp = dense.evaluate(plan), nucleus.evaluate(plan), sparse.evaluate(plan)
        assert n.lower - 1e-6 <= d.value <= n.upper + 1e-6
        assert n.lower <= n.value <= n.upper
        assert n.value == pytest.approx((n.lower + n.upper) / 2, abs=1e-6)  # float32 per token
        assert sp.value == sp.upper  # sparse keeps reporting its upper bound
        assert d.value < 1.0


def test_nucleus_with_p_one_and_every_token_equals_dense(mixtral):
    s = search_set()
    vocab = mixtral.config.vocab_size
    dense = CandidateEvaluator(mixtral, s, cache="dense")
    nucleus = CandidateEvaluator(mixtral, s, cache="nucleus", top_k=vocab + 5, nucleus_p=1.0)
    for seed in range(2):
        plan = some_plan(mixtral, seed)
        d, n = dense.evaluate(plan), nucleus.evaluate(plan)
        assert n.value == pytest.approx(d.value, abs=1e-6)
        assert n.upper - n.lower < 1e-6


@pytest.mark.parametrize(
    "family", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "granitemoe", "cohere2_moe", "jamba"]
)
def test_hidden_state_teacher_equals_the_dense_cache(family):
    """The hidden cache keeps h_t (after the final norm) and recomputes p_t with the LM head (and the
    family's logit scaling): ESAP and KL equal the dense cache's to 1e-6, one at a time and stacked,
    in a fraction of the memory once V >> H."""
    model = tiny_model(family)
    s = search_set()
    for fitness in ("esap", "kl_teacher_draft"):
        dense = CandidateEvaluator(model, s, fitness=fitness, cache="dense")
        hidden = CandidateEvaluator(model, s, fitness=fitness, cache="hidden", candidate_batch=2)
        cfg = model.config.get_text_config()
        assert hidden.teacher.nbytes() * cfg.vocab_size == dense.teacher.nbytes() * cfg.hidden_size
        plans = [some_plan(model, seed) for seed in range(3)] + [{}]
        for d, h in zip([dense.evaluate(p) for p in plans], hidden.evaluate_many(plans), strict=True):
            assert abs(d.value - h.value) <= 1e-6, (family, fitness, d.value, h.value)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_hidden_cache_keeps_the_teacher_probs_when_they_fit(family):
    """Where T x V float32 fit the budget the hidden cache computes the teacher's probabilities once
    and keeps them: every candidate (one at a time, stacked, on a slice) scores bitwise as when they
    are recomputed per candidate; over the budget they are not kept."""
    model = tiny_model(family)
    s = search_set()
    vocab = model.config.get_text_config().vocab_size
    need = s.num_scored() * vocab * 4
    kept = run_teacher(model, s, cache="hidden", keep_probs_bytes=need)
    recomputed = run_teacher(model, s, cache="hidden", keep_probs_bytes=need - 1)
    assert kept.cache.probs_kept and kept.cache.kept_nbytes() == need
    assert not recomputed.cache.probs_kept and recomputed.cache.kept_nbytes() == 0
    assert kept.cache.nbytes() == recomputed.cache.nbytes()  # the cache itself: T x H either way
    plans = [some_plan(model, seed) for seed in range(3)] + [{}]
    for fitness in ("esap", "kl_teacher_draft"):
        a = CandidateEvaluator(model, kept, fitness=fitness, candidate_batch=2)
        b = CandidateEvaluator(model, recomputed, fitness=fitness, candidate_batch=2)
        assert [r.value for r in a.evaluate_many(plans)] == [r.value for r in b.evaluate_many(plans)]
        assert [a.evaluate(p).value for p in plans] == [b.evaluate(p).value for p in plans]
        a1, b1 = (CandidateEvaluator(model, t.subset(1, 2), fitness=fitness) for t in (kept, recomputed))
        assert a1.evaluate(plans[0]).value == b1.evaluate(plans[0]).value


@pytest.mark.parametrize(
    "family, fitness",
    [("mixtral", "esap"), ("deepseek_v3", "esap"), ("gpt_oss", "esap"), ("llama4_text", "esap")]
    + [("mixtral", "kl_teacher_draft"), ("mixtral", "kl_draft_teacher"), ("mixtral", "nll")],
)
def test_masked_fitness_equals_structurally_pruned(family, fitness):
    model = tiny_model(family)
    s = search_set()
    ev = CandidateEvaluator(model, s, fitness=fitness, cache="dense")
    plan = some_plan(model, seed=1)
    masked = ev.evaluate(plan)
    pruned = copy.deepcopy(model)
    remove_experts_(pruned, plan)
    with torch.inference_mode():
        logits = [pruned(input_ids=b.input_ids, attention_mask=b.attention_mask).logits for b in s.batches]
    assert ev.score_logits(logits).value == pytest.approx(masked.value, abs=1e-5)


# the 13 first families run by default; MOEPRUNE_ALL_FAMILIES=1 runs every registered one (45, ~2 min)
FIRST_13 = [
    "deepseek_v2", "deepseek_v3", "ernie4_5_moe", "glm4_moe", "gpt_oss", "granitemoe", "hunyuan_v1_moe",
    "llama4_text", "mixtral", "olmoe", "phimoe", "qwen2_moe", "qwen3_moe",
]  # fmt: skip
REPLAY_FAMILIES = (
    FAMILIES if os.environ.get("MOEPRUNE_ALL_FAMILIES") else [f for f in FIRST_13 if f in FAMILIES]
)


# families whose decoder stack the replay does not reproduce: the evaluator falls back to full forwards
REPLAY_FALLBACK = set(REPLAY_FALLBACK_OVERRIDES)


@pytest.mark.parametrize("family", REPLAY_FAMILIES)
def test_layer_resumed_forward_equals_full_forward(family):
    model = tiny_model(family)
    s = search_set(n=2)
    ev = CandidateEvaluator(model, s, cache="dense")
    with torch.inference_mode():
        full = [model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits for b in s.batches]
    for got, want in zip(ev.candidate_logits({}), full, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # two candidates that differ only in the last MoE layer: the second restarts there
    layers = moe_layers(model)
    first = some_plan(model, seed=2)
    last = layers[-1]
    second = dict(first.removed)
    second[last.index] = ()
    ev.candidate_logits(first)
    run_before = ev.stats.layers_run
    got = ev.candidate_logits(second)
    if family in REPLAY_FALLBACK:
        assert ev.full_forward, "the replay should have fallen back to a full forward"
    else:
        assert not ev.full_forward
        assert ev.stats.layers_run - run_before == len(ev.replay.layers) - last.index
        # the restart layer took its attention output from the cache (the result is still exact)
        assert ev.stats.attention_reused >= 1 or ev.replay.attention_names[last.index] is None
    with torch.inference_mode(), mask_experts(model, ExpertPlan.from_removed(second)):
        want = [model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits for b in s.batches]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", REPLAY_FAMILIES)
def test_last_moe_block_on_scored_rows_only_is_exact(family):
    """`evaluate` runs the last layer's MoE block on the scored positions only (a third of them
    here): the fitness equals a full forward's to 1e-6, and the block did see fewer tokens."""
    model = tiny_model(family)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 128, (4, 12), generator=g)
    score = torch.zeros_like(ids, dtype=torch.bool)
    score[:, 8:] = True  # answers: the last 4 tokens of each row
    s = SearchSet.from_tensors(ids, score_mask=score, batch_size=2)
    fast = CandidateEvaluator(model, s, cache="dense")
    slow = CandidateEvaluator(model, s, cache="dense", reuse=False, full_forward=True)
    seen: list[int] = []
    last = fast.replay.num_layers - 1 if fast.replay is not None else -1
    hooked = not fast.full_forward and last in fast.replay.blocks
    if hooked:  # the router sees the block's tokens
        [m for m in moe_layers(model) if m.index == last][0].router.register_forward_pre_hook(
            lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]).shape[0])
        )
    for plan in [some_plan(model, seed) for seed in range(2)] + [{}]:
        want = slow.evaluate(plan).value
        seen.clear()
        got = fast.evaluate(plan).value
        assert got == pytest.approx(want, abs=1e-6), family
        # the last block saw each batch's 2 x 4 scored tokens, not its 2 x 12 positions
        assert set(seen) == ({8} if hooked else set()), seen


@pytest.mark.parametrize("family", REPLAY_FAMILIES)
def test_moe_blocks_skip_the_positions_no_scored_token_depends_on(family):
    """Right-padded rows of different lengths whose last token is not scored (on-policy answers):
    every MoE block before the last runs on the positions up to each row's last scored one only; the
    fitness equals a full forward's to 1e-6, and `candidate_logits` (every position) never restarts
    from such partial states."""
    model = tiny_model(family)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 128, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    mask[3, 7:] = 0
    score = torch.zeros_like(ids, dtype=torch.bool)
    score[:, 5:] = True  # answers from token 5 on
    score[0, 11] = score[2, 10:] = False  # unscored final tokens
    s = SearchSet.from_tensors(ids, mask, score, batch_size=2)
    needed = [b.needed_positions() for b in s.batches]
    assert [n.numel() for n in needed] == [10 + 8, 9 + 6]  # of 24 positions per batch
    fast = CandidateEvaluator(model, s, cache="dense")
    slow = CandidateEvaluator(model, s, cache="dense", reuse=False, full_forward=True)
    if fast.full_forward:
        pytest.skip(f"{family}: no layer replay")
    assert [n.tolist() for n in fast.needed] == [n.tolist() for n in needed]
    seen: list[int] = []
    first = moe_layers(model)[0]
    hooked = first.index < fast.replay.num_layers - 1 and first.index in fast.replay.blocks
    if hooked:
        first.router.register_forward_pre_hook(
            lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]).shape[0])
        )
    plans = [some_plan(model, seed) for seed in range(2)] + [{}]
    for plan in plans:
        want = slow.evaluate(plan).value
        seen.clear()
        assert fast.evaluate(plan).value == pytest.approx(want, abs=1e-6), family
        assert set(seen) == ({18, 15} if hooked else set()), seen  # the needed positions, not 24
    for got, want in zip(fast.candidate_logits(plans[1]), slow.candidate_logits(plans[1]), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_a_batch_without_scored_tokens_still_scores(mixtral):
    """A search batch with nothing scored: the last block runs whole there; the fitness is exact."""
    ids = torch.randint(3, 128, (4, 12), generator=torch.Generator().manual_seed(5))
    score = torch.zeros_like(ids, dtype=torch.bool)
    score[2:, 6:] = True  # the first batch (rows 0-1) has no scored token
    s = SearchSet.from_tensors(ids, score_mask=score, batch_size=2)
    fast = CandidateEvaluator(mixtral, s, cache="dense")
    slow = CandidateEvaluator(mixtral, s, cache="dense", reuse=False, full_forward=True)
    plan = some_plan(mixtral, 1)
    assert fast.evaluate(plan).value == pytest.approx(slow.evaluate(plan).value, abs=1e-6)


def test_reuse_gives_identical_scores(mixtral):
    s = search_set()
    fast = CandidateEvaluator(mixtral, s, cache="dense")
    slow = CandidateEvaluator(mixtral, s, cache="dense", reuse=False, full_forward=True)
    plans = [some_plan(mixtral, seed) for seed in range(3)]
    plans.append({**plans[0].removed, 2: ()})
    for plan in plans:
        assert fast.evaluate(plan).value == pytest.approx(slow.evaluate(plan).value, abs=1e-6)
    assert fast.stats.layers_run < slow.stats.layers_run
    assert fast.stats.hits >= 1


def test_fitness_registry_did_you_mean():
    assert set(FITNESS.names()) == {"esap", "kl_teacher_draft", "kl_draft_teacher", "nll"}
    with pytest.raises(RegistryError, match="did you mean 'esap'"):
        FITNESS.get("esapp")


def test_speculative_acceptance(mixtral):
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    full = speculative_acceptance(mixtral, {}, prompts, gamma=3, max_new_tokens=6)
    assert full.rate == 1.0 and full.proposed == 10  # rounds of 3 proposals + 1 target token
    pruned = speculative_acceptance(
        mixtral, some_plan(mixtral, 0, share=0.75), prompts, gamma=3, max_new_tokens=6
    )
    assert 0.0 <= pruned.rate < 1.0
    # the output is the target's greedy continuation whatever the draft
    assert pruned.generated == full.generated


def test_replay_failure_falls_back_to_full_forward(mixtral, monkeypatch):
    from moeprune.fitness import replay

    def broken(self, index, hidden, record):
        raise RuntimeError("layer needs a state the forward did not pass")

    monkeypatch.setattr(replay.LayerReplay, "run_layer", broken)
    s = search_set()
    with pytest.warns(UserWarning, match="full forward"):
        ev = CandidateEvaluator(mixtral, s, cache="dense")
    assert ev.full_forward and "failed" in ev.replay_fallback
    plan = some_plan(mixtral, 0)
    monkeypatch.undo()
    ref = CandidateEvaluator(mixtral, s, cache="dense", reuse=False, full_forward=True)
    assert ev.evaluate(plan).value == pytest.approx(ref.evaluate(plan).value, abs=1e-7)


def test_hidden_cache_evicts_low_scorers_first():
    from moeprune.fitness.evaluator import HiddenCache, PrefixState

    def state() -> PrefixState:
        return PrefixState([torch.zeros(256)])  # 1 KiB

    cache = HiddenCache(max_bytes=3 * 1024)
    for name, score in (("good", 0.9), ("bad", 0.1), ("mid", 0.5)):
        cache.put((1, (name,)), state())
        cache.settle([(1, (name,))], score)
    cache.get((1, ("bad",)))  # recently used, but the lowest score still goes first
    cache.put((2, ("new",)), state())  # pending: over budget -> evict "bad"
    assert cache.get((1, ("bad",))) is None
    assert all(cache.get((1, (n,))) is not None for n in ("good", "mid"))
    cache.put((3, ("new2",)), state())  # -> evict "mid"; the pending entries stay
    assert cache.get((1, ("mid",))) is None and cache.get((2, ("new",))) is not None
    assert cache.bytes <= 3 * 1024


def test_hidden_cache_refuses_what_only_pending_entries_could_make_room_for():
    from moeprune.fitness.evaluator import HiddenCache, PrefixState

    cache = HiddenCache(max_bytes=3 * 1024)
    for name in ("a", "b", "c", "d"):  # one candidate's entries, 1 KiB each, none settled yet
        stored = cache.put((1, (name,)), PrefixState([torch.zeros(256)]))
        assert stored == (name != "d") and cache.bytes <= 3 * 1024
    cache.settle([(1, (n,)) for n in "abc"], 0.5)
    assert cache.put((2, ("e",)), PrefixState([torch.zeros(256)]))  # now a settled entry makes room
    assert len(cache) == 3 and cache.bytes == 3 * 1024


@pytest.mark.parametrize("candidate_batch", [1, 3], ids=["one", "stacked"])
def test_hidden_cache_never_exceeds_its_cap(mixtral, candidate_batch):
    """A cap below one candidate's own entries: the cache stays under it, fitness is unchanged."""
    s = search_set()
    plans = [some_plan(mixtral, seed) for seed in (0, 1, 2, 0, 3)]
    probe = CandidateEvaluator(mixtral, s, cache="sparse", top_k=8)
    probe.evaluate(plans[0])
    cap = probe.hidden.bytes // 2 + 1  # about half of one candidate's entries
    ev = CandidateEvaluator(
        mixtral, s, cache="sparse", top_k=8, cache_bytes=cap, candidate_batch=candidate_batch
    )
    put, peak = ev.hidden.put, [0]

    def checked_put(key, states):
        stored = put(key, states)
        held = sum(state.nbytes() for state in ev.hidden._items.values())
        assert ev.hidden.bytes == held <= cap
        peak[0] = max(peak[0], held)
        return stored

    ev.hidden.put = checked_put
    got = ev.evaluate_many(plans)
    ref = CandidateEvaluator(mixtral, s, cache="sparse", top_k=8, reuse=False)
    assert 0 < peak[0] <= cap
    for g, p in zip(got, plans, strict=True):
        assert g.value == pytest.approx(ref.evaluate(p).value, abs=1e-5)


@pytest.mark.parametrize("family", REPLAY_FAMILIES)
def test_stacked_candidates_equal_one_at_a_time(family):
    """evaluate_many with candidate_batch 3 == evaluate, including candidates that restart from
    cached prefixes at different layers, a duplicate plan and the unpruned model."""
    model = tiny_model(family)
    s = search_set()
    layers = moe_layers(model)
    one = CandidateEvaluator(model, s, cache="sparse", top_k=8)
    stacked = CandidateEvaluator(model, s, cache="sparse", top_k=8, candidate_batch=3)
    base = some_plan(model, seed=3)
    plans = [base, {}, some_plan(model, seed=4), {**base.removed, layers[-1].index: ()}, base]
    plans.append({**base.removed, layers[len(layers) // 2].index: ()})
    plans.append(some_plan(model, seed=5))
    want = [one.evaluate(p) for p in plans]
    got = stacked.evaluate_many(plans)
    assert stacked.stats.evaluations == len(plans)
    for g, w in zip(got, want, strict=True):
        assert g.value == pytest.approx(w.value, abs=1e-5)
        assert g.lower == pytest.approx(w.lower, abs=1e-5) and g.tokens == w.tokens
    assert got[1].value == pytest.approx(1.0, abs=1e-6)
    if not stacked.full_forward:
        assert stacked.stats.hits >= 1, "later stacks should restart from the first stack's prefixes"
        assert stacked.stats.layers_run < stacked.stats.layers_total


def test_candidate_batch_must_be_positive(mixtral):
    with pytest.raises(ValueError, match="candidate_batch"):
        CandidateEvaluator(mixtral, search_set(), candidate_batch=0)


def test_a_teacher_recorded_on_another_model_object_is_refused(mixtral):
    """Layer replay runs the recorded model's layers: evaluating another model object (e.g. a copy in
    another dtype) with it would mask the copy and score the original (ESAP 1 for any plan)."""
    other = copy.deepcopy(mixtral)
    run = run_teacher(mixtral, search_set(), cache="hidden")
    with pytest.raises(MoepruneError, match="another model object"):
        CandidateEvaluator(other, run)
    assert CandidateEvaluator(mixtral, run).evaluate(some_plan(mixtral)).value < 1 - 1e-6


def test_head_chunks_by_device():
    """256 rows on a CPU (logits stay in cache); on an accelerator as many as fit in 256 MiB."""
    from moeprune.fitness.evaluator import head_rows_for

    assert head_rows_for(torch.device("cpu"), 6000) == 256
    assert head_rows_for(torch.device("meta"), 6000) == 2**28 // (4 * 6000)
    assert head_rows_for(torch.device("meta"), 10**7) == 256


def test_hidden_cache_without_layer_replay_uses_the_dense_cache():
    """A family whose layers cannot be replayed has no recorded final states: the default hidden cache
    becomes the (equally exact) dense cache, with a warning."""
    model = tiny_model("hy_v4")
    with pytest.warns(UserWarning, match="using the dense cache"):
        ev = CandidateEvaluator(model, search_set(), cache="hidden")
    assert ev.teacher.kind == "dense"
    dense = CandidateEvaluator(model, search_set(), cache="dense")
    plan = some_plan(model, seed=0)
    assert ev.evaluate(plan).value == dense.evaluate(plan).value
