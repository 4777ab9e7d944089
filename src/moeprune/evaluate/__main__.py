"""``python -m moeprune.evaluate MODEL_DIR [--suite DIR] [--out report.json]``: run the suite, print the table."""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer

from . import evaluate_suite, format_table, write_json


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m moeprune.evaluate", description=__doc__)
    p.add_argument("model_dir")
    p.add_argument("--suite", default=None, help="suite directory (default: bundled testbed data)")
    p.add_argument("--out", default=None, help="write results as JSON here")
    p.add_argument("--max-items", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args(argv)
    t = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=getattr(torch, args.dtype))
    res = evaluate_suite(model, tok, args.suite, max_items=args.max_items)
    res["model"] = args.model_dir
    res["seconds"]["total"] = round(time.perf_counter() - t, 2)
    Console().print(format_table(res, title=f"moeprune evaluate: {args.model_dir}"))
    if args.out:
        write_json(res, args.out)
    return res


if __name__ == "__main__":
    main()
