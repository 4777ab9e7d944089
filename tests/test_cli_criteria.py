"""`moeprune observe` and `moeprune prune --criterion`: real output for good input; one line on stderr,
exit code 2 and nothing written for every bad data / criterion input."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

from cli_checks import assert_clean_failure
from tiny_models import tiny_model
from tiny_tokenizer import tiny_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny qwen3_moe checkpoint with a character tokenizer (chat template included)."""
    path = tmp_path_factory.mktemp("qwen3_moe_tok")
    tiny_model("qwen3_moe").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir_no_chat(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3_moe_nochat")
    tiny_model("qwen3_moe").save_pretrained(path)
    tiny_tokenizer(chat=False).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "calib.jsonl"
    rows = [
        {"text": f"sample {i} says hello to the world", "domain": ["en", "code"][i % 2]} for i in range(24)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


SMALL = ("--seq-len", "24", "--num-samples", "6")


def test_observe_then_prune_from_stats(run_cli, model_dir, calib, tmp_path):
    stats = tmp_path / "stats"
    code, _, err = run_cli(
        "observe", model_dir, "--data", calib, "--out", stats, *SMALL, "--dense-tokens", "64"
    )
    assert code == 0, err
    meta = json.loads((stats / "stats.json").read_text())
    assert meta["domain_names"] == ["code", "en"] and "mop" in meta["criteria_supported"]
    for criterion in ("mop", "frequency"):
        out = tmp_path / f"pruned-{criterion}"
        code, _, err = run_cli(
            "prune", model_dir, "--criterion", criterion, "--sparsity", "0.5", "--stats", stats, "--out", out
        )
        assert code == 0, err
        manifest = json.loads((out / "moeprune.json").read_text())
        assert manifest["criterion"] == criterion and all(len(v) == 4 for v in manifest["kept"].values())
        assert AutoConfig.from_pretrained(out).num_experts == 4
        AutoModelForCausalLM.from_pretrained(out)


def test_prune_with_criterion_and_data(run_cli, model_dir, calib, tmp_path):
    out = tmp_path / "out"
    code, _, err = run_cli(
        "prune", model_dir, "--criterion", "reap", "--sparsity", "0.25", "--data", calib, *SMALL, "--out", out
    )
    assert code == 0, err
    assert json.loads((out / "moeprune.json").read_text())["removed"]["0"].__len__() == 2
    assert (out / "tokenizer.json").exists()


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    return path


@pytest.mark.parametrize(
    "args, needle",
    [
        (("--criterion", "frequncy", "--sparsity", "0.5", "--data", "CALIB"), "did you mean 'frequency'"),
        (("--criterion", "reap", "--data", "CALIB"), "--sparsity"),
        (("--criterion", "reap", "--sparsity", "1.5", "--data", "CALIB"), "[0, 1)"),
        (("--criterion", "reap", "--sparsity", "0.5"), "--data"),
        (("--criterion", "reap", "--sparsity", "0.5", "--data", "MISSING"), "does not exist"),
        (("--criterion", "reap", "--sparsity", "0.5", "--data", "BADJSON"), "line 2 is not valid JSON"),
        (("--criterion", "reap", "--sparsity", "0.5", "--data", "EMPTY"), "holds no rows"),
        (("--criterion", "reap", "--sparsity", "0.5", "--data", "NOFIELD"), "no 'text' field (fields: body)"),
        (
            ("--criterion", "reap", "--sparsity", "0.5", "--data", "NOFIELD", "--text-field", "txt"),
            "no 'txt'",
        ),
        (("--criterion", "reap", "--sparsity", "0.5", "--stats", "NOSTATS"), "no expert statistics"),
        (("--criterion", "reap", "--sparsity", "0.5", "--plan", "PLAN"), "either --plan or --criterion"),
    ],
    ids=[
        "unknown-criterion",
        "no-sparsity",
        "sparsity-range",
        "no-data",
        "missing-file",
        "bad-json",
        "empty",
        "missing-field",
        "missing-custom-field",
        "not-a-stats-dir",
        "plan-and-criterion",
    ],
)
def test_prune_bad_inputs(run_cli, model_dir, calib, tmp_path, args, needle):
    files = {
        "CALIB": calib,
        "MISSING": tmp_path / "missing.jsonl",
        "BADJSON": write(tmp_path, "bad.jsonl", '{"text": "a"}\n{"text": \n'),
        "EMPTY": write(tmp_path, "empty.jsonl", ""),
        "NOFIELD": write(tmp_path, "nofield.jsonl", '{"body": "a"}\n'),
        "NOSTATS": tmp_path,
        "PLAN": write(tmp_path, "plan.json", '{"removed": {"0": [1]}}'),
    }
    args = [str(files.get(a, a)) for a in args]
    out = tmp_path / "out"
    assert_clean_failure(run_cli("prune", model_dir, *args, *SMALL, "--out", out), out, needle)


def test_chat_data_needs_a_chat_template(run_cli, model_dir_no_chat, tmp_path):
    data = write(tmp_path, "chat.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    out = tmp_path / "out"
    result = run_cli(
        "prune",
        model_dir_no_chat,
        "--criterion",
        "frequency",
        "--sparsity",
        "0.5",
        "--data",
        data,
        "--out",
        out,
    )
    assert_clean_failure(result, out, "no chat template")
    result = run_cli("observe", model_dir_no_chat, "--data", data, "--out", out)
    assert_clean_failure(result, out, "no chat template")


def test_mop_needs_stats_with_the_dense_subsample(run_cli, model_dir, calib, tmp_path):
    stats = tmp_path / "stats"
    code, _, err = run_cli(
        "observe", model_dir, "--data", calib, "--out", stats, *SMALL, "--criteria", "reap"
    )
    assert code == 0, err
    out = tmp_path / "out"
    result = run_cli(
        "prune", model_dir, "--criterion", "mop", "--sparsity", "0.5", "--stats", stats, "--out", out
    )
    assert_clean_failure(result, out, "dense token subsample")


def test_observe_bad_inputs(run_cli, model_dir, calib, tmp_path):
    out = tmp_path / "stats"
    assert_clean_failure(
        run_cli("observe", model_dir, "--data", calib, "--out", out, "--criteria", "reap,nae"), out, "'naee'"
    )
    assert_clean_failure(
        run_cli("observe", model_dir, "--data", tmp_path / "none.jsonl", "--out", out), out, "does not exist"
    )
    bad = write(tmp_path, "bad.txt", "")
    assert_clean_failure(run_cli("observe", model_dir, "--data", bad, "--out", out), out, "holds no rows")


def test_criteria_command_lists_every_criterion(run_cli):
    code, out, _ = run_cli("criteria")
    assert code == 0
    for name in (
        "random",
        "frequency",
        "soft_frequency",
        "ean",
        "ean_mean",
        "weighted_ean",
        "reap",
        "naee",
        "mop",
    ):
        assert name in out


def test_stats_of_another_model_are_rejected(run_cli, model_dir, tmp_path):
    from moeprune.observe import ExpertStats, LayerStats

    ExpertStats({0: LayerStats(index=0, num_experts=4, top_k=2)}, {"model": "other"}).save(tmp_path / "stats")
    out = tmp_path / "out"
    result = run_cli(
        "prune",
        model_dir,
        "--criterion",
        "reap",
        "--sparsity",
        "0.5",
        "--stats",
        tmp_path / "stats",
        "--out",
        out,
    )
    assert_clean_failure(result, out, "do not fit this model")
