"""Tables of results: one builder for the terminal (rich) and Markdown (model cards, docs), and the
cells of evaluation results.

    columns = {"unpruned": suite_cells(r0), "pruned": suite_cells(r1)}    # {column: {row: cell}}
    console.print(table(columns, "Evaluation"))                           # rich, rows = metrics
    markdown_table(columns)                                               # the same as Markdown
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from rich.markup import escape
from rich.table import Table

Columns = Mapping[str, Mapping[str, str]]  # {column: {row: cell}}


def _rows(columns: Columns) -> list[str]:
    rows: list[str] = []
    for col in columns.values():
        rows += [r for r in col if r not in rows]
    return rows


def table(columns: Columns, title: str = "") -> Table:
    """{column: {row: cell}} -> a rich table (rows in first-seen order, one column per key)."""
    out = Table(title=title or None)
    out.add_column("metric")
    for name in columns:
        out.add_column(escape(name), justify="right")
    for row in _rows(columns):
        out.add_row(escape(row), *(escape(columns[n].get(row, "")) for n in columns))
    return out


def markdown_table(columns: Columns) -> str:
    """{column: {row: cell}} -> a Markdown table (rows in first-seen order)."""
    names = list(columns)
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += [f"| {r} | " + " | ".join(columns[n].get(r, "") for n in names) + " |" for r in _rows(columns)]
    return "\n".join(lines)


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


def evaluation_cells(result: dict) -> dict[str, str]:
    """Every cell of one `api.evaluate` result: held-out ESAP, the suite, lm-eval."""
    esap = {"ESAP (held-out)": f"{result['heldout_esap']:.4f}"} if "heldout_esap" in result else {}
    return esap | suite_cells(result.get("suite", {})) | lm_eval_cells(result.get("lm_eval", {}))


def format_table(results: dict, title: str = "Evaluation") -> Table:
    """One suite result with its baselines: perplexity per domain (unigram baseline when known),
    generation exact match, multiple-choice accuracy."""
    uni = results.get("baseline", {}).get("unigram_ppl", {})
    value = suite_cells(results)
    base = {f"ppl[{d}]": f"{uni[d]:.1f} (unigram)" for d in results.get("perplexity", {}) if d in uni}
    for key, name in (("generation", "generation exact match"), ("multiple_choice", "multiple-choice acc.")):
        if key in results:
            base[name] = f"n={results[key]['n']}"
    return table({"value": value, "baseline": base}, title)


def write_json(results: dict, path: str | Path) -> Path:
    """Write ``results`` as indented JSON (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def run_summary(result) -> list:
    """What a finished run (`pipelines.RunResult`) shows: its evaluation table, then one line with the
    choice, the output, the time and the memory it took."""
    from .memory import memory_line

    shown: list = []
    if result.evaluation:
        shown.append(
            table({n: evaluation_cells(r) for n, r in result.evaluation.items()}, result.choice.label)
        )
    shown.append(
        f"{result.choice.summary} -> {result.out} ({result.seconds:.0f}s; {memory_line(result.memory)})"
    )
    return shown
