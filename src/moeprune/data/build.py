"""Rows -> `TokenSet`: tokenisation (chat template with assistant-only scoring), packing, sampling."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .sources import Row, read_rows


@dataclass
class TokenSet:
    """B samples of at most L tokens, right-padded.

    input_ids (B, L) int64; attention_mask (B, L) int64 (1 = real token); score_mask (B, L) bool
    (token t is a scored target, predicted from position t-1; never the first position or padding);
    domains: B labels.
    """

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    score_mask: torch.Tensor  # (B, L)
    domains: list[str]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int(self.attention_mask.sum())

    @property
    def domain_names(self) -> list[str]:
        """Sorted distinct domain labels."""
        return sorted(set(self.domains))

    @property
    def fingerprint(self) -> str:
        """sha256 (16 hex) of tokens, masks and domain labels: identifies the data of saved statistics."""
        h = hashlib.sha256()
        for t in (self.input_ids, self.attention_mask, self.score_mask):
            h.update(t.contiguous().numpy().tobytes())
        h.update("\x00".join(self.domains).encode())
        return h.hexdigest()[:16]

    def batches(self, batch_size: int) -> Iterator[TokenSet]:
        for s in range(0, len(self), batch_size):
            sl = slice(s, s + batch_size)
            yield TokenSet(self.input_ids[sl], self.attention_mask[sl], self.score_mask[sl], self.domains[sl])


def load_data(
    source: str | Path,
    tokenizer,
    *,
    seq_len: int = 512,
    num_samples: int | None = None,
    per_domain: bool = False,
    pack: bool = True,
    seed: int = 0,
    text_field: str = "text",
    domain_field: str | None = "domain",
    split: str = "train",
    config: str | None = None,
) -> TokenSet:
    """Read `source` (see `read_rows`) and build a `TokenSet` (see `tokenize_rows`). A weighted
    mixture ``"a.jsonl:0.7,b.jsonl:0.3"`` draws round(w * num_samples) windows from each source."""
    if tokenizer is None:
        raise DataError("the model has no tokenizer, so text data cannot be tokenised")
    parts = mixture(source)
    if len(parts) > 1:
        total = sum(w for _, w in parts)
        sets = [
            load_data(
                path, tokenizer, seq_len=seq_len, pack=pack, seed=seed + k, text_field=text_field,
                domain_field=domain_field, split=split, config=config, per_domain=per_domain,
                num_samples=None if num_samples is None else max(1, round(num_samples * w / total)),
            )
            for k, (path, w) in enumerate(parts)
        ]  # fmt: skip
        return concatenate(sets, tokenizer)
    source = parts[0][0]
    rows = read_rows(source, text_field=text_field, domain_field=domain_field, split=split, config=config)
    return tokenize_rows(
        rows, tokenizer, seq_len=seq_len, num_samples=num_samples, per_domain=per_domain, pack=pack, seed=seed
    )


def mixture(source: str | Path) -> list[tuple[str, float]]:
    """``"a.jsonl:0.7,b.jsonl:0.3"`` -> [(path, weight)]; a single source (weight 1) otherwise."""
    text = str(source)
    if "," not in text and ":" not in text.rsplit("/", 1)[-1]:
        return [(text, 1.0)]
    parts = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        path, _, weight = item.rpartition(":")
        try:
            w = float(weight)
        except ValueError:
            path, w = item, 1.0
        if not path or w <= 0:
            raise DataError(f"'{item}' in a data mixture is not PATH:WEIGHT with a weight > 0")
        parts.append((path, w))
    return parts


def concatenate(sets: Sequence[TokenSet], tokenizer) -> TokenSet:
    """One `TokenSet` of every sample of `sets`, right-padded to the widest."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    width = max(t.input_ids.shape[1] for t in sets)

    def widen(t: torch.Tensor, value) -> torch.Tensor:  # (B, L) -> (B, width)
        out = torch.full((t.shape[0], width), value, dtype=t.dtype)
        out[:, : t.shape[1]] = t
        return out

    return TokenSet(
        torch.cat([widen(t.input_ids, int(pad)) for t in sets]),
        torch.cat([widen(t.attention_mask, 0) for t in sets]),
        torch.cat([widen(t.score_mask, False) for t in sets]),
        [d for t in sets for d in t.domains],
    )


