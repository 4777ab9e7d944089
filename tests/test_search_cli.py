"""`moeprune search`: a run directory with a loadable non-uniform checkpoint; one-line errors."""

from __future__ import annotations

import json

import pytest

from moeprune.surgery import load
from tiny_tokenizer import TEXT, save_tiny_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    save_tiny_checkpoint(root / "model")
    (root / "calib.txt").write_text(TEXT)
    (root / "search.txt").write_text(TEXT[::-1])
    return root


def search_args(root, out, *extra):
    return (
        "search", root / "model", "--criterion", "frequency", "--sparsity", "0.5",
        "--data", root / "calib.txt", "--search-data", root / "search.txt", "--out", out,
        "--population", "6", "--generations", "2", "--num-samples", "4", "--seq-len", "32",
        "--search-samples", "2", "--search-seq-len", "32", *extra,
    )  # fmt: skip


def test_search_writes_run_dir_and_checkpoint(run_cli, setup, tmp_path):
    out = tmp_path / "run"
    code, _, err = run_cli(*search_args(setup, out))
    assert code == 0, err
    for name in ("plan.json", "search_history.json", "allocation.png", "fitness.png", "moeprune.json"):
        assert (out / name).exists(), name
    plan = json.loads((out / "plan.json").read_text())
    assert sum(plan["counts_removed"].values()) == 12  # half of 3 layers x 8 experts
    history = json.loads((out / "search_history.json").read_text())
    assert len(history["history"]) == 2 and history["evaluations"] >= 6
    model = load(out)
    kept = [8 - n for n in plan["counts_removed"].values()]
    assert [model.config.num_experts_per_layer[i] for i in range(3)] == kept or len(set(kept)) == 1
    # resuming a finished run changes nothing
    code, _, err = run_cli(*search_args(setup, out, "--resume"))
    assert code == 0, err
    assert json.loads((out / "plan.json").read_text())["removed"] == plan["removed"]


@pytest.mark.parametrize(
    "extra, needle",
    [
        (("--fitness", "esapp"), "did you mean 'esap'"),
        (("--resume",), "nothing to resume"),
        (("--criterion", "freq"), "freq"),
        (("--device", "cuda:7"), "no such cuda device"),
        (("--device", "gpu0"), "not a device name"),
        (("--candidate-batch", "0"), "--candidate-batch: Input should be greater than or equal to 1"),
    ],
)
def test_search_bad_input(run_cli, setup, tmp_path, extra, needle):
    out = tmp_path / "run"
    code, _, err = run_cli(*search_args(setup, out), *extra)
    assert code == 2, err
    assert needle in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1
    assert not out.exists()


def test_stacked_candidates_find_the_same_plan(run_cli, setup, tmp_path):
    plans = []
    for name, extra in (("one", ()), ("stacked", ("--candidate-batch", "4", "--device", "cpu"))):
        code, _, err = run_cli(*search_args(setup, tmp_path / name, *extra))
        assert code == 0, err
        plans.append(json.loads((tmp_path / name / "plan.json").read_text()))
    assert plans[0]["removed"] == plans[1]["removed"]
    assert plans[0]["fitness"]["value"] == pytest.approx(plans[1]["fitness"]["value"], abs=1e-5)


def test_existing_run_dir_needs_resume(run_cli, setup, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "x").write_text("")
    code, _, err = run_cli(*search_args(setup, out))
    assert code == 2 and "--resume" in err


def test_prune_by_criterion_is_the_searches_uniform_baseline(run_cli, setup, tmp_path):
    """One meaning of uniform: `prune --criterion` at sparsity s removes exactly the uniform plan
    that `search` reports as its baseline (at 0.3: round(0.3 x 8) = 2 per layer, not a global 7)."""
    out = tmp_path / "run"
    code, _, err = run_cli(*[a if a != "0.5" else "0.3" for a in search_args(setup, out)])
    assert code == 0, err
    baseline = json.loads((out / "plan.json").read_text())["uniform_counts_removed"]
    code, _, err = run_cli(
        "prune", setup / "model", "--criterion", "frequency", "--sparsity", "0.3", "--data", setup / "calib.txt",
        "--num-samples", "4", "--seq-len", "32", "--out", tmp_path / "pruned",
    )  # fmt: skip
    assert code == 0, err
    removed = json.loads((tmp_path / "pruned" / "moeprune.json").read_text())["removed"]
    assert {k: len(v) for k, v in removed.items()} == baseline == {"0": 2, "1": 2, "2": 2}
