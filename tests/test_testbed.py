"""The testbed: reproducible corpus + tokenizer, the shipped checkpoint, and the evaluation functions."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from moeprune.evaluate import (
    default_suite_dir,
    generation_exact_match,
    multiple_choice_accuracy,
    perplexity_by_domain,
)

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "src" / "moeprune" / "assets" / "testbed"


# ----------------------------------------------------------------------------- corpus determinism


def _load_corpus_module():
    spec = importlib.util.spec_from_file_location("testbed_corpus", ROOT / "testbed" / "corpus.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _have_apt_packages() -> bool:
    if shutil.which("dpkg") is None:
        return False
    need = (ROOT / "testbed" / "requirements-apt.txt").read_text().split()
    return all(subprocess.run(["dpkg", "-s", p], capture_output=True).returncode == 0 for p in need)


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.skipif(
    not _have_apt_packages(), reason="Debian packages of testbed/requirements-apt.txt missing"
)
def test_corpus_and_tokenizer_rebuild_identically(tmp_path: Path) -> None:
    corpus = _load_corpus_module()
    for name in ("a", "b"):
        corpus.main(["--out", str(tmp_path / name), "--small", "--vocab-size", "1500", "--seed", "7"])
    ha, hb = _tree_hashes(tmp_path / "a"), _tree_hashes(tmp_path / "b")
    assert ha == hb
    assert {
        "train.jsonl",
        "val.jsonl",
        "test.jsonl",
        "search.jsonl",
        "calib.jsonl",
        "tokenizer/tokenizer.json",
    } <= set(ha)
    domains = {json.loads(line)["domain"] for line in open(tmp_path / "a" / "train.jsonl")}
    assert domains == set(corpus.DOMAINS)


def test_arith_pairs_split_disjoint() -> None:
    corpus = _load_corpus_module()
    splits = {
        s: {line for doc in corpus.arith_documents(30, 1234, s) for line in doc.split("\n")}
        for s in ("train", "val", "test")
    }
    strip = {s: {x.split("=")[0] for x in v} for s, v in splits.items()}
    assert (
        not strip["test"] & strip["train"]
        and not strip["val"] & strip["train"]
        and not strip["test"] & strip["val"]
    )


# ----------------------------------------------------------------------------- the shipped checkpoint


@pytest.fixture(scope="session")
def testbed_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (ASSETS / "model" / "config.json").exists():
        pytest.skip("testbed checkpoint not built yet")
    model = AutoModelForCausalLM.from_pretrained(ASSETS / "model", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(ASSETS / "model")
    return model, tok


def test_checkpoint_is_qwen3_moe_with_required_shape(testbed_model) -> None:
    from transformers import Qwen3MoeForCausalLM
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    model, tok = testbed_model
    cfg = model.config
    assert isinstance(model, Qwen3MoeForCausalLM) and cfg.model_type == "qwen3_moe"
    assert cfg.num_hidden_layers >= 8 and cfg.num_experts >= 32 and cfg.num_experts_per_tok == 4
    assert cfg.norm_topk_prob and cfg.router_aux_loss_coef > 0
    assert all(isinstance(layer.mlp, Qwen3MoeSparseMoeBlock) for layer in model.model.layers)
    weights = ASSETS / "model" / "model.safetensors"
    assert weights.stat().st_size < 45e6
    with open(weights, "rb") as f:  # safetensors header: every tensor stored as bf16
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    assert tok.tokenize("47*8=376") == ["4", "7", "*", "8", "=", "3", "7", "6"]
    assert tok.bos_token and tok.eos_token and tok.pad_token


def test_bundled_suite_files() -> None:
    suite = default_suite_dir()
    if not (suite / "generation.jsonl").exists():
        pytest.skip("testbed data not built yet")
    for name in ("test", "generation", "multiple_choice", "search", "calibration"):
        assert (suite / f"{name}.jsonl").stat().st_size > 0
    test_prompts = {json.loads(line)["prompt"] for line in open(suite / "generation.jsonl")}
    calib_text = (suite / "calibration.jsonl").read_text() + (suite / "search.jsonl").read_text()
    assert not any(f"\\n{p}" in calib_text or f'"{p}' in calib_text for p in test_prompts)


# ----------------------------------------------------------------------------- evaluation on a hand-checkable case

CHARS = list("0123456789+=\n")


@pytest.fixture(scope="module")
def char_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


class BigramLM(torch.nn.Module):
    """logits[b, t] = log_table[input_ids[b, t]]: the next token depends only on the current one."""

    def __init__(self, log_table: torch.Tensor) -> None:
        super().__init__()
        self.log_table = torch.nn.Parameter(log_table)
        self.config = SimpleNamespace()

    def forward(self, input_ids, attention_mask=None, past_key_values=None, **kwargs):
        return SimpleNamespace(logits=self.log_table[input_ids], past_key_values=None)


def _id(c: str) -> int:
    return CHARS.index(c) + 3


@pytest.fixture(scope="module")
def counting_lm() -> BigramLM:
    """After <bos>: '1' w.p. 0.5, rest uniform. After digit d: d+1 w.p. 0.7 ('9' -> newline), rest uniform.
    After anything else: uniform."""
    v = 3 + len(CHARS)
    probs = torch.full((v, v), 1.0 / v)

    def peak(row: int, col: int, p: float) -> None:
        probs[row] = (1 - p) / (v - 1)
        probs[row, col] = p

    peak(1, _id("1"), 0.5)
    for d in range(10):
        peak(_id(str(d)), _id(str(d + 1)) if d < 9 else _id("\n"), 0.7)
    return BigramLM(probs.log())


def test_perplexity_uniform_is_vocab_size(char_tokenizer) -> None:
    v = 3 + len(CHARS)
    model = BigramLM(torch.zeros(v, v))
    res = perplexity_by_domain(
        model, char_tokenizer, [{"text": "12+3=15", "domain": "x"}, {"text": "9", "domain": "y"}]
    )
    assert res["x"]["ppl"] == pytest.approx(v, rel=1e-5)
    assert res["x"]["tokens"] == 8  # "<bos>12+3=15<eos>": 9 tokens, 8 predicted
    assert res["y"]["tokens"] == 2


def test_perplexity_hand_computed(char_tokenizer, counting_lm) -> None:
    v = 3 + len(CHARS)
    # "<bos>12<eos>": p(1|bos)=0.5, p(2|1)=0.7, p(eos|2)=0.3/(v-1)
    expected = math.exp(-(math.log(0.5) + math.log(0.7) + math.log(0.3 / (v - 1))) / 3)
    res = perplexity_by_domain(counting_lm, char_tokenizer, [{"text": "12", "domain": "d"}])
    assert res["d"]["ppl"] == pytest.approx(expected, rel=1e-5)


def test_generation_exact_match_hand_checked(char_tokenizer, counting_lm) -> None:
    # greedy: '7' -> '8' '9' '\n' so the answer is "89"; '57' -> "89" too; '5' -> "6789"
    items = [
        {"prompt": "7", "answer": "89"},
        {"prompt": "57", "answer": "89"},
        {"prompt": "5", "answer": "6"},
    ]
    res = generation_exact_match(
        counting_lm, char_tokenizer, items, max_new_tokens=6, return_predictions=True
    )
    assert res["predictions"] == ["89", "89", "6789"]
    assert res["exact_match"] == pytest.approx(2 / 3)
    assert char_tokenizer.padding_side == "right"  # restored


def test_multiple_choice_hand_checked(char_tokenizer, counting_lm) -> None:
    items = [
        {"prompt": "3", "options": ["5\n", "4\n"], "answer": 1},  # p(4|3) = 0.7 beats p(5|3)
        {"prompt": "8", "options": ["9\n", "10\n"], "answer": 1},  # model prefers "9\n": wrong
        {"prompt": "1+", "options": ["2", "3"], "answer": 0},  # uniform after '+': tie -> first option
    ]
    res = multiple_choice_accuracy(counting_lm, char_tokenizer, items, return_predictions=True)
    assert res["predictions"] == [1, 0, 0]
    assert res["accuracy"] == pytest.approx(2 / 3)


def test_evaluate_suite_on_testbed(testbed_model) -> None:
    from moeprune.evaluate import evaluate_suite
    from moeprune.report import format_table

    model, tok = testbed_model
    res = evaluate_suite(model, tok, max_tokens_per_domain=1024, max_items=16)
    assert set(res["perplexity"]) >= {"en", "de", "fr", "code", "arith"}
    assert 0 <= res["generation"]["exact_match"] <= 1 and res["generation"]["n"] == 16
    assert 0 <= res["multiple_choice"]["accuracy"] <= 1
    assert format_table(res).row_count >= 7


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
