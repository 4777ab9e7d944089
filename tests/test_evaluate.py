"""`moeprune evaluate` and the lm-eval bridge: lm-eval run in process agrees with the suite's own scorers."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from moeprune.errors import MoepruneError
from moeprune.evaluate import generation_exact_match, multiple_choice_accuracy, read_jsonl
from moeprune.evaluate.lm_eval_bridge import lm_eval_tasks, suite_task_dir
from moeprune.surgery import mask_experts, save_pruned
from moeprune.surgery.prune import remove_experts_
from moeprune.testbed import load_testbed
from tiny_models import tiny_model
from tiny_tokenizer import save_tiny_checkpoint, tiny_tokenizer

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def testbed():
    model, tok, _, data_dir = load_testbed()
    return model, tok, data_dir


def test_lm_eval_agrees_with_the_suite_on_a_masked_model(testbed, tmp_path):
    """The harness scores the model as it is in memory (here: 20 of 32 experts masked per layer) and
    gets the suite's own multiple-choice accuracy and generation exact match, item for item."""
    model, tok, data_dir = testbed
    gen = torch.Generator().manual_seed(0)
    plan = {i: torch.randperm(32, generator=gen)[:20].tolist() for i in range(8)}
    n = 24
    include = suite_task_dir(data_dir, tmp_path)
    with mask_experts(model, plan):
        harness = lm_eval_tasks(
            model, tok, ["moeprune_mc", "moeprune_generation"], limit=n, include_path=include
        )
        mc = multiple_choice_accuracy(model, tok, read_jsonl(data_dir / "multiple_choice.jsonl")[:n])
        em = generation_exact_match(model, tok, read_jsonl(data_dir / "generation.jsonl")[:n])
    assert harness["moeprune_mc"]["n"] == n and harness["moeprune_generation"]["n"] == n
    assert harness["moeprune_mc"]["acc"] == pytest.approx(mc["accuracy"])
    assert harness["moeprune_generation"]["exact_match (answer)"] == pytest.approx(em["exact_match"])
    assert em["exact_match"] < 0.6, "masking 20 of 32 experts should cost exact match"


def test_unknown_task_and_missing_lm_eval(testbed, monkeypatch, tmp_path):
    model, tok, data_dir = testbed
    with pytest.raises(MoepruneError, match="did you mean moeprune_mc"):
        lm_eval_tasks(model, tok, ["moeprune_mcc"], include_path=suite_task_dir(data_dir, tmp_path))
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(MoepruneError, match=r"pip install 'moeprune\[lm-eval\]'"):
        lm_eval_tasks(model, tok, ["moeprune_mc"])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, testbed):
    """A tiny model with a tokenizer, the same pruned non-uniformly, and a five-line suite."""
    root = tmp_path_factory.mktemp("evaluate")
    model = tiny_model("qwen3_moe")
    save_tiny_checkpoint(root / "full", model)
    remove_experts_(model, {0: [1, 2], 1: [3, 4, 5, 6]})
    save_pruned(model, root / "pruned", manifest={}, tokenizer=tiny_tokenizer())
    suite = root / "suite"
    suite.mkdir()
    data_dir = testbed[2]
    for name in ("test.jsonl", "generation.jsonl", "multiple_choice.jsonl"):
        (suite / name).write_text("".join(open(data_dir / name).readlines()[:5]))
    return root


def test_cli_evaluates_checkpoints_side_by_side(run_cli, checkpoints):
    root = checkpoints
    out = root / "report.json"
    code, stdout, err = run_cli(
        "evaluate", root / "full", root / "pruned", "--suite", root / "suite", "--lm-eval", "moeprune_mc",
        "--limit", "3", "--out", out,
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(out.read_text())
    assert list(report) == [str(root / "full"), str(root / "pruned")]
    for result in report.values():
        assert result["suite"]["multiple_choice"]["n"] == 5 and result["lm_eval"]["moeprune_mc"]["n"] == 3
        assert set(result["suite"]["perplexity"]) and result["suite"]["generation"]["n"] == 5
    assert "moeprune_mc: acc (n=3)" in stdout and "multiple-choice acc." in stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (("--suite", "none"), "nothing to evaluate"),
        (("--suite", "/no/such/suite"), "no such directory"),
        (("--dtype", "fp8"), "dtype must be"),
    ],
)
def test_cli_evaluate_bad_input(run_cli, checkpoints, args, needle):
    code, _, err = run_cli("evaluate", checkpoints / "full", *args)
    assert code == 2 and needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