def tokenize_rows(
    rows: Sequence[Row],
    tokenizer,
    *,
    seq_len: int = 512,
    num_samples: int | None = None,
    per_domain: bool = False,
    pack: bool = True,
    seed: int = 0,
) -> TokenSet:
    """Tokenise, pack/truncate and sample.

    Text rows become ``tokenizer(text) + [eos]``; chat rows ``apply_chat_template(messages)`` with only
    the assistant messages' tokens scored. ``pack=True`` concatenates each domain's rows into one
    stream cut into windows of ``seq_len`` tokens (the last, shorter window kept if >= 2 tokens);
    ``pack=False`` truncates every row to ``seq_len``. Then ``num_samples`` windows are drawn without
    replacement with ``numpy.random.default_rng(seed)`` (from every domain when ``per_domain``), kept in
    their original order.
    """
    if seq_len < 2:
        raise DataError(f"sequence length must be at least 2 tokens, got {seq_len}")
    if not rows:
        raise DataError("the calibration set is empty (no rows)")
    if any(r.messages is not None for r in rows) and not getattr(tokenizer, "chat_template", None):
        raise DataError("the data has chat rows ('messages') but the tokenizer has no chat template")
    encoded = [(*_encode(row, tokenizer), row.domain) for row in rows]  # (ids, scored, domain)
    windows = _pack(encoded, seq_len) if pack else [(i[:seq_len], s[:seq_len], d) for i, s, d in encoded]
    windows = [w for w in windows if len(w[0]) >= 2]
    if not windows:
        raise DataError("the calibration set is empty: no row has 2 or more tokens")
    windows = _sample(windows, num_samples, per_domain, seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    width = max(len(w[0]) for w in windows)
    ids = torch.full((len(windows), width), int(pad), dtype=torch.long)  # (B, L)
    attn = torch.zeros(len(windows), width, dtype=torch.long)  # (B, L)
    score = torch.zeros(len(windows), width, dtype=torch.bool)  # (B, L)
    for b, (i, s, _) in enumerate(windows):
        ids[b, : len(i)] = torch.tensor(i)
        attn[b, : len(i)] = 1
        score[b, : len(s)] = torch.tensor(s)
    score[:, 0] = False  # the first token of a sample has no prediction
    if not bool(score.any()):
        raise DataError("the calibration set has no scored tokens (chat rows without assistant messages?)")
    return TokenSet(ids, attn, score, [w[2] for w in windows])


def _encode(row: Row, tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids of one row and whether each is scored."""
    if row.prompt is not None and row.completion is None:  # a bare prompt reads as text
        return _encode(Row(text=row.prompt, messages=None, domain=row.domain), tokenizer)
    if row.prompt is not None:  # answer-aware: the prompt conditions, the completion (+ eos) is scored
        prompt = list(tokenizer(row.prompt)["input_ids"])
        answer = list(tokenizer(row.completion, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            answer.append(int(tokenizer.eos_token_id))
        return prompt + answer, [False] * len(prompt) + [True] * len(answer)
    if row.messages is None:
        ids = list(tokenizer(row.text)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(int(tokenizer.eos_token_id))
        return ids, [True] * len(ids)
    messages = list(row.messages)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []  # character spans of assistant messages in the rendered chat
    for n, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        # the assistant header (generation prompt) is not scored, its content and end marker are
        start = (
            len(tokenizer.apply_chat_template(messages[:n], tokenize=False, add_generation_prompt=True))
            if n
            else 0
        )
        end = len(tokenizer.apply_chat_template(messages[: n + 1], tokenize=False))
        spans.append((start, end))
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise DataError("assistant-only scoring needs a fast tokenizer (offset mappings)") from None
    ids = list(enc["input_ids"])
    scored = [any(a <= s < b for a, b in spans) for s, _ in enc["offset_mapping"]]
    return ids, scored


def _pack(encoded: list, seq_len: int) -> list:
    """Per domain: one stream of all rows, cut into windows of `seq_len`."""
    streams: dict[str, tuple[list[int], list[bool]]] = {}
    for ids, scored, dom in encoded:
        si, ss = streams.setdefault(dom, ([], []))
        si.extend(ids)
        ss.extend(scored)
    windows = []
    for dom, (si, ss) in streams.items():
        windows += [(si[s : s + seq_len], ss[s : s + seq_len], dom) for s in range(0, len(si), seq_len)]
    return windows


def _sample(windows: list, num_samples: int | None, per_domain: bool, seed: int) -> list:
    if num_samples is None:
        return windows
    if num_samples < 1:
        raise DataError(f"number of samples must be at least 1, got {num_samples}")
    rng = np.random.default_rng(seed)
    if not per_domain:
        pick = rng.choice(len(windows), size=min(num_samples, len(windows)), replace=False)
        return [windows[i] for i in sorted(pick)]
    chosen: list[int] = []
    for dom in sorted({w[2] for w in windows}):
        idx = [i for i, w in enumerate(windows) if w[2] == dom]
        chosen += [idx[i] for i in rng.choice(len(idx), size=min(num_samples, len(idx)), replace=False)]
    return [windows[i] for i in sorted(chosen)]
