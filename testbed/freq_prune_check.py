"""Sensitivity check: remove the least-frequently-routed experts uniformly and re-run the suite.

A throwaway stand-in for ``moeprune.surgery`` (Qwen3-MoE only): counts top-k hits per expert on the
calibration split, slices the router rows and the fused expert tensors of the kept experts, and
evaluates the pruned model with ``moeprune.evaluate``.

Usage::

    python testbed/freq_prune_check.py --remove 16 [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moeprune.evaluate import default_suite_dir, evaluate_suite, read_jsonl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plots import routing_hits  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "src" / "moeprune" / "assets" / "testbed"


def routing_counts(model, tok, rows: list[dict]) -> torch.Tensor:
    """(layers, experts) number of calibration tokens (all domains) whose top-k contains each expert."""
    hits, _ = routing_hits(model, tok, rows)
    return sum(hits.values())


def prune_uniform(model, counts: torch.Tensor, n_remove: int) -> dict[int, list[int]]:
    """Keep the (E - n_remove) most-routed experts of every layer, in their original order."""
    kept = {}
    for layer, block in enumerate(model.model.layers):
        mlp = block.mlp
        keep = sorted(counts[layer].argsort(descending=True)[: counts.shape[1] - n_remove].tolist())
        idx = torch.tensor(keep)
        mlp.gate.weight = torch.nn.Parameter(mlp.gate.weight.data[idx].clone())
        mlp.experts.gate_up_proj = torch.nn.Parameter(mlp.experts.gate_up_proj.data[idx].clone())
        mlp.experts.down_proj = torch.nn.Parameter(mlp.experts.down_proj.data[idx].clone())
        mlp.gate.num_experts = mlp.experts.num_experts = len(keep)
        kept[layer] = keep
    model.config.num_experts = counts.shape[1] - n_remove
    return kept


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ASSETS / "model")
    p.add_argument("--remove", type=int, nargs="+", default=[16])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    counts = routing_counts(model, tok, read_jsonl(default_suite_dir() / "calibration.jsonl"))
    results = {"0": evaluate_suite(model, tok)}
    for n in args.remove:
        m = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        prune_uniform(m, counts, n)
        results[str(n)] = evaluate_suite(m, tok)
    summary = {
        n: {
            "gen_em": r["generation"]["exact_match"],
            "mc_acc": r["multiple_choice"]["accuracy"],
            "ppl": {d: round(v["ppl"], 2) for d, v in r["perplexity"].items()},
        }
        for n, r in results.items()
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.write_text(
            json.dumps({"summary": summary, "results": results}, indent=1, default=str) + "\n"
        )


if __name__ == "__main__":
    main()
