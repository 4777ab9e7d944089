"""EleutherAI's lm-evaluation-harness on a model already loaded in this process.

`lm_eval_tasks` wraps the model in lm-eval's ``HFLM`` (no reload, so a masked, merged or
non-uniform pruned model is evaluated as it is in memory) and returns ``{task: {metric: value}}``.
`suite_task_dir` writes a suite's multiple-choice and generation sets as two lm-eval tasks,
``moeprune_mc`` (acc: log-likelihood of each option, as `multiple_choice_accuracy`) and
``moeprune_generation`` (exact match of the greedy answer up to the first newline), so the bundled
testbed, or any suite directory, runs through the harness offline.

lm-eval is an optional dependency: ``pip install 'moeprune[lm-eval]'``.
"""

from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from ..errors import MoepruneError
from ._util import model_device

_METRIC = {"aggregation": "mean", "higher_is_better": True}
# lm-eval task name -> (suite file, task body): the suite's two scored sets, scored as the suite scores them
SUITE_TASKS: dict[str, tuple[str, dict]] = {
    "moeprune_mc": (
        "multiple_choice.jsonl",
        {
            "output_type": "multiple_choice",
            "doc_to_choice": "{{options}}",
            "doc_to_target": "answer",
            "target_delimiter": "",
            "metric_list": [{"metric": "acc", **_METRIC}],
        },
    ),
    "moeprune_generation": (
        "generation.jsonl",
        {
            "output_type": "generate_until",
            "doc_to_target": "{{answer}}",
            "target_delimiter": "",
            "generation_kwargs": {"until": ["\n"], "do_sample": False, "max_gen_toks": 8},
            # the answer is the greedy text up to the first newline, stripped (`normalize_answer`)
            "filter_list": [
                {
                    "name": "answer",
                    "filter": [
                        {"function": "regex", "regex_pattern": r"^\s*(\S*)"},
                        {"function": "take_first"},
                    ],
                }
            ],
            "metric_list": [{"metric": "exact_match", **_METRIC}],
        },
    ),
}


def suite_task_dir(suite_dir: str | Path, out_dir: str | Path) -> Path:
    """Write ``<task>.yaml`` for each of `SUITE_TASKS` whose file the suite has into `out_dir`; returns
    it (an lm-eval ``include_path``). The YAML (written as JSON, which YAML reads) points at the file."""
    suite, out = Path(suite_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, (file, body) in SUITE_TASKS.items():
        if (suite / file).exists():
            spec = {
                "task": name,
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str((suite / file).resolve())}},
                "test_split": "test",
                "doc_to_text": "{{prompt}}",
                **body,
            }
            (out / f"{name}.yaml").write_text(json.dumps(spec, indent=1) + "\n")
    return out


def lm_eval_tasks(
    model,
    tokenizer,
    tasks: Sequence[str],
    *,
    limit: int | float | None = None,
    batch_size: int = 16,
    num_fewshot: int | None = None,
    include_path: str | Path | Sequence[str | Path] | None = None,
) -> dict[str, dict[str, float]]:
    """Run lm-eval `tasks` on `model` in process: ``{task: {metric: value}}`` (stderr entries and
    the ``,none`` filter suffix dropped; other filters keep theirs). `limit` caps documents per task
    (an int) or takes a fraction (a float); `include_path` adds folders of task YAMLs."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise MoepruneError(f"lm-eval is not installed ({e}): pip install 'moeprune[lm-eval]'") from None
    paths = [include_path] if isinstance(include_path, str | Path) else list(include_path or ())
    manager = TaskManager(include_path=[str(p) for p in paths] or None)
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; `lm-eval ls tasks` lists them"
            raise MoepruneError(f"unknown lm-eval task '{task}'{hint}")
    quiet = logging.getLogger("lm_eval")  # its per-run notices (e.g. "model kwarg is not a str")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    # lm-eval records the git commit of the working directory by running `git describe`, whose
    # "fatal: not a git repository" lands on our stderr; the commit of the caller's folder means
    # nothing for a moeprune evaluation
    import lm_eval.evaluator as evaluator_module

    git_hash = evaluator_module.get_git_commit_hash
    evaluator_module.get_git_commit_hash = lambda: None
    try:
        lm = HFLM(
            pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model_device(model))
        )
        out = simple_evaluate(
            model=lm,
            tasks=list(tasks),
            task_manager=manager,
            limit=limit,
            num_fewshot=num_fewshot,
            log_samples=False,
        )
    except (ConnectionError, OSError) as e:  # datasets and huggingface_hub raise these offline
        reason = " ".join(str(e).split()) or type(e).__name__
        raise MoepruneError(
            f"lm-eval could not fetch the data of {', '.join(tasks)}: {reason}; these tasks need the "
            "Hugging Face hub (or their datasets in the local cache), or use the offline suite tasks "
            "(--lm-eval moeprune_mc)"
        ) from None
    finally:
        evaluator_module.get_git_commit_hash = git_hash
        quiet.setLevel(level)
    results: dict[str, dict[str, float]] = {}  # {task: {"n": documents, metric: value}}
    for task, metrics in out["results"].items():
        kept = {}
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if name == "sample_len":
                kept["n"] = int(value)
            elif isinstance(value, int | float) and not isinstance(value, bool) and "_stderr" not in name:
                kept[name if filt in ("", "none") else f"{name} ({filt})"] = float(value)
        results[task] = kept
    return results
