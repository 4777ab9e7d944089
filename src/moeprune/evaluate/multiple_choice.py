"""Multiple choice scored by the log-likelihood of each option."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ._util import batch_logits, inference_mode


def option_logprobs(
    model, tokenizer, prompt: str, options: Sequence[str], batch_size: int = 64
) -> list[float]:
    """Summed log p(option tokens | prompt) for each option. The prompt is encoded with special tokens,
    each option without, and the two id lists are concatenated (no merge across the boundary)."""
    p_ids = tokenizer(prompt)["input_ids"]
    seqs = [(p_ids, tokenizer(o, add_special_tokens=False)["input_ids"]) for o in options]
    return _score(model, seqs, batch_size)


def _score(model, seqs: list[tuple[list[int], list[int]]], batch_size: int) -> list[float]:
    batches = []
    for b in range(0, len(seqs), batch_size):
        chunk = seqs[b : b + batch_size]
        width = max(len(p) + len(o) for p, o in chunk)
        x = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, (p, o) in enumerate(chunk):  # right padding
            x[i, : len(p) + len(o)] = torch.tensor(p + o)
            mask[i, : len(p) + len(o)] = 1
        batches.append((x, mask))
    scores: list[float] = []
    with inference_mode(model):
        for b, logits in enumerate(batch_logits(model, batches)):
            logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
            for i, (p, o) in enumerate(seqs[b * batch_size : (b + 1) * batch_size]):
                pos = torch.arange(len(p) - 1, len(p) + len(o) - 1)  # positions predicting the option
                tgt = torch.tensor(o, device=logp.device)
                scores.append(logp[i, pos.to(logp.device), tgt].sum().item())
    return scores


def multiple_choice_accuracy(
    model, tokenizer, items: Sequence[Mapping], batch_size: int = 64, return_predictions: bool = False
) -> dict:
    """Accuracy = mean over items of [argmax_j log p(option_j | prompt) == answer].

    ``items`` are ``{"prompt": str, "options": [str, ...], "answer": int}`` (index of the right option).
    All (prompt, option) pairs of all items are scored in shared batches. Ties go to the first option."""
    seqs, owners = [], []
    for k, it in enumerate(items):
        p_ids = tokenizer(it["prompt"])["input_ids"]
        for o in it["options"]:
            seqs.append((p_ids, tokenizer(o, add_special_tokens=False)["input_ids"]))
            owners.append(k)
    scores = _score(model, seqs, batch_size)
    per_item: list[list[float]] = [[] for _ in items]
    for k, s in zip(owners, scores, strict=True):
        per_item[k].append(s)
    preds = [max(range(len(s)), key=s.__getitem__) for s in per_item]
    hits = [p == int(it["answer"]) for p, it in zip(preds, items, strict=True)]
    res: dict = {"accuracy": sum(hits) / max(len(items), 1), "n": len(items)}
    if return_predictions:
        res["predictions"] = preds
    return res
