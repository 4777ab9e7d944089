"""Sensitivity of the testbed's evaluation suite to pruning, through moeprune's own core.

For each sparsity: observe routing frequency on the whole calibration split (one pass, all domains),
remove the least-routed experts uniformly with the core surgery (`api.prune_by_criterion`, the code
behind ``moeprune prune --criterion frequency``), and run the suite (`moeprune.evaluate`) on the
structurally pruned model. Writes ``prune_check.json`` next to the bundled model.

Usage::

    python testbed/prune_check.py [--sparsity 0.5 0.75] [--model DIR] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moeprune import api
from moeprune.evaluate import default_suite_dir, evaluate_suite

ASSETS = Path(__file__).resolve().parents[1] / "src" / "moeprune" / "assets" / "testbed"


def summarise(result: dict) -> dict:
    return {
        "gen_em": result["generation"]["exact_match"],
        "mc_acc": result["multiple_choice"]["accuracy"],
        "ppl": {d: round(v["ppl"], 2) for d, v in result["perplexity"].items()},
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ASSETS / "model")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.75])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--out", type=Path, default=ASSETS / "prune_check.json")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)

    def fresh():
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)

    model = fresh()
    calib = api.load_calibration(default_suite_dir() / "calibration.jsonl", tok, seq_len=args.seq_len)
    stats = api.observe(model, calib, criteria=["frequency"], progress=False)
    results = {"0": evaluate_suite(model, tok)}
    for sparsity in args.sparsity:
        pruned = fresh()
        api.prune_by_criterion(pruned, "frequency", stats=stats, sparsity=sparsity)
        results[str(sparsity)] = evaluate_suite(pruned, tok)
    summary = {k: summarise(r) for k, r in results.items()}
    print(json.dumps(summary, indent=1))
    meta = {"criterion": "frequency", "calibration_tokens": int(calib.num_tokens), "seq_len": args.seq_len}
    args.out.write_text(json.dumps({"meta": meta, "summary": summary, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
