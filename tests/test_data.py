"""Calibration/search sets: sources, packing, sampling, chat masks, and the DataError one-liners."""

from __future__ import annotations

import json

import pytest
import torch

from moeprune.data import Row, load_data, read_rows, tokenize_rows
from moeprune.errors import DataError
from tiny_tokenizer import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def text_rows(n: int = 12):
    return [
        {"text": f"row {i}: the quick brown fox", "domain": ["en", "code", "math"][i % 3]} for i in range(n)
    ]


def test_jsonl_rows_with_domains(tmp_path):
    rows = read_rows(write_jsonl(tmp_path / "d.jsonl", text_rows()))
    assert len(rows) == 12 and rows[1] == Row("row 1: the quick brown fox", None, "code")


def test_txt_json_and_parquet_sources(tmp_path):
    (tmp_path / "d.txt").write_text("first line\n\nsecond line\n")
    assert [r.text for r in read_rows(tmp_path / "d.txt")] == ["first line", "second line"]
    (tmp_path / "d.json").write_text(json.dumps({"data": [{"body": "x y", "domain": "a"}]}))
    assert read_rows(tmp_path / "d.json", text_field="body")[0] == Row("x y", None, "a")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(text_rows(3)), tmp_path / "d.parquet")
    assert [r.domain for r in read_rows(tmp_path / "d.parquet")] == ["en", "code", "math"]


def test_packing_and_truncation(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", text_rows())
    packed = load_data(path, tok, seq_len=16)
    assert packed.input_ids.shape[1] == 16
    per_domain_tokens = {d: 4 * (1 + len("row 0: the quick brown fox") + 1) for d in ("en", "code", "math")}
    assert packed.num_tokens == sum(per_domain_tokens.values())  # bos + text + eos per row, nothing lost
    assert set(packed.domains) == {"en", "code", "math"}
    assert not packed.score_mask[:, 0].any()  # first position is never a target
    assert (packed.score_mask <= packed.attention_mask.bool()).all()
    truncated = load_data(path, tok, seq_len=8, pack=False)
    assert truncated.input_ids.shape == (12, 8) and truncated.input_ids[0, 0] == tok.bos_token_id


def test_seeded_sampling_and_per_domain(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", text_rows(30))
    a = load_data(path, tok, seq_len=8, pack=False, num_samples=5, seed=3)
    b = load_data(path, tok, seq_len=8, pack=False, num_samples=5, seed=3)
    c = load_data(path, tok, seq_len=8, pack=False, num_samples=5, seed=4)
    assert len(a) == 5 and torch.equal(a.input_ids, b.input_ids) and a.fingerprint == b.fingerprint
    assert a.fingerprint != c.fingerprint
    per = load_data(path, tok, seq_len=8, pack=False, num_samples=2, per_domain=True)
    assert sorted(per.domains) == ["code", "code", "en", "en", "math", "math"]


def test_chat_rows_score_only_assistant_tokens(tok):
    chat = (
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": "ok"},
    )
    data = tokenize_rows([Row(None, chat, "chat")], tok, seq_len=128, pack=False)
    scored = tok.convert_ids_to_tokens(data.input_ids[0][data.score_mask[0]].tolist())
    assert "".join(scored) == "yo\nok\n"  # content + end of message, never the headers or user turns


def test_text_without_domain_is_all(tmp_path, tok):
    data = load_data(write_jsonl(tmp_path / "d.jsonl", [{"text": "abc"}]), tok, seq_len=8)
    assert data.domains == ["all"]


@pytest.mark.parametrize(
    "content, kwargs, message",
    [
        ("", {}, "holds no rows"),
        ('{"text": "a"}\n{"text": \n', {}, "line 2 is not valid JSON"),
        ('{"body": "a"}\n', {}, "has no 'text' field (fields: body)"),
        ('{"text": 3}\n', {}, "is int, not text"),
        ('{"messages": [{"role": "user", "content": "a"}]}\n', {"no_template": True}, "no chat template"),
        ('{"messages": "hello"}\n', {}, "'messages' must be a non-empty list"),
        ('{"text": "   "}\n', {}, "holds no rows"),
    ],
)
def test_data_errors_are_one_line(tmp_path, content, kwargs, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    tok = tiny_tokenizer(chat=not kwargs.get("no_template"))
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        load_data(path, tok, seq_len=16)
    assert "\n" not in str(err.value)


def test_missing_and_unparsable_files(tmp_path, tok):
    with pytest.raises(DataError, match="does not exist"):
        load_data(tmp_path / "nope.jsonl", tok)
    (tmp_path / "bad.json").write_text("[1, 2")
    with pytest.raises(DataError, match="not valid JSON"):
        load_data(tmp_path / "bad.json", tok)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    pytest.importorskip("pyarrow")
    with pytest.raises(DataError, match="not a readable parquet file"):
        load_data(tmp_path / "bad.parquet", tok)


def test_hub_dataset_name_goes_through_datasets(monkeypatch, tok):
    """A source that is not a local file is read with datasets.load_dataset(name, config, split=...)."""
    import sys
    import types

    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        if name == "org/missing":
            raise FileNotFoundError("Dataset 'org/missing' doesn't exist on the Hub\nmore details")
        return [{"content": "hub text one", "lang": "en"}, {"content": "hub text two", "lang": "de"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    data = load_data(
        "org/corpus", tok, seq_len=8, text_field="content", domain_field="lang", config="c1", split="val"
    )
    assert calls == [("org/corpus", "c1", "val")] and data.domain_names == ["de", "en"]
    with pytest.raises(
        DataError, match="cannot load 'org/missing' as a local file or hub dataset: Dataset"
    ) as err:
        load_data("org/missing", tok)
    assert "\n" not in str(err.value)


def test_prompt_completion_rows_score_the_answer_only(tmp_path):
    """Answer-aware scoring: a prompt/completion row conditions on the prompt and scores the
    completion and the end-of-sequence token only."""
    tok = tiny_tokenizer()
    path = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "12+7=", "completion": "19"}])
    data = load_data(path, tok, seq_len=64, pack=False)
    n_prompt = len(tok("12+7=")["input_ids"])
    n_answer = len(tok("19", add_special_tokens=False)["input_ids"]) + 1  # + eos
    scored = data.score_mask[0].tolist()
    assert scored[:n_prompt] == [False] * n_prompt
    assert scored[n_prompt : n_prompt + n_answer] == [True] * n_answer
    assert sum(scored) == n_answer
    with pytest.raises(DataError, match="'prompt' and 'completion' must be text"):
        load_data(write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": 3}]), tok)


def test_weighted_mixture_of_sources(tmp_path):
    """`a.jsonl:0.75,b.jsonl:0.25` draws 3 of 4 windows from a and 1 from b; a lone `a.jsonl:1` is a."""
    tok = tiny_tokenizer()
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"alpha {i} " * 8, "domain": "a"} for i in range(20)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"beta {i} " * 3, "domain": "b"} for i in range(20)])
    mix = load_data(f"{a}:0.75,{b}:0.25", tok, seq_len=16, num_samples=4, seed=0)
    assert sorted(mix.domains) == ["a", "a", "a", "b"]
    assert mix.input_ids.shape[0] == mix.attention_mask.shape[0] == mix.score_mask.shape[0] == 4
    alone = load_data(f"{a}:1", tok, seq_len=16, num_samples=4, seed=0)
    assert torch.equal(alone.input_ids, load_data(a, tok, seq_len=16, num_samples=4, seed=0).input_ids)
    with pytest.raises(DataError, match="PATH:WEIGHT"):
        load_data(f"{a}:0.5,{b}:-1", tok, seq_len=16)
