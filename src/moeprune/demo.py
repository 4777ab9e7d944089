"""`moeprune demo`: observe -> EvoESAP search -> prune -> evaluate against uniform, on the testbed.

Also the helpers the benchmarks share: load the bundled testbed, a criterion's removal order,
token splits as search sets, held-out ESAP and the evaluation suite of plans applied by masking.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

import torch
from rich.markup import escape
from rich.table import Table

from .errors import MoepruneError
from .evaluate.report import suite_cells
from .plan import ExpertPlan
from .surgery import mask_experts
from .surgery.card import markdown_table


def testbed_dirs() -> tuple[Path, Path]:
    """(model dir, data dir) of the testbed shipped in the package."""
    root = Path(str(resources.files("moeprune") / "assets" / "testbed"))
    return root / "model", root / "data"


def load_testbed(model_dir: str | Path | None = None, data_dir: str | Path | None = None):
    """(model in float32, tokenizer, model dir, data dir); float32 is the fast dtype on CPU."""
    from . import api

    default_model, default_data = testbed_dirs()
    model_dir = Path(model_dir or default_model)
    data_dir = Path(data_dir or default_data)
    if not (model_dir / "config.json").exists():
        raise MoepruneError(
            f"no testbed model at {model_dir}: build it with testbed/train.py and testbed/export.py "
            "(or pass a model directory)"
        )
    for name in ("calibration.jsonl", "search.jsonl"):
        if not (data_dir / name).exists():
            raise MoepruneError(
                f"the testbed data split {data_dir / name} is missing (testbed/export.py writes it)"
            )
    model = api.load(model_dir, dtype=torch.float32)
    return model, api.load_tokenizer(model_dir), model_dir, data_dir


def token_split(
    tokenizer, path: str | Path, num_samples: int, seq_len: int, seed: int = 0, per_domain: bool = True
):
    from . import api

    return api.load_calibration(
        path, tokenizer, seq_len=seq_len, num_samples=num_samples, per_domain=per_domain, seed=seed
    )


def removal_order_for(model, calibration, criterion: str, seed: int = 0, progress: bool = False):
    """The criterion's within-layer removal order from one calibration pass."""
    from . import api
    from .criteria import removal_order

    stats = api.observe(model, calibration, criteria=[criterion], seed=seed, progress=progress)
    return removal_order(stats, criterion, seed)


def heldout_esap(model, heldout, plans: dict[str, ExpertPlan | None]) -> dict[str, float]:
    """ESAP of each plan on held-out text, against a dense teacher cache (exact)."""
    from .fitness import CandidateEvaluator

    ev = CandidateEvaluator(model, heldout, cache="dense", reuse=False)
    return {name: ev.evaluate(plan or {}).value for name, plan in plans.items()}


def evaluate_plans(model, tokenizer, plans: dict[str, ExpertPlan | None], **suite_kwargs) -> dict[str, dict]:
    """The evaluation suite on the model masked by each plan (exactly the pruned model's outputs)."""
    from .evaluate import evaluate_suite

    results = {}
    for name, plan in plans.items():
        with mask_experts(model, plan or {}):
            results[name] = evaluate_suite(model, tokenizer, **suite_kwargs)
    return results


def comparison_cells(results: dict[str, dict], esap: dict[str, float]) -> dict[str, dict[str, str]]:
    """{plan: {metric: formatted value}} of the evaluated plans."""
    return {
        name: {"ESAP (held-out)": f"{esap[name]:.4f}"} | suite_cells(res) for name, res in results.items()
    }


def comparison_table(results: dict[str, dict], esap: dict[str, float], title: str) -> Table:
    """Rows: metrics; columns: plans."""
    cells = comparison_cells(results, esap)
    table = Table(title=title)
    table.add_column("metric")
    for name in cells:
        table.add_column(name, justify="right")
    for metric in next(iter(cells.values())):
        table.add_row(escape(metric), *(col.get(metric, "") for col in cells.values()))
    return table


