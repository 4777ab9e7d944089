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

from ._util import layer_by_layer
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
    if (suite / "generation.jsonl").exists() and not layer_by_layer(model):  # one stream per token: not run
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


def evaluate_model(
    model,
    tokenizer,
    *,
    suite: str | Path | None = "testbed",
    lm_eval: tuple[str, ...] | list[str] = (),
    limit: int | float | None = None,
    max_items: int | None = None,
    max_tokens_per_domain: int | None = 20_000,
    lm_eval_include: str | Path | None = None,
) -> dict:
    """Evaluate a loaded model: ``{"suite": evaluate_suite(...), "lm_eval": {task: {metric: value}}}``.

    `suite`: a suite directory, "testbed" (the bundled one) or None. `lm_eval`: lm-eval task names,
    run in process on this model; ``moeprune_mc`` / ``moeprune_generation`` are the suite's own sets
    (the testbed's when `suite` is None). `limit` caps lm-eval documents per task, `max_items` the
    suite's generation / multiple-choice items."""
    import tempfile

    from ..errors import MoepruneError
    from .lm_eval_bridge import lm_eval_tasks, suite_task_dir

    suite_dir = default_suite_dir() if suite == "testbed" else (Path(suite) if suite is not None else None)
    if suite_dir is not None and not suite_dir.is_dir():
        raise MoepruneError(f"suite directory {suite_dir} does not exist (a folder with test.jsonl, ...)")
    if lm_eval and layer_by_layer(model):
        raise MoepruneError("lm-eval tasks need the model in memory; layer by layer, evaluate the suite only")
    out: dict = {}
    if suite_dir is not None:
        out["suite"] = evaluate_suite(
            model, tokenizer, suite_dir, max_tokens_per_domain=max_tokens_per_domain, max_items=max_items
        )
    if lm_eval:
        with tempfile.TemporaryDirectory() as tmp:
            include = [suite_task_dir(suite_dir or default_suite_dir(), tmp)]  # SUITE_TASKS
            if lm_eval_include is not None:
                include.append(lm_eval_include)
            out["lm_eval"] = lm_eval_tasks(model, tokenizer, list(lm_eval), limit=limit, include_path=include)
    return out
