"""The teacher caches side by side on the testbed: bytes, exactness and cost per candidate.

For the same search set and the same candidates (the EvoESAP initial population and mutants of the
uniform plan), ESAP is computed against a dense cache (exact, T x V float32), the top-K sparse cache
(its reported upper bound), the nucleus cache (mass 0.95 capped at K; the midpoint of its bound)
and the hidden-state cache (T x H, p recomputed with the LM head):
largest |ESAP - dense| over the candidates, bytes on the testbed and per scored token at
Qwen3's V = 151,936, H = 2048, and seconds per candidate (same process, interleaved).

    python benchmarks/teacher_cache.py [--candidates 24] [--samples 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from moeprune.allocate import AllocationSpace, EvoConfig, initial_population, mutate, plan_from_counts
from moeprune.arch import moe_layers
from moeprune.fitness import CandidateEvaluator, SearchSet
from moeprune.testbed import load_testbed, removal_order_for, token_split

QWEN3 = {"V": 151_936, "H": 2048, "K": 64}


def per_token_bytes(kind: str, vocab: int, hidden: int, k: int, hidden_bytes: int = 4) -> int:
    """Bytes one scored token costs in each cache (sparse: K float32 probs + K ids + the tail)."""
    ids = 2 if vocab <= 32767 else 4
    sparse = k * (4 + ids) + 4  # nucleus: stored padded to K like the sparse cache
    return {"dense": 4 * vocab, "sparse": sparse, "nucleus": sparse, "hidden": hidden_bytes * hidden}[kind]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", type=int, default=24)
    ap.add_argument("--samples", type=int, default=2, help="search windows per domain")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok, _, data = load_testbed()
    search = SearchSet.from_tokens(token_split(tok, data / "search.jsonl", args.samples, args.seq_len))
    order = removal_order_for(
        model, token_split(tok, data / "calibration.jsonl", 4, args.seq_len), "frequency"
    )
    space = AllocationSpace.from_layers(moe_layers(model), sparsity=0.5)
    rng = np.random.Generator(np.random.PCG64(0))
    counts = list(dict.fromkeys(initial_population(space, EvoConfig(population=12), rng)))
    while len(counts) < args.candidates:
        counts = list(
            dict.fromkeys([*counts, mutate(space, counts[int(rng.integers(len(counts)))], EvoConfig(), rng)])
        )
    plans = [plan_from_counts(space, order, c) for c in counts[: args.candidates]]
    kinds = ("dense", "sparse", "nucleus", "hidden")
    evs = {k: CandidateEvaluator(model, search, cache=k, top_k=args.top_k, reuse=False) for k in kinds}
    values = {k: [] for k in kinds}
    seconds = {k: 0.0 for k in kinds}
    for plan in plans:
        for k in kinds:  # interleaved: the same load for each
            t0 = time.perf_counter()
            values[k].append(evs[k].evaluate(plan).value)
            seconds[k] += time.perf_counter() - t0
    cfg = model.config.get_text_config()
    load = os.getloadavg()
    print(f"testbed: V={cfg.vocab_size}, H={cfg.hidden_size}, {search.num_scored()} scored tokens, "
          f"{len(plans)} candidates (50% sparsity), {args.threads} threads, load average {load[0]:.1f}")  # fmt: skip
    print(f"{'cache':<8}{'bytes':>12}{'% dense':>9}{'max |dESAP|':>13}{'s/cand':>8}"
          f"{'B/token @151k':>15}{'% dense @151k':>15}")  # fmt: skip
    dense_tok = per_token_bytes("dense", QWEN3["V"], QWEN3["H"], QWEN3["K"])
    for k in kinds:
        nbytes = evs[k].teacher.nbytes()
        delta = max(abs(a - b) for a, b in zip(values[k], values["dense"], strict=True))
        tok_bytes = per_token_bytes(k, QWEN3["V"], QWEN3["H"], QWEN3["K"])
        print(f"{k:<8}{nbytes:>12,}{100 * nbytes / evs['dense'].teacher.nbytes():>8.2f}%{delta:>13.2e}"
              f"{seconds[k] / len(plans):>8.3f}{tok_bytes:>15,}{100 * tok_bytes / dense_tok:>14.2f}%")  # fmt: skip
    bf16 = per_token_bytes("hidden", QWEN3["V"], QWEN3["H"], QWEN3["K"], hidden_bytes=2)
    print(
        f"(hidden in bf16, as a bf16 model's final states are: {bf16:,} B/token, {100 * bf16 / dense_tok:.2f}% of dense)"
    )


if __name__ == "__main__":
    main()
