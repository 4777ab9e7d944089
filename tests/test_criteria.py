"""Every criterion equals a slow, obvious implementation: explicit loops over tokens and experts with
every expert evaluated on every token (dense), g taken from the router output.

Families: qwen3_moe (softmax top-k renormalised), deepseek_v3 (sigmoid, correction bias, expert
groups), gpt_oss (biased router and experts), llama4_text (sigmoid of top-k logits, input-scaled
experts). Plus: every criterion gives a valid plan on all 13 families.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import cut_tree, linkage
from scipy.spatial.distance import squareform
from scipy.stats import spearmanr

from moeprune.arch import decode_router_output, expert_outputs, moe_layers
from moeprune.criteria import CRITERIA, choose_removed, rank, removal_order, uniform_counts
from moeprune.data import TokenSet
from moeprune.errors import MoepruneError, RegistryError
from moeprune.observe import observe
from moeprune.plan import validate_plan
from tiny_models import FAMILIES, tiny_model

REFERENCE_FAMILIES = ["qwen3_moe", "deepseek_v3", "gpt_oss", "llama4_text"]
SCORE_CRITERIA = ["frequency", "soft_frequency", "ean", "ean_mean", "weighted_ean", "reap"]
RTOL = 1e-6


def calibration(seed: int = 0, samples: int = 6, length: int = 10) -> TokenSet:
    """`samples` rows of random tokens, one domain each, the last rows right-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (samples, length), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, 6:] = 0
    mask[-2, 8:] = 0
    ids[mask == 0] = 0
    return TokenSet(ids, mask, mask.bool(), [f"d{i}" for i in range(samples)])


# ----------------------------------------------------------------------------- the slow reference
def reference(model, data: TokenSet) -> dict[int, dict]:
    """Per MoE layer, by explicit loops: the score sums, AVS, per-token contributions and errors."""
    layers = moe_layers(model)
    captured = {}

    def hook(layer):
        def fn(module, args, output):
            captured[layer.index] = (args[0].reshape(-1, args[0].shape[-1]), output)

        return fn

    handles = [layer.router.register_forward_hook(hook(layer)) for layer in layers]
    try:
        with torch.no_grad():
            model(input_ids=data.input_ids, attention_mask=data.attention_mask)
    finally:
        for h in handles:
            h.remove()
    valid = data.attention_mask.reshape(-1).bool().tolist()
    domain_of_token = [d for d in data.domains for _ in range(data.input_ids.shape[1])]
    out = {}
    for layer in layers:
        x_all, router_out = captured[layer.index]
        dec = decode_router_output(layer, router_out)
        e = layer.num_experts
        r = {k: [0.0] * e for k in ("count", "gate", "norm", "gnorm", "psum", "plogp")}
        contrib, err, domains = [], [], []
        with torch.no_grad():
            for t, ok in enumerate(valid):
                if not ok:
                    continue
                x = x_all[t]
                a = [expert_outputs(layer, x[None], torch.tensor([i]))[0].double() for i in range(e)]  # dense
                c = {}
                for j in range(dec.indices.shape[1]):
                    i = int(dec.indices[t, j])
                    g = float(dec.weights[t, j])
                    norm = float(a[i].norm())
                    r["count"][i] += 1
                    r["gate"][i] += g
                    r["norm"][i] += norm
                    r["gnorm"][i] += g * norm
                    if layer.family.experts_call == "stacked":  # Llama 4 scales the expert input
                        c[i] = expert_outputs(layer, (x * dec.weights[t, j])[None], torch.tensor([i]))[
                            0
                        ].double()
                    else:
                        c[i] = g * a[i]
                logits = dec.logits[t].double()
                p = torch.exp(logits - torch.logsumexp(logits, 0))
                for i in range(e):
                    pi = float(p[i])
                    r["psum"][i] += pi
                    r["plogp"][i] += pi * math.log2(pi) if pi > 0 else 0.0
                z = sum(c.values())
                contrib.append(c)
                err.append([float((z - a[i]).pow(2).sum()) for i in range(e)])
                domains.append(domain_of_token[t])
        n = len(contrib)
        out[layer.index] = {**r, "contrib": contrib, "err": np.array(err), "domains": domains, "n": n}
    return out


