"""The evaluation suite: per-domain perplexity, generation exact match, multiple-choice accuracy.

A suite directory holds ``test.jsonl`` (held-out text, rows ``{"text", "domain"}``),
``generation.jsonl`` (``{"prompt", "answer"}``), ``multiple_choice.jsonl``
(``{"prompt", "options", "answer"}``) and optionally ``meta.json`` (e.g. the unigram baseline per
domain, copied into the results). The default suite is the bundled testbed data.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

from .generation import generation_exact_match
from .multiple_choice import multiple_choice_accuracy
from .perplexity import perplexity_by_domain


def default_suite_dir() -> Path:
    """The testbed evaluation data shipped with the package."""
    return Path(str(resources.files("moeprune") / "assets" / "testbed" / "data"))


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def evaluate_suite(
    model,
    tokenizer,
    suite_dir: str | Path | None = None,
    max_tokens_per_domain: int | None = 20_000,
    max_items: int | None = None,
    max_new_tokens: int = 6,
) -> dict:
    """Run every task found in ``suite_dir`` (default: bundled testbed data) and return

    ``{"perplexity": {domain: {"ppl", "nll", "tokens"}}, "generation": {"exact_match", "n"},
    "multiple_choice": {"accuracy", "n"}, "baseline": {...} (from meta.json), "seconds": {...}}``.
    ``max_items`` caps the number of generation / multiple-choice items (first ones)."""
    suite = Path(suite_dir) if suite_dir is not None else default_suite_dir()
    res: dict = {"suite": str(suite), "seconds": {}}
    if (suite / "test.jsonl").exists():
        t = time.perf_counter()
        rows = read_jsonl(suite / "test.jsonl")
        res["perplexity"] = perplexity_by_domain(model, tokenizer, rows, max_tokens_per_domain)
        res["seconds"]["perplexity"] = round(time.perf_counter() - t, 2)
    if (suite / "generation.jsonl").exists():
        t = time.perf_counter()
        items = read_jsonl(suite / "generation.jsonl")[:max_items]
        res["generation"] = generation_exact_match(model, tokenizer, items, max_new_tokens=max_new_tokens)
        res["seconds"]["generation"] = round(time.perf_counter() - t, 2)
    if (suite / "multiple_choice.jsonl").exists():
        t = time.perf_counter()
        items = read_jsonl(suite / "multiple_choice.jsonl")[:max_items]
        res["multiple_choice"] = multiple_choice_accuracy(model, tokenizer, items)
        res["seconds"]["multiple_choice"] = round(time.perf_counter() - t, 2)
    if (suite / "meta.json").exists():
        meta = json.loads((suite / "meta.json").read_text())
        if "unigram_ppl" in meta:
            res["baseline"] = {"unigram_ppl": meta["unigram_ppl"]}
    return res
