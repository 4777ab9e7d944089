"""Perplexity of held-out text, per domain."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from ._util import batch_logits, inference_mode


def domain_token_streams(
    tokenizer, rows: Iterable[Mapping[str, str]], max_tokens_per_domain: int | None = 20_000
) -> dict[str, list[int]]:
    """Concatenate each domain's rows as ``<bos> text <eos>`` (bos only if the tokenizer adds it) and
    truncate to ``max_tokens_per_domain`` tokens. Rows are ``{"text": ..., "domain": ...}``."""
    streams: dict[str, list[int]] = {}
    for row in rows:
        dom = row.get("domain", "all")
        ids = streams.setdefault(dom, [])
        if max_tokens_per_domain is not None and len(ids) >= max_tokens_per_domain:
            continue
        ids.extend(tokenizer(row["text"])["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    if max_tokens_per_domain is not None:
        streams = {d: ids[:max_tokens_per_domain] for d, ids in streams.items()}
    return streams


def sequence_nll(model, ids: list[int], seq_len: int = 512, batch_size: int = 8) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (nats) over non-overlapping windows of ``seq_len``
    tokens, and the number of predicted tokens (each window predicts its tokens 2..n)."""
    windows = [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
    windows = [w for w in windows if len(w) >= 2]
    batches = []
    for b in range(0, len(windows), batch_size):
        chunk = windows[b : b + batch_size]
        width = max(len(w) for w in chunk)
        x = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, w in enumerate(chunk):  # right padding
            x[i, : len(w)] = torch.tensor(w)
            mask[i, : len(w)] = 1
        batches.append((x, mask))
    total, count = 0.0, 0
    with inference_mode(model):
        for (x, mask), logits in zip(batches, batch_logits(model, batches), strict=True):
            x, mask = x.to(logits.device), mask.to(logits.device)
            logp = torch.log_softmax(logits.float()[:, :-1], dim=-1)
            tgt = x[:, 1:]
            nll = -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
            keep = mask[:, 1:].bool()
            total += nll[keep].sum().item()
            count += int(keep.sum().item())
    return total, count


def perplexity_by_domain(
    model,
    tokenizer,
    rows: Iterable[Mapping[str, str]],
    max_tokens_per_domain: int | None = 20_000,
    seq_len: int = 512,
    batch_size: int = 8,
) -> dict[str, dict[str, float]]:
    """Perplexity per domain: ppl_d = exp( sum_t -log p(y_t | y_<t) / N_d ) over the domain's
    predicted tokens. Returns ``{domain: {"ppl", "nll", "tokens"}}`` (nll = mean nats per token)."""
    out: dict[str, dict[str, float]] = {}
    for dom, ids in domain_token_streams(tokenizer, rows, max_tokens_per_domain).items():
        total, count = sequence_nll(model, ids, seq_len, batch_size)
        nll = total / max(count, 1)
        out[dom] = {"ppl": math.exp(nll), "nll": nll, "tokens": count}
    return out
