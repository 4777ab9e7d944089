"""On-policy search data: the unpruned model continues prompt rows, only its tokens are scored, the
same seed gives the same tokens, and a search runs on them through the one pipeline."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from cli_checks import assert_clean_failure
from moeprune.data import continue_prompts, is_prompt_set, read_rows
from moeprune.errors import DataError
from tiny_models import tiny_model
from tiny_tokenizer import TEXT, save_tiny_checkpoint, tiny_tokenizer

PROMPTS = [{"prompt": line[: 8 + i]} for i, line in enumerate(TEXT.splitlines()[:6])]


def write_prompts(path, rows=PROMPTS):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
def test_continuations_are_scored_alone_and_repeat_for_a_seed(tmp_path, sample):
    model, tok = tiny_model("qwen3_moe"), tiny_tokenizer()
    rows = read_rows(write_prompts(tmp_path / "p.jsonl"))
    assert is_prompt_set(rows)
    a = continue_prompts(model, tok, rows, gen_tokens=5, num_samples=4, sample=sample, seed=3)
    b = continue_prompts(model, tok, rows, gen_tokens=5, num_samples=4, sample=sample, seed=3)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.score_mask, b.score_mask)
    assert len(a) == 4
    for i in range(len(a)):
        scored = a.score_mask[i].nonzero().flatten().tolist()
        real = int(a.attention_mask[i].sum())
        assert 1 <= len(scored) <= 5 and scored == list(range(real - len(scored), real))  # the tail
    if sample:  # another seed draws other continuations
        c = continue_prompts(model, tok, rows, gen_tokens=5, num_samples=4, sample=True, seed=4)
        assert not torch.equal(a.input_ids, c.input_ids)


def test_only_prompts_are_continued(tmp_path):
    rows = read_rows(write_prompts(tmp_path / "t.jsonl", [{"text": "a b c"}]))
    assert not is_prompt_set(rows)
    with pytest.raises(DataError, match="needs prompts"):
        continue_prompts(tiny_model("qwen3_moe"), tiny_tokenizer(), rows)


def test_search_on_prompts_scores_the_models_own_continuations(run_cli, tmp_path):
    save_tiny_checkpoint(tmp_path / "model")
    (tmp_path / "calib.txt").write_text(TEXT)
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "run"
    code, _, err = run_cli(
        "search", tmp_path / "model", "--criterion", "frequency", "--sparsity", "0.5", "--data",
        tmp_path / "calib.txt", "--num-samples", "4", "--seq-len", "32", "--search-data", prompts,
        "--search-samples", "4", "--population", "4", "--generations", "2", "--out", out,
    )  # fmt: skip
    assert code == 0, err
    history = json.loads((out / "search_history.json").read_text())
    assert 4 <= history["teacher"]["scored_tokens"] <= 4 * 64  # generated tokens only (gen_tokens 64)
    # the hidden cache's T x V probabilities fit: kept (the history says so)
    assert history["teacher"]["kind"] == "hidden" and history["teacher"]["probs_kept"] is True
    assert not (tmp_path / ".run.run").exists()
    # --gen-tokens and --gen-stop reach the recipe ('\\n' typed in a shell is a newline)
    code, _, err = run_cli(
        "search", tmp_path / "model", "--criterion", "frequency", "--sparsity", "0.5", "--data",
        tmp_path / "calib.txt", "--num-samples", "4", "--seq-len", "32", "--search-data", prompts,
        "--search-samples", "4", "--population", "4", "--generations", "1", "--out", tmp_path / "run2",
        "--gen-tokens", "3", "--gen-stop", "\\n",
    )  # fmt: skip
    assert code == 0, err
    recipe = yaml.safe_load((tmp_path / "run2" / "recipe.yaml").read_text())
    assert recipe["search"]["gen_tokens"] == 3 and recipe["search"]["gen_stop"] == "\n"
    history = json.loads((tmp_path / "run2" / "search_history.json").read_text())
    assert 4 <= history["teacher"]["scored_tokens"] <= 4 * 3


def test_a_stop_text_ends_each_continuation_after_it(tmp_path):
    model, tok = tiny_model("qwen3_moe"), tiny_tokenizer()
    rows = read_rows(write_prompts(tmp_path / "p.jsonl"))
    full = continue_prompts(model, tok, rows, gen_tokens=12, sample=True, seed=1)
    texts = [tok.decode(full.input_ids[i][full.score_mask[i]]) for i in range(len(full))]
    # a character the sampled continuations write, not first in all of them
    stop = next(ch for t in texts for ch in t[1:-1] if ch.strip())
    cut = continue_prompts(model, tok, rows, gen_tokens=12, sample=True, seed=1, stop=stop)
    assert int(cut.score_mask.sum()) < int(full.score_mask.sum())
    for i, text in enumerate(texts):
        written = cut.input_ids[i][cut.score_mask[i]].tolist()
        kept = tok.decode(written)
        if stop in text:  # ends with the token that completes the stop text, nothing after it
            assert stop in kept and stop not in tok.decode(written[:-1])
            assert text.startswith(kept)
        else:
            assert kept == text


def test_mode_layers_refuses_on_policy_data_in_one_line(run_cli, tmp_path):
    """Writing continuations layer by layer would stream the checkpoint once per token: refused."""
    save_tiny_checkpoint(tmp_path / "model")
    (tmp_path / "calib.txt").write_text(TEXT)
    out = tmp_path / "run"
    result = run_cli(
        "search", tmp_path / "model", "--criterion", "frequency", "--sparsity", "0.5", "--data",
        tmp_path / "calib.txt", "--search-data", write_prompts(tmp_path / "prompts.jsonl"), "--out", out,
        "--device", "layers",
    )  # fmt: skip
    assert_clean_failure(result, out, "mode layers: on-policy search data")
