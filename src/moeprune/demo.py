"""`moeprune demo`: on the bundled testbed, observe -> EvoESAP search -> prune -> evaluate against
the unpruned model and uniform pruning. It is one recipe, run by the one pipeline."""

from __future__ import annotations

import os
from pathlib import Path

from .recipe import Recipe, cpu_dtype
from .testbed import check_testbed


def demo_recipe(
    out: str | Path,
    *,
    model_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    criterion: str = "frequency",
    sparsity: float = 0.5,
    population: int = 16,
    generations: int = 10,
    seed: int = 0,
    calib_samples: int = 8,
    search_prompts: int = 256,
    gen_tokens: int = 8,
    heldout_samples: int = 2,
    seq_len: int = 256,
    eval_tokens_per_domain: int = 2000,
    eval_items: int = 60,
) -> Recipe:
    """The demo as a recipe. The search data is on-policy: `search_prompts` arithmetic questions of
    the search split, answered by the unpruned model (up to `gen_tokens`, one line), only its answers
    scored. Other sample counts are per domain (`calib_samples`, `heldout_samples` windows of `seq_len`
    tokens); the suite is capped at `eval_tokens_per_domain`
    tokens and `eval_items` items; the model runs in its bfloat16 where the CPU computes bfloat16
    natively, else in float32 (`recipe.cpu_dtype`), on one torch thread unless OMP_NUM_THREADS says
    otherwise."""
    model_dir, data_dir = check_testbed(model_dir, data_dir)

    def split(name: str, samples: int, data_seed: int | None = None) -> dict:
        return {
            "data": str(data_dir / name),
            "samples": samples,
            "seq_len": seq_len,
            "per_domain": True,
            "seed": data_seed,
        }

    return Recipe.build(
        {
            "model": str(model_dir),
            "out": str(out),
            "allocation": "evoesap",
            "sparsity": sparsity,
            "criterion": criterion,
            "calibration": split("calibration.jsonl", calib_samples),
            "search": {
                "data": {"data": str(data_dir / "search_prompts.jsonl"), "samples": search_prompts},
                "gen_tokens": gen_tokens,
                "gen_stop": "\n",
                "population": population,
                "generations": generations,
            },
            "evaluate": {
                "suite": str(data_dir),
                "max_items": eval_items,
                "max_tokens_per_domain": eval_tokens_per_domain,
                "baselines": True,
                "heldout": split("test.jsonl", heldout_samples, seed + 1),
            },
            "seed": seed,
            "dtype": cpu_dtype(),
            # the testbed's operations are too small to split: on the idle 2-core machine the demo took
            # 26.7-27.5 s with one thread against 32.3-34.4 s with torch's two (docs/results.md); a
            # user's OMP_NUM_THREADS is kept
            "threads": None if "OMP_NUM_THREADS" in os.environ else 1,
        },
        "demo: ",
    )
