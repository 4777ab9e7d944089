"""EvoESAP search cost, side by side in one run on the testbed (or any model + data splits).

Prints:
1. one candidate evaluation / one plain forward over the search set, averaged over a search
   (reuse of cached hidden states; goal <= 0.8), with the hidden-state cache hit rate;
2. teacher cache bytes, top-K sparse / dense (goal <= 2%), and the largest |ESAP_sparse - ESAP_dense|
   over every candidate both searches scored;
3. wall time of a whole search (teacher cache + evolution) vs a straightforward reference (dense
   full-vocabulary cache, a full forward per candidate), same seed: speed-up and whether the
   best plans agree.

    python benchmarks/search.py [--model DIR --data DIR] [--population 16 --generations 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table
from scipy.stats import kendalltau

from moeprune import api
from moeprune.allocate import AllocationSpace, EvoConfig, evolve, plan_from_counts
from moeprune.arch import moe_layers
from moeprune.demo import load_testbed, removal_order_for, token_split
from moeprune.fitness import CandidateEvaluator


def timed_search(model, search, space, order, cfg, probe, plain_every: int = 4, **evaluator_kwargs):
    """A whole search; every `plain_every` candidates one plain forward is timed right after the
    candidate (same load on this shared machine), and excluded from the search's wall time."""
    t0 = time.perf_counter()
    ev = CandidateEvaluator(model, search, **evaluator_kwargs)
    per_candidate, evals, plains = {}, [], []

    def score(counts):
        t = time.perf_counter()
        r = ev.evaluate(plan_from_counts(space, order, counts))
        evals.append(time.perf_counter() - t)
        per_candidate[counts] = r.value
        if len(evals) % plain_every == 1:
            plains.append(probe.plain_forward_seconds())
        return r.score

    result = evolve(space, score, cfg)
    wall = time.perf_counter() - t0 - sum(plains)
    paired = [evals[i * plain_every] / plains[i] for i in range(len(plains))]
    return ev, result, per_candidate, wall, sum(evals) / sum(plains) * len(plains) / len(evals), paired


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
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Console()

    model, tok, model_dir, data_dir = load_testbed(args.model, args.data)
    calib = token_split(tok, data_dir / "calibration.jsonl", 4, args.seq_len, args.seed)
    order = removal_order_for(model, calib, args.criterion, args.seed)
    search = api.search_set(
        token_split(tok, data_dir / "search.jsonl", args.search_samples, args.seq_len, args.seed)
    )
    space = AllocationSpace.from_layers(moe_layers(model), sparsity=args.sparsity)
    cfg = EvoConfig(population=args.population, generations=args.generations, seed=args.seed)
    out.print(
        f"model {model_dir} | search set {search.num_scored()} scored tokens | {args.criterion} order | "
        f"sparsity {args.sparsity} | population {cfg.population} x {cfg.generations} generations"
    )

    # the plain forward (unit of cost) is timed inside both searches, next to their candidates
    probe = CandidateEvaluator(model, search, cache="dense", reuse=False, full_forward=True)
    fast_ev, fast, fast_vals, fast_s, fast_ratio, fast_pairs = timed_search(
        model, search, space, order, cfg, probe, cache="sparse", top_k=args.top_k
    )
    ref_ev, ref, ref_vals, ref_s, ref_ratio, ref_pairs = timed_search(
        model, search, space, order, cfg, probe, cache="dense", reuse=False, full_forward=True, head_rows=None
    )
    t_plain = statistics.median([probe.plain_forward_seconds() for _ in range(3)])

    common = sorted(set(fast_vals) & set(ref_vals))
    delta = max(abs(fast_vals[c] - ref_vals[c]) for c in common)
    tau = kendalltau([fast_vals[c] for c in common], [ref_vals[c] for c in common])[0]
    if fast.best not in ref_vals:  # the exact (dense) ESAP of the plan the sparse search chose
        ref_vals[fast.best] = ref_ev.evaluate(plan_from_counts(space, order, fast.best)).value
    ratio_bytes = fast_ev.teacher.nbytes() / ref_ev.teacher.nbytes()

    t = Table(title="EvoESAP search: moeprune vs straightforward reference (same process, same seed)")
    t.add_column("measure")
    t.add_column("moeprune", justify="right")
    t.add_column("reference", justify="right")
    t.add_column("ratio / goal", justify="right")
    t.add_row("plain forward of the search set (at the end)", f"{t_plain:.3f}s", "", "")
    t.add_row(
        "one candidate evaluation / plain forward (mean)",
        f"{fast_ratio:.2f}",
        f"{ref_ratio:.2f}",
        "goal <= 0.8",
    )
    t.add_row(
        "  median of paired (candidate, next plain forward)",
        f"{statistics.median(fast_pairs):.2f}",
        f"{statistics.median(ref_pairs):.2f}",
        "",
    )
    t.add_row(
        "decoder layers run / full forward",
        f"{fast_ev.stats.layer_fraction():.2f}",
        f"{ref_ev.stats.layer_fraction():.2f}",
        f"hit rate {fast_ev.stats.hit_rate():.0%}",
    )
    t.add_row(
        "  restarts that reused the layer's attention output",
        str(fast_ev.stats.attention_reused),
        "",
        f"of {fast_ev.stats.evaluations} candidates",
    )
    t.add_row(
        "teacher cache bytes",
        f"{fast_ev.teacher.nbytes() / 2**20:.2f} MiB (top-{args.top_k})",
        f"{ref_ev.teacher.nbytes() / 2**20:.2f} MiB (dense)",
        f"{100 * ratio_bytes:.2f}% (goal <= 2%)",
    )
    t.add_row("largest |ESAP sparse - dense|", f"{delta:.2e}", "", f"over {len(common)} common candidates")
    t.add_row("  Kendall tau, sparse vs dense ESAP", f"{tau:.3f}", "", "same candidates")
    t.add_row("candidates evaluated", str(fast.evaluations), str(ref.evaluations), "")
    t.add_row(
        "whole search wall time", f"{fast_s:.1f}s", f"{ref_s:.1f}s", f"{ref_s / fast_s:.2f}x (goal >= 3x)"
    )
    t.add_row(
        "best plan (removed per layer)",
        str(list(fast.best)),
        str(list(ref.best)),
        "same" if fast.best == ref.best else "DIFFERENT",
    )
    t.add_row(
        "best ESAP (dense value)", f"{ref_vals.get(fast.best, float('nan')):.5f}", f"{ref.best_score:.5f}", ""
    )
    out.print(t)


if __name__ == "__main__":
    main()