def reference_avs(model, data: TokenSet) -> dict[int, list[float]]:
    """S_var(i) = sum_t P_i(t) log2(P_i(t) N) straight from the definition (per-token loop)."""
    layers = moe_layers(model)
    probs = {}

    def hook(layer):
        def fn(module, args, output):
            probs[layer.index] = decode_router_output(layer, output).logits.double().softmax(-1)

        return fn

    handles = [layer.router.register_forward_hook(hook(layer)) for layer in layers]
    with torch.no_grad():
        model(input_ids=data.input_ids, attention_mask=data.attention_mask)
    for h in handles:
        h.remove()
    valid = data.attention_mask.reshape(-1).bool()
    out = {}
    for index, p in probs.items():
        p = p[valid]
        n, e = p.shape
        scores = []
        for i in range(e):
            total = sum(float(p[t, i]) for t in range(n))
            s = 0.0
            for t in range(n):
                big_p = float(p[t, i]) / total
                if big_p > 0:
                    s += big_p * math.log2(big_p * n)
            scores.append(s)
        out[index] = scores
    return out


def naee_loss(ref: dict, removed) -> float:
    """sum_x || sum_{i in R, x routed to i} c_i(x) ||^2, by loops."""
    total = 0.0
    for c in ref["contrib"]:
        diff = sum((c[i] for i in removed if i in c), torch.zeros(1, dtype=torch.float64))
        total += float(diff.pow(2).sum())
    return total