def evaluation_markdown(results: dict[str, dict], esap: dict[str, float]) -> str:
    """The comparison as the model card's evaluation section (testbed suite, masked plans)."""
    return (
        "Testbed suite, measured by exact masking before the checkpoint was written (`EvoESAP` is this "
        "checkpoint):\n\n" + markdown_table(comparison_cells(results, esap))
    )


def run_demo(
    out: str | Path,
    *,
    model_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    criterion: str = "frequency",
    sparsity: float = 0.5,
    population: int = 12,
    generations: int = 6,
    seed: int = 0,
    calib_samples: int = 8,
    search_samples: int = 2,
    heldout_samples: int = 2,
    seq_len: int = 256,
    eval_tokens_per_domain: int = 2000,
    eval_items: int = 60,
    overwrite: bool = False,
    progress: bool = True,
    console=None,
) -> dict:
    """The README's main command; returns (and writes to ``OUT/demo_results.json``) the comparison.

    Sample counts are per domain (`calib_samples`, `search_samples`, `heldout_samples` windows of
    `seq_len` tokens); the suite is capped at `eval_tokens_per_domain` and `eval_items` items."""
    from . import api
    from .allocate.run import check_run_dir

    t0 = time.perf_counter()
    check_run_dir(out, resume=False, overwrite=overwrite)
    say = console.print if console is not None else (lambda *a, **k: None)
    source = (
        str(model_dir)
        if model_dir is not None
        else "moeprune bundled testbed (moeprune/assets/testbed/model)"
    )
    model, tokenizer, model_dir, data_dir = load_testbed(model_dir, data_dir)
    say(f"[1/4] observe: {criterion} ranking from {calib_samples} x {seq_len} calibration tokens per domain")
    calib = token_split(tokenizer, data_dir / "calibration.jsonl", calib_samples, seq_len, seed)
    order = removal_order_for(model, calib, criterion, seed, progress)
    say(f"[2/4] EvoESAP search: population {population}, {generations} generations, sparsity {sparsity}")
    search = api.search_set(token_split(tokenizer, data_dir / "search.jsonl", search_samples, seq_len, seed))
    outcome = api.search(
        model, order, search, out, sparsity=sparsity, population=population, generations=generations,
        seed=seed, overwrite=overwrite, progress=progress, save_checkpoint=False,
    )  # fmt: skip
    t_search = time.perf_counter() - t0
    say("[3/4] evaluate: unpruned, uniform and EvoESAP (by exact masking)")
    plans = {"unpruned": None, "uniform": outcome.uniform_plan, "EvoESAP": outcome.plan}
    heldout = api.search_set(
        token_split(tokenizer, data_dir / "test.jsonl", heldout_samples, seq_len, seed + 1)
    )
    esap = heldout_esap(model, heldout, plans)
    results = evaluate_plans(
        model,
        tokenizer,
        plans,
        suite_dir=data_dir,
        max_tokens_per_domain=eval_tokens_per_domain,
        max_items=eval_items,
    )
    say("[4/4] prune and save the EvoESAP checkpoint")
    api.save_search(
        model,
        outcome,
        out,
        source=source,
        tokenizer=tokenizer,
        sparsity=sparsity,
        criterion=criterion,
        card_evaluation=evaluation_markdown(results, esap),
    )
    summary = {
        "criterion": criterion,
        "sparsity": sparsity,
        "counts_removed": {"uniform": list(outcome.uniform), "EvoESAP": list(outcome.best)},
        "search_esap": {
            "uniform": outcome.uniform_fitness["value"],
            "EvoESAP": outcome.best_fitness["value"],
        },
        "heldout_esap": esap,
        "evaluation": results,
        "search": {
            "evaluations": outcome.result.evaluations,
            "seconds": round(outcome.result.seconds, 1),
            "reuse": outcome.reuse,
        },
        "seconds": {"search_phase": round(t_search, 1), "total": round(time.perf_counter() - t0, 1)},
    }
    Path(out, "demo_results.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    summary["table"] = comparison_table(
        results, esap, f"{criterion} @ {sparsity:.0%} sparsity: uniform vs EvoESAP (testbed)"
    )
    return summary
