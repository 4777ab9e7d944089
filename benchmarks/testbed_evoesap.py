"""Uniform vs EvoESAP on the testbed at one sparsity, for several within-layer criteria.

One calibration pass serves every criterion; each criterion gets its own search (same search set,
seed and budget) and both allocations are evaluated by exact masking: ESAP on held-out text (dense
teacher), per-domain perplexity, generation exact match, multiple-choice accuracy. Prints a
markdown table (the README's "EvoESAP on the testbed") and writes the numbers as JSON.

    python benchmarks/testbed_evoesap.py --criteria frequency,reap --sparsity 0.5 \
        --population 16 --generations 10 --json evoesap_testbed.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from moeprune import api
from moeprune.allocate import AllocationSpace, EvoConfig, plan_from_counts, search_counts, uniform_allocation
from moeprune.arch import moe_layers
from moeprune.criteria import removal_order
from moeprune.evolve import progress_bar, score_each
from moeprune.fitness import CandidateEvaluator, SearchSet
from moeprune.testbed import evaluate_plans, heldout_esap, load_testbed, token_split


def fmt_row(name: str, esap: float, res: dict, cost: str) -> str:
    ppl = " | ".join(f"{r['ppl']:.2f}" for r in res["perplexity"].values())
    return (
        f"| {name} | {esap:.4f} | {ppl} | {100 * res['generation']['exact_match']:.1f}% | "
        f"{100 * res['multiple_choice']['accuracy']:.1f}% | {cost} |"
    )


def answers_only(tokens, tok) -> SearchSet:
    """The search windows with only the answers of ``a<op>b=c`` lines scored: the tokens after '='
    up to and including the newline (the testbed's tokenizer has one token per digit)."""
    eq, nl = tok.convert_tokens_to_ids("="), tok("\n")["input_ids"][-1]
    score = torch.zeros_like(tokens.attention_mask, dtype=torch.bool)  # (N, L)
    for i, row in enumerate(tokens.input_ids.tolist()):
        inside = False
        for t, token in enumerate(row):
            if inside:
                score[i, t] = True
                inside = token != nl
            elif token == eq:
                inside = True
    return SearchSet.from_tensors(
        tokens.input_ids, tokens.attention_mask, score & tokens.attention_mask.bool()
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--data", default=None)
    p.add_argument("--criteria", default="frequency,reap")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--population", type=int, default=16)
    p.add_argument("--generations", type=int, default=10)
    p.add_argument("--calib-samples", type=int, default=8, help="windows per domain")
    p.add_argument("--search-samples", type=int, default=2, help="windows per domain")
    p.add_argument(
        "--score-answers",
        action="store_true",
        help="score only the answer tokens of arithmetic lines (after '=' up to the newline)",
    )
    p.add_argument(
        "--search-file", default=None, help="search split (jsonl; default: the testbed's search.jsonl)"
    )
    p.add_argument("--heldout-samples", type=int, default=4, help="windows per domain")
    p.add_argument("--eval-tokens", type=int, default=8000, help="perplexity tokens per domain")
    p.add_argument("--eval-items", type=int, default=200)
    p.add_argument("--fitness", default="esap")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    criteria = [c.strip() for c in args.criteria.split(",")]

    model, tok, model_dir, data_dir = load_testbed(args.model, args.data)
    calib = token_split(tok, data_dir / "calibration.jsonl", args.calib_samples, 256, args.seed)
    stats = api.observe(model, calib, criteria=criteria, seed=args.seed, progress=False)
    search_file = args.search_file or data_dir / "search.jsonl"
    tokens = token_split(tok, search_file, args.search_samples, 256, args.seed)
    search = api.search_set(tokens) if not args.score_answers else answers_only(tokens, tok)
    heldout = api.search_set(
        token_split(tok, data_dir / "test.jsonl", args.heldout_samples, 256, args.seed + 1)
    )
    space = AllocationSpace.from_layers(moe_layers(model), sparsity=args.sparsity)
    uniform = uniform_allocation(space)
    suite = dict(suite_dir=data_dir, max_tokens_per_domain=args.eval_tokens, max_items=args.eval_items)
    report: dict = {
        "settings": vars(args),
        "search_tokens": search.num_scored(),
        "heldout_tokens": heldout.num_scored(),
    }

    base = evaluate_plans(model, tok, {"unpruned": None}, **suite)["unpruned"]
    report["unpruned"] = base
    lines = []
    domains = list(base["perplexity"])
    head = "| allocation | ESAP (held-out) | " + " | ".join(f"ppl {d}" for d in domains)
    lines.append(head + " | generation EM | MC acc. | search cost |")
    lines.append("|" + "---|" * (len(domains) + 5))
    lines.append(fmt_row("unpruned", 1.0, base, "-"))
    for criterion in criteria:
        order = removal_order(stats, criterion, args.seed)
        ev = CandidateEvaluator(model, search, fitness=args.fitness)
        t0 = time.perf_counter()
        with progress_bar("EvoESAP", args.generations) as bar:
            result = search_counts(
                space,
                score_each(
                    lambda c, ev=ev, order=order: ev.evaluate(plan_from_counts(space, order, c)).score
                ),
                EvoConfig(population=args.population, generations=args.generations, seed=args.seed),
                progress=bar,
            )
        wall = time.perf_counter() - t0 + ev.teacher_seconds
        plans = {
            "uniform": plan_from_counts(space, order, uniform),
            "EvoESAP": plan_from_counts(space, order, result.best),
        }
        esap = heldout_esap(model, heldout, plans)
        res = evaluate_plans(model, tok, plans, **suite)
        cost = f"{result.evaluations} candidates, {wall:.0f}s"
        lines.append(fmt_row(f"{criterion}, uniform", esap["uniform"], res["uniform"], "-"))
        lines.append(fmt_row(f"{criterion}, EvoESAP", esap["EvoESAP"], res["EvoESAP"], cost))
        report[criterion] = {
            "removed_per_layer": {"uniform": list(uniform), "EvoESAP": list(result.best)},
            "search_esap": {"uniform": ev.evaluate(plans["uniform"]).value, "EvoESAP": result.best_score},
            "heldout_esap": esap,
            "evaluation": res,
            "search": {"evaluations": result.evaluations, "seconds": wall, "reuse": ev.stats.as_dict()},
            "history": result.history,
        }
        print("\n".join(lines[-2:]), flush=True)
        print(
            f"{criterion}: removed per layer uniform {list(uniform)} EvoESAP {list(result.best)}", flush=True
        )
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