def admissible_sets(e: int, n: int, groups: int):
    size = e // groups
    for combo in itertools.combinations(range(e), n):
        if len({sum(1 for i in combo if i // size == g) for g in range(groups)}) == 1:
            yield combo


@pytest.fixture(scope="module")
def observed():
    """family -> (model, data, fast stats with every token in the dense subsample, reference)."""
    cache = {}

    def get(family):
        if family not in cache:
            model = tiny_model(family)
            data = calibration()
            stats = observe(model, data, dense_tokens=10_000, progress=False)
            cache[family] = (model, data, stats, reference(model, data))
        return cache[family]

    return get


def close(a, b) -> bool:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return bool(np.allclose(a, b, rtol=RTOL, atol=RTOL * max(1.0, float(np.abs(b).max(initial=0.0)))))


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("family", REFERENCE_FAMILIES)
def test_statistics_equal_dense_reference(observed, family):
    model, data, stats, ref = observed(family)
    avs_ref = reference_avs(model, data)
    for index, ls in stats.layers.items():
        r = ref[index]
        assert ls.tokens == r["n"] == data.num_tokens
        for name, key in [
            ("count", "count"),
            ("gate_sum", "gate"),
            ("norm_sum", "norm"),
            ("gnorm_sum", "gnorm"),
            ("prob_sum", "psum"),
            ("plogp_sum", "plogp"),
        ]:
            assert close(getattr(ls, name).numpy(), r[key]), (family, index, name)
        assert close(ls.dense_err.numpy(), r["err"]), (family, index, "dense_err")
        from moeprune.criteria.mop import avs

        assert close(avs(ls), avs_ref[index]), (family, index, "avs")


@pytest.mark.parametrize("family", REFERENCE_FAMILIES)
def test_score_criteria_equal_reference(observed, family):
    _, _, stats, ref = observed(family)
    for criterion in SCORE_CRITERIA:
        order = removal_order(stats, criterion)
        for index, ls in stats.layers.items():
            r = ref[index]
            cnt = r["count"]
            score = {
                "frequency": cnt,
                "soft_frequency": r["gate"],
                "ean": r["norm"],
                "ean_mean": [s / c if c else 0.0 for s, c in zip(r["norm"], cnt, strict=True)],
                "weighted_ean": r["gnorm"],
                "reap": [s / c if c else 0.0 for s, c in zip(r["gnorm"], cnt, strict=True)],
            }[criterion]
            e, groups = ls.num_experts, ls.num_groups
            size = e // groups
            # lowest first; with groups, round j = the j-th lowest of every group
            per_group = [
                sorted(range(g * size, (g + 1) * size), key=lambda i: (score[i], i)) for g in range(groups)
            ]
            expected = []
            for j in range(size):
                expected += sorted((grp[j] for grp in per_group), key=lambda i: (score[i], i))
            assert order[index] == expected, (family, criterion, index)


@pytest.mark.parametrize("family", REFERENCE_FAMILIES)
def test_naee_equals_enumeration(observed, family):
    _, _, stats, ref = observed(family)
    counts = uniform_counts(stats, 0.5)
    plan = choose_removed(stats, "naee", counts)
    for index, ls in stats.layers.items():
        r = ref[index]
        losses = {s: naee_loss(r, s) for s in admissible_sets(ls.num_experts, counts[index], ls.num_groups)}
        best = min(losses.values())
        chosen = tuple(sorted(plan.removed[index]))
        assert close(losses[chosen], best), (family, index, chosen, losses[chosen], best)
        gram = ls.gram.numpy()
        for s in list(losses)[:10]:  # the Gram form equals the per-token loss
            assert close(gram[np.ix_(s, s)].sum(), losses[s])


@pytest.mark.parametrize("family", REFERENCE_FAMILIES)
def test_mop_equals_reference(observed, family):
    model, data, stats, ref = observed(family)
    counts = uniform_counts(stats, 0.5)
    plan = choose_removed(stats, "mop", counts)
    avs_ref = reference_avs(model, data)
    for index, ls in stats.layers.items():
        r = ref[index]
        e, groups = ls.num_experts, ls.num_groups
        size = e // groups
        names = sorted(set(r["domains"]))
        err = r["err"]
        v = np.array(
            [
                [np.mean([err[t][i] for t in range(r["n"]) if r["domains"][t] == d]) for d in names]
                for i in range(e)
            ]
        )  # (E, D)
        kept = []
        for g in range(groups):
            members = list(range(g * size, (g + 1) * size))
            dist = np.zeros((size, size))
            for a, b in itertools.combinations(range(size), 2):
                rho = spearmanr(v[members[a]], v[members[b]]).statistic
                rho = 0.0 if np.isnan(rho) else rho
                dist[a, b] = dist[b, a] = 1 - (1 + rho) / 2
            keep_here = size - counts[index] // groups
            labels = cut_tree(linkage(squareform(dist), method="average"), n_clusters=keep_here).ravel()
            for cluster in set(labels):
                inside = [members[a] for a in range(size) if labels[a] == cluster]
                kept.append(max(inside, key=lambda i: (avs_ref[index][i], -i)))
        expected_removed = sorted(set(range(e)) - set(kept))
        assert sorted(plan.removed[index]) == expected_removed, (family, index)


def test_removal_orders_nest_and_match_rank(observed):
    _, _, stats, _ = observed("deepseek_v3")
    for criterion in CRITERIA.names():
        order = removal_order(stats, criterion)
        ranked = rank(stats, criterion, n_remove=2)
        for index, ls in stats.layers.items():
            assert sorted(order[index]) == list(range(ls.num_experts))
            if criterion != "naee":  # naee's count->set is exact enumeration; its order is greedy
                assert ranked[index] == order[index][:2]
            size = ls.num_experts // ls.num_groups
            for n in range(0, ls.num_experts + 1, ls.num_groups):  # balanced at multiples of G
                per_group = [sum(1 for i in order[index][:n] if i // size == g) for g in range(ls.num_groups)]
                assert len(set(per_group)) == 1, (criterion, n, per_group)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_criterion_gives_a_valid_plan(family):
    model = tiny_model(family)
    stats = observe(model, calibration(samples=2, length=6), dense_tokens=8, progress=False)
    for criterion in CRITERIA.names():
        plan = choose_removed(stats, criterion, uniform_counts(stats, 0.5))
        kept = validate_plan(model, plan)
        counts = uniform_counts(stats, 0.5)
        assert {i: len(v) for i, v in kept.items()} == {
            i: ls.num_experts - counts[i] for i, ls in stats.layers.items()
        }


def test_random_is_seeded(observed):
    _, _, stats, _ = observed("qwen3_moe")
    assert removal_order(stats, "random", seed=1) == removal_order(stats, "random", seed=1)
    assert removal_order(stats, "random", seed=1) != removal_order(stats, "random", seed=2)


def test_unknown_criterion_says_did_you_mean(observed):
    _, _, stats, _ = observed("qwen3_moe")
    with pytest.raises(RegistryError, match="did you mean 'frequency'"):
        removal_order(stats, "frequncy")


def test_mop_needs_the_dense_subsample():
    stats = observe(tiny_model("qwen3_moe"), calibration(samples=2), dense_tokens=0, progress=False)
    with pytest.raises(MoepruneError, match="dense token subsample"):
        removal_order(stats, "mop")
    assert set(removal_order(stats, "reap")) == set(stats.layers)


def test_mop_kmeans_without_domain_labels():
    data = calibration(samples=4)
    data.domains = ["all"] * len(data)
    stats = observe(tiny_model("qwen3_moe"), data, dense_tokens=64, progress=False)
    a = removal_order(stats, "mop", seed=0, mop_kmeans=3)
    assert a == removal_order(stats, "mop", seed=0, mop_kmeans=3)
    assert all(sorted(o) == list(range(8)) for o in a.values())
    general = choose_removed(stats, "mop", uniform_counts(stats, 0.5), mop_general=2)
    assert all(len(v) == 4 for v in general.removed.values())


def test_counts_respect_top_k_and_groups(observed):
    _, _, stats, _ = observed("deepseek_v3")  # 8 experts, 2 groups, topk_group 1, top_k 2
    assert set(uniform_counts(stats, 0.5).values()) == {4}
    assert set(uniform_counts(stats, 0.9).values()) == {4}  # the one selected group must fill top_k
    with pytest.raises(MoepruneError, match="multiple of 2"):
        choose_removed(stats, "frequency", {1: 3})
