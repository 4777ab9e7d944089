"""The bundled testbed (a small Qwen3-MoE trained by this repository, with its data splits) and the
helpers the demo and the benchmarks share: token splits, a criterion's removal order, held-out ESAP
and the evaluation suite of plans applied by exact masking."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from .errors import MoepruneError
from .plan import ExpertPlan
from .surgery import mask_experts


def testbed_dirs() -> tuple[Path, Path]:
    """(model dir, data dir) of the testbed shipped in the package."""
    root = Path(str(resources.files("moeprune") / "assets" / "testbed"))
    return root / "model", root / "data"


def check_testbed(
    model_dir: str | Path | None = None, data_dir: str | Path | None = None
) -> tuple[Path, Path]:
    """(model dir, data dir), the bundled ones by default; one line when a part is missing."""
    default_model, default_data = testbed_dirs()
    model_dir, data_dir = Path(model_dir or default_model), Path(data_dir or default_data)
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
    return model_dir, data_dir


def load_testbed(model_dir: str | Path | None = None, data_dir: str | Path | None = None):
    """(model in float32, tokenizer, model dir, data dir); float32 is the fast dtype on CPU."""
    from .surgery import load
    from .surgery.checkpoint import load_tokenizer

    model_dir, data_dir = check_testbed(model_dir, data_dir)
    return load(model_dir, dtype=torch.float32), load_tokenizer(model_dir), model_dir, data_dir


def token_split(
    tokenizer, path: str | Path, num_samples: int, seq_len: int, seed: int = 0, per_domain: bool = True
):
    """`num_samples` windows of `seq_len` tokens (per domain) of a testbed split."""
    from .data import load_data

    return load_data(
        path, tokenizer, seq_len=seq_len, num_samples=num_samples, per_domain=per_domain, seed=seed
    )


def removal_order_for(model, calibration, criterion: str, seed: int = 0, progress: bool = False):
    """The criterion's within-layer removal order from one calibration pass."""
    from .criteria import observe_for, removal_order

    stats = observe_for(model, calibration, [criterion], seed=seed, progress=progress)
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


def comparison_table(results: dict[str, dict], esap: dict[str, float], title: str):
    """Rows: metrics; columns: plans (held-out ESAP, then the suite)."""
    from .report import evaluation_cells, table

    return table(
        {n: evaluation_cells({"heldout_esap": esap[n], "suite": r}) for n, r in results.items()}, title
    )
