"""EEP on the testbed: a criterion's choice vs EEP's prune phase vs prune + merge phases.

Same counts for every plan (uniform sparsity). The criterion's plan seeds the EEP prune population
(with random selections), so the search starts from it and can only improve the search-set ESAP;
the merge phase starts from the prune phase's selection (one-hot M) and folds every expert into the
kept ones. Pruned plans are evaluated by exact masking, the merged model structurally (merged, then
non-anchors removed): ESAP on held-out text (dense teacher), per-domain perplexity, generation exact
match and multiple-choice accuracy.

    python benchmarks/testbed_eep.py [--criterion frequency] [--sparsity 0.5] \
        [--population 16] [--iterations 30] [--merge-iterations 40] [--active-experts K] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console

from moeprune import api
from moeprune.criteria import choose_removed
from moeprune.evaluate import evaluate_suite
from moeprune.fitness import CandidateEvaluator
from moeprune.merge.active import reduced_active_experts, set_active_experts_
from moeprune.merge.merging import merge_experts_
from moeprune.plan import uniform_counts
from moeprune.testbed import comparison_table, evaluate_plans, load_testbed, token_split


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--data", default=None)
    p.add_argument("--criterion", default="frequency")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--population", type=int, default=16)
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--merge-population", type=int, default=8)
    p.add_argument("--merge-iterations", type=int, default=40)
    p.add_argument("--active-experts", type=int, default=None, help="route EEP's models to k' experts")
    p.add_argument("--calib-samples", type=int, default=8, help="windows per domain")
    p.add_argument("--search-samples", type=int, default=2, help="windows per domain")
    p.add_argument("--heldout-samples", type=int, default=2, help="windows per domain")
    p.add_argument("--eval-tokens", type=int, default=2000, help="perplexity tokens per domain")
    p.add_argument("--eval-items", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Console(width=120)

    model, tok, _, data_dir = load_testbed(args.model, args.data)
    calib = token_split(tok, data_dir / "calibration.jsonl", args.calib_samples, 256, args.seed)
    stats = api.observe(model, calib, criteria=[args.criterion], progress=False)
    criterion_plan = choose_removed(stats, args.criterion, uniform_counts(stats, args.sparsity), args.seed)
    search = api.search_set(token_split(tok, data_dir / "search.jsonl", args.search_samples, 256, args.seed))
    k = args.active_experts
    t0 = time.perf_counter()
    result = api.eep_prune(
        model, search, sparsity=args.sparsity, population=args.population, iterations=args.iterations,
        seed=args.seed, seeds=(criterion_plan,), active_experts=k,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    merged_result = api.eep_merge(
        model, search, result.best, population=args.merge_population, iterations=args.merge_iterations,
        seed=args.seed, active_experts=k,
    )  # fmt: skip
    merge_seconds = time.perf_counter() - t1
    suffix = f", top-{k}" if k else ""
    eep_name, merged_name = f"EEP prune{suffix}", f"EEP prune + merge{suffix}"
    plans = {"unpruned": None, args.criterion: criterion_plan}
    heldout = api.search_set(
        token_split(tok, data_dir / "test.jsonl", args.heldout_samples, 256, args.seed + 1)
    )
    suite = dict(suite_dir=data_dir, max_tokens_per_domain=args.eval_tokens, max_items=args.eval_items)
    teacher = CandidateEvaluator(
        model, heldout, cache="dense", reuse=False
    )  # the full model, top-k as trained
    esap = {name: teacher.evaluate(plan or {}).value for name, plan in plans.items()}
    results = evaluate_plans(model, tok, plans, **suite)
    if k:  # the criterion's plan routed to k' experts, without any search
        reduced = f"{args.criterion}{suffix}"
        with reduced_active_experts(model, k):
            esap[reduced] = teacher.evaluate(criterion_plan).value
            results |= evaluate_plans(model, tok, {reduced: criterion_plan}, **suite)
    with reduced_active_experts(model, k):
        esap[eep_name] = teacher.evaluate(result.best).value
        results |= evaluate_plans(model, tok, {eep_name: result.best}, **suite)
    merged = copy.deepcopy(model)
    merge_experts_(merged, merged_result.best)
    if k:
        set_active_experts_(merged, k)
    esap[merged_name] = teacher.score_logits(forward(merged, heldout)).value
    results[merged_name] = evaluate_suite(merged, tok, **suite)
    speed = statistics.median(timed(model, heldout) / timed(merged, heldout) for _ in range(3))
    title = f"{args.criterion} vs EEP at {args.sparsity:.0%} sparsity (uniform counts, testbed)"
    out.print(comparison_table(results, esap, title))
    out.print(
        f"prune phase: search ESAP, best of the initial population {result.history[0]['best']:.5f} -> "
        f"{result.best_score:.5f}; {result.evaluations} candidates, {seconds:.0f}s"
    )
    changed = {
        i: len(set(result.best.removed[i]) - set(criterion_plan.removed[i])) for i in result.best.removed
    }
    out.print(f"experts swapped relative to {args.criterion}, per layer: {changed}")
    out.print(
        f"merge phase: search ESAP {merged_result.start_score:.5f} (pruned) -> {merged_result.best_score:.5f}; "
        f"{merged_result.evaluations} candidates, {merge_seconds:.0f}s"
    )
    out.print(f"forward over the held-out set, unpruned / {merged_name}: {speed:.2f}x (median of 3)")
    if args.json:
        report = {
            "settings": vars(args),
            "prune_search": {
                "evaluations": result.evaluations,
                "seconds": round(seconds, 1),
                "history": result.history,
            },
            "merge_search": {
                "evaluations": merged_result.evaluations,
                "seconds": round(merge_seconds, 1),
                "history": merged_result.history,
                "start_score": merged_result.start_score,
            },
            "plans": {name: (plan.to_dict() if plan is not None else None) for name, plan in plans.items()}
            | {eep_name: result.best.to_dict()},
            "heldout_esap": esap,
            "evaluation": results,
            "forward_speedup": speed,
        }
        Path(args.json).write_text(json.dumps(report, indent=1, default=str) + "\n")


def forward(model, search) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits for b in search.batches]


def timed(model, search) -> float:
    t = time.perf_counter()
    forward(model, search)
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
