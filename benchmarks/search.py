"""EvoESAP search cost, side by side in one run on the testbed (or any model + data splits).

Prints:
1. one candidate evaluation / one plain forward over the search set, averaged over a search
   (reuse of cached hidden states; goal <= 0.8), with the hidden-state cache hit rate;
2. teacher cache bytes, top-K sparse / dense (goal <= 2%), and the largest |ESAP_sparse - ESAP_dense|
   over every candidate both searches scored;
3. wall time of a whole search (teacher cache + evolution) vs a straightforward reference (dense
   full-vocabulary cache, a full forward per candidate, log-softmax and ESAP on the whole (B*L, V)
   logits), same seed: speed-up and whether the best plans agree. moeprune runs twice, with its
   default sparse cache and with a dense one (same fitness values as the reference, so the same
   trajectory is expected), to separate what the cache changes from what reuse saves, and a third
   time stacking `--candidate-batch` candidates per forward (what pays on a GPU).

    python benchmarks/search.py [--model DIR --data DIR] [--population 16 --generations 10] [--threads 2]
    python benchmarks/search.py --device cuda      # the same table on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from scipy.stats import kendalltau

from moeprune import api
from moeprune.allocate import AllocationSpace, EvoConfig, mutate, plan_from_counts, search_counts
from moeprune.arch import moe_layers
from moeprune.evolve import score_each
from moeprune.fitness import CandidateEvaluator
from moeprune.testbed import load_testbed, removal_order_for, token_split


def shared_prefix_share(space: AllocationSpace, base: tuple[int, ...], samples: int = 4000) -> float:
    """Mean share of MoE layers before the first one a SPEC mutant changes: the most a mutant can
    take from its parent's cached prefix (the structural bound of prefix reuse)."""
    rng = np.random.Generator(np.random.PCG64(0))
    cfg, n, shares = EvoConfig(), len(space.layers), []
    for _ in range(samples):
        child = mutate(space, base, cfg, rng)
        changed = [i for i in range(n) if child[i] != base[i]]
        if changed:
            shares.append(changed[0] / n)
    return float(np.mean(shares))


