"""Render evaluation results as a rich table and write them as JSON."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table


def format_table(results: dict, title: str = "Evaluation") -> Table:
    """One row per metric: perplexity per domain (with the unigram baseline when known),
    generation exact match, multiple-choice accuracy."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("baseline", justify="right")
    uni = results.get("baseline", {}).get("unigram_ppl", {})
    for dom, r in results.get("perplexity", {}).items():
        base = f"{uni[dom]:.1f} (unigram)" if dom in uni else ""
        table.add_row(f"perplexity ({dom})", f"{r['ppl']:.2f}", base)
    if "generation" in results:
        g = results["generation"]
        table.add_row("generation exact match", f"{100 * g['exact_match']:.1f}%", f"n={g['n']}")
    if "multiple_choice" in results:
        m = results["multiple_choice"]
        table.add_row("multiple-choice accuracy", f"{100 * m['accuracy']:.1f}%", f"n={m['n']}")
    return table


def suite_cells(results: dict) -> dict[str, str]:
    """{metric: formatted value} of `evaluate_suite` results (perplexity per domain, exact match, MC)."""
    cells = {f"ppl[{d}]": f"{v['ppl']:.2f}" for d, v in results.get("perplexity", {}).items()}
    if "generation" in results:
        cells["generation exact match"] = f"{100 * results['generation']['exact_match']:.1f}%"
    if "multiple_choice" in results:
        cells["multiple-choice acc."] = f"{100 * results['multiple_choice']['accuracy']:.1f}%"
    return cells


def lm_eval_cells(results: dict[str, dict[str, float]]) -> dict[str, str]:
    """{"task: metric (n docs)": value} of `lm_eval_tasks` results."""
    return {
        f"{task}: {metric} (n={m.get('n', '?')})": f"{value:.4f}"
        for task, m in results.items()
        for metric, value in m.items()
        if metric != "n"
    }


def write_json(results: dict, path: str | Path) -> Path:
    """Write ``results`` as indented JSON (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    return path
