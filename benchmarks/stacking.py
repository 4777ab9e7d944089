"""Where stacking candidates pays: cost of one candidate / one plain forward vs candidates per forward.

The same short EvoESAP search (same seed) runs once per (search batch size, candidate_batch) pair on
the testbed; every run must end on the same plan. Prints, per pair, the mean evaluation cost of a
candidate over the search in plain forwards of the search set (timed in the same run, same batches).

    python benchmarks/stacking.py [--batch-sizes 2,8] [--stacks 1,4,8] [--device cpu] [--threads 2]
    python benchmarks/stacking.py --device cuda --stacks 1,4,8,16,32
"""

from __future__ import annotations

import argparse

import torch
from rich.console import Console
from rich.table import Table
from search import timed_search  # benchmarks/search.py: one timed search next to plain forwards

from moeprune import api
from moeprune.allocate import AllocationSpace, EvoConfig
from moeprune.arch import moe_layers
from moeprune.fitness import CandidateEvaluator
from moeprune.testbed import load_testbed, removal_order_for, token_split


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--data", default=None)
    p.add_argument("--batch-sizes", type=ints, default=[2, 8], help="search batch sizes (sequences)")
    p.add_argument("--stacks", type=ints, default=[1, 4, 8], help="candidates per forward")
    p.add_argument("--population", type=int, default=16)
    p.add_argument("--generations", type=int, default=6)
    p.add_argument("--search-samples", type=int, default=2, help="windows per domain")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Console(width=150)

    model, tok, _, data_dir = load_testbed(args.model, args.data)
    model.to(args.device)
    calib = token_split(tok, data_dir / "calibration.jsonl", 4, args.seq_len, 0)
    order = removal_order_for(model, calib, "frequency", 0)
    windows = token_split(tok, data_dir / "search.jsonl", args.search_samples, args.seq_len, 0)
    space = AllocationSpace.from_layers(moe_layers(model), sparsity=0.5)
    cfg = EvoConfig(population=args.population, generations=args.generations, seed=0)

    t = Table(title=f"one candidate / plain forward, {windows.input_ids.shape[0]} sequences, {args.device}")
    t.add_column("search batch")
    for c in args.stacks:
        t.add_column(f"{c} per forward", justify="right")
    plans = set()
    for batch_size in args.batch_sizes:
        search = api.search_set(windows, batch_size=batch_size)
        probe = CandidateEvaluator(model, search, cache="dense", reuse=False, full_forward=True)
        probe.plain_forward_seconds()
        cells = []
        for stack in args.stacks:
            _, result, _, _, ratio, _ = timed_search(
                model,
                search,
                space,
                order,
                cfg,
                probe,
                plain_every=1 if stack > 1 else 4,
                candidate_batch=stack,
            )
            plans.add(result.best)
            cells.append(f"{ratio:.2f}")
        t.add_row(str(batch_size), *cells)
    out.print(t)
    out.print(
        f"best plans found: {len(plans)} distinct ({'same plan' if len(plans) == 1 else sorted(plans)})"
    )


if __name__ == "__main__":
    main()