def timed_search(model, search, space, order, cfg, probe, plain_every: int = 4, **evaluator_kwargs):
    """A whole search; after every `plain_every` evaluation calls one plain forward is timed (same
    load on this shared machine) and excluded from the search's wall time. A stacking evaluator
    (candidate_batch > 1) gets each generation's new candidates in one call."""
    t0 = time.perf_counter()
    ev = CandidateEvaluator(model, search, **evaluator_kwargs)
    per_candidate, evals, plains = {}, [], []  # evals: (seconds, candidates) per call

    def score_many(many):
        t = time.perf_counter()
        results = ev.evaluate_many([plan_from_counts(space, order, c) for c in many])
        evals.append((time.perf_counter() - t, len(many)))
        per_candidate.update((c, r.value) for c, r in zip(many, results, strict=True))
        if (len(evals) - 1) % plain_every == 0:
            plains.append(probe.plain_forward_seconds())
        return [r.score for r in results]

    stacked = ev.candidate_batch > 1
    result = search_counts(space, score_many if stacked else score_each(lambda c: score_many([c])[0]), cfg)
    wall = time.perf_counter() - t0 - sum(plains)
    paired = [evals[i * plain_every][0] / evals[i * plain_every][1] / plains[i] for i in range(len(plains))]
    per_eval = sum(s for s, _ in evals) / sum(n for _, n in evals)
    return ev, result, per_candidate, wall, per_eval / statistics.mean(plains), paired


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--data", default=None)
    p.add_argument("--criterion", default="frequency")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--population", type=int, default=16)
    p.add_argument("--generations", type=int, default=10)
    p.add_argument("--search-samples", type=int, default=2, help="windows per domain")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--candidate-batch", type=int, default=8, help="candidates stacked per forward")
    p.add_argument(
        "--cache-mib", type=int, default=512, help="hidden-state cache budget of moeprune's evaluator"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Console(width=190)

    model, tok, model_dir, data_dir = load_testbed(args.model, args.data)
    model.to(args.device)
    calib = token_split(tok, data_dir / "calibration.jsonl", 4, args.seq_len, args.seed)
    order = removal_order_for(model, calib, args.criterion, args.seed)
    search = api.search_set(
        token_split(tok, data_dir / "search.jsonl", args.search_samples, args.seq_len, args.seed)
    )
    space = AllocationSpace.from_layers(moe_layers(model), sparsity=args.sparsity)
    cfg = EvoConfig(population=args.population, generations=args.generations, seed=args.seed)
    out.print(
        f"model {model_dir} | search set {search.num_scored()} scored tokens | {args.criterion} order | "
        f"sparsity {args.sparsity} | population {cfg.population} x {cfg.generations} generations | "
        f"device {args.device}"
    )

    # the plain forward (unit of cost) is timed inside every search, next to its candidates
    probe = CandidateEvaluator(model, search, cache="dense", reuse=False, full_forward=True)
    runs = {
        "moeprune (sparse cache)": dict(cache="sparse", top_k=args.top_k, cache_bytes=args.cache_mib * 2**20),
        "moeprune (dense cache)": dict(cache="dense", cache_bytes=args.cache_mib * 2**20),
        STACKED: dict(
            cache="sparse",
            top_k=args.top_k,
            cache_bytes=args.cache_mib * 2**20,
            candidate_batch=args.candidate_batch,
        ),
        "reference": dict(cache="dense", reuse=False, full_forward=True, head_rows=None),
    }
    res = {name: timed_search(model, search, space, order, cfg, probe, **kw) for name, kw in runs.items()}
    t_plain = statistics.median([probe.plain_forward_seconds() for _ in range(3)])

    (fast_ev, _, fast_vals, *_), (ref_ev, ref, ref_vals, ref_s, *_) = res[SPARSE], res[REF]
    common = sorted(set(fast_vals) & set(ref_vals))
    delta = max(abs(fast_vals[c] - ref_vals[c]) for c in common)
    tau = kendalltau([fast_vals[c] for c in common], [ref_vals[c] for c in common])[0]
    for name in runs:  # the exact (dense) ESAP of every search's best plan
        best = res[name][1].best
        if best not in ref_vals:
            ref_vals[best] = ref_ev.evaluate(plan_from_counts(space, order, best)).value
    ratio_bytes = fast_ev.teacher.nbytes() / ref_ev.teacher.nbytes()

    t = Table(title="EvoESAP search: moeprune vs straightforward reference (same process, same seed)")
    t.add_column("measure")
    for name in runs:
        t.add_column(name, justify="right")
    t.add_column("ratio / goal", justify="right")

    def row(measure: str, cell, goal: str = "") -> None:
        t.add_row(measure, *(cell(name, *res[name]) for name in runs), goal)

    def first(measure: str, value: str, goal: str = "") -> None:  # a value of the sparse run only
        t.add_row(measure, value, *[""] * (len(runs) - 1), goal)

    ours = (SPARSE, DENSE, STACKED)
    first("plain forward of the search set (at the end)", f"{t_plain:.3f}s")
    row("one candidate evaluation / plain forward (mean)", lambda n, ev, r, v, s, ratio, pairs: f"{ratio:.2f}",
        "goal <= 0.8")  # fmt: skip
    row("  median of paired (candidate, next plain forward)",
        lambda n, ev, r, v, s, ratio, pairs: f"{statistics.median(pairs):.2f}")  # fmt: skip
    row("decoder layers run / full forward", lambda n, ev, *_: f"{ev.stats.layer_fraction():.2f}",
        f"hit rate {fast_ev.stats.hit_rate():.0%}")  # fmt: skip
    sparse_best = res[SPARSE][1].best
    bound = shared_prefix_share(space, sparse_best)
    first(
        "  layers a mutant can take from its parent (SPEC mutation, simulated)",
        f"{bound:.2f}",
        f"around {list(sparse_best)}",
    )
    row("  restarts that took the layer's attention output from the cache",
        lambda n, ev, *_: f"{ev.stats.attention_reused}" if ev.reuse else "")  # fmt: skip
    row("teacher cache bytes",
        lambda n, ev, *_: f"{ev.teacher.nbytes() / 2**20:.2f} MiB ({ev.teacher.kind})",
        f"{100 * ratio_bytes:.2f}% (goal <= 2%)")  # fmt: skip
    first("largest |ESAP sparse - dense|", f"{delta:.2e}", f"over {len(common)} common candidates")
    first("  Kendall tau, sparse vs dense ESAP", f"{tau:.3f}", "same candidates")
    row("candidates evaluated", lambda n, ev, r, *_: str(r.evaluations))
    row("whole search wall time", lambda n, ev, r, v, s, *_: f"{s:.1f}s",
        " / ".join(f"{ref_s / res[n][3]:.2f}x" for n in ours) + " (goal >= 3x)")  # fmt: skip
    row("best plan (removed per layer)", lambda n, ev, r, *_: str(list(r.best)),
        " / ".join("same" if res[n][1].best == ref.best else "DIFFERENT" for n in ours))  # fmt: skip
    row("best plan's exact (dense) ESAP", lambda n, ev, r, *_: f"{ref_vals[r.best]:.5f}")
    out.print(t)


SPARSE, DENSE, STACKED, REF = (
    "moeprune (sparse cache)",
    "moeprune (dense cache)",
    "moeprune (sparse, stacked)",
    "reference",
)


if __name__ == "__main__":
    main()
