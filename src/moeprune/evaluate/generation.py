"""Open-ended generation scored by exact match of a greedy answer."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence

import torch

from ._util import inference_mode, model_device


def normalize_answer(text: str) -> str:
    """The answer is the generated text up to the first newline, stripped of spaces."""
    return text.split("\n", 1)[0].strip()


def _cache_kwarg(model) -> str:
    """transformers >= 5.2x names the KV-cache argument ``cache``; older versions ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def greedy_generate(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 8, batch_size: int = 64
) -> list[str]:
    """Batched greedy continuation of each prompt; returns the decoded new text.

    Prompts are left-padded; positions are counted from each row's first real token
    (``position_ids = cumsum(mask) - 1``) and the KV cache returned by the model is reused, which is
    what ``model.generate`` does, written out so any causal LM with a HF-style forward works. A row
    stops at eos (it is then padded)."""
    device = model_device(model)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cache_kw = _cache_kwarg(model)
    outs: list[str] = []
    try:
        with inference_mode(model):
            for b in range(0, len(prompts), batch_size):
                enc = tokenizer(list(prompts[b : b + batch_size]), return_tensors="pt", padding=True)
                cur = enc["input_ids"].to(device)  # (B, T)
                mask = enc["attention_mask"].to(device)  # (B, T)
                pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
                done = torch.zeros(cur.shape[0], dtype=torch.bool, device=device)
                past, new = None, []
                for _ in range(max_new_tokens):
                    out = model(
                        input_ids=cur,
                        attention_mask=mask,
                        position_ids=pos,
                        **{cache_kw: past},
                        use_cache=True,
                    )
                    nxt = out.logits[:, -1].argmax(-1)  # (B,)
                    nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
                    new.append(nxt)
                    if tokenizer.eos_token_id is not None:
                        done |= nxt == tokenizer.eos_token_id
                    if bool(done.all()):
                        break
                    past = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
                    if past is None:  # model without a cache: feed the whole sequence again
                        cur = torch.cat([cur, nxt[:, None]], dim=1)
                        pos = torch.cat([pos, pos[:, -1:] + 1], dim=1)
                    else:
                        cur, pos = nxt[:, None], pos[:, -1:] + 1
                    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                gen = torch.stack(new, dim=1)  # (B, new)
                outs.extend(tokenizer.batch_decode(gen, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old_side
    return outs


def generation_exact_match(
    model,
    tokenizer,
    items: Sequence[Mapping[str, str]],
    max_new_tokens: int = 8,
    batch_size: int = 64,
    return_predictions: bool = False,
) -> dict:
    """Exact match = mean over items of [normalize(greedy continuation of prompt) == answer].

    ``items`` are ``{"prompt": ..., "answer": ...}``. Returns ``{"exact_match", "n"}`` (and
    ``"predictions"`` when asked)."""
    preds = [
        normalize_answer(t)
        for t in greedy_generate(model, tokenizer, [it["prompt"] for it in items], max_new_tokens, batch_size)
    ]
    hits = [p == str(it["answer"]).strip() for p, it in zip(preds, items, strict=True)]
    res: dict = {"exact_match": sum(hits) / max(len(items), 1), "n": len(items)}
    if return_predictions:
        res["predictions"] = preds
    return res


__all__ = ["generation_exact_match", "greedy_generate", "normalize_answer"]
