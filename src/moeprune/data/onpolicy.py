"""On-policy search data: the unpruned model continues the given prompts, and only what it wrote is
scored. That is what speculative decoding sees: a draft is judged along the target's own trajectory.

A prompt set is rows with a ``prompt`` and no completion, or chats whose last message is the user's
(rendered with the chat template and its generation prompt). Greedy by default; ``sample=True``
draws with ``torch.manual_seed(seed + batch)``, so the same seed gives the same tokens.

    rows = read_rows("prompts.jsonl")
    if is_prompt_set(rows):
        data = continue_prompts(model, tokenizer, rows, gen_tokens=64, num_samples=16, seed=0)
        data.score_mask   # (B, L) True exactly on the generated tokens
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import DataError
from .build import TokenSet
from .sources import Row


def _until(tokens: list[int], stop: str | None, tokenizer) -> list[int]:
    """`tokens` up to and including the first token whose text completes `stop` (all without one)."""
    if stop:
        for k in range(len(tokens)):
            if stop in tokenizer.decode(tokens[: k + 1]):
                return tokens[: k + 1]
    return tokens


def is_prompt_set(rows: Sequence[Row]) -> bool:
    """Every row is a bare prompt or a chat that ends with the user's turn."""
    return bool(rows) and all(
        (r.prompt is not None and r.completion is None)
        or (r.messages is not None and r.messages[-1].get("role") == "user")
        for r in rows
    )


def prompt_ids(row: Row, tokenizer) -> list[int]:
    """The tokens the model continues: the prompt, or the chat with the assistant's generation prompt."""
    if row.prompt is not None:
        return list(tokenizer(row.prompt)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the prompts are chats but the tokenizer has no chat template")
    out = tokenizer.apply_chat_template(list(row.messages), add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


@torch.inference_mode()
def continue_prompts(
    model,
    tokenizer,
    rows: Sequence[Row],
    *,
    gen_tokens: int = 64,
    num_samples: int | None = None,
    sample: bool = False,
    seed: int = 0,
    max_len: int | None = None,
    stop: str | None = None,
) -> TokenSet:
    """`num_samples` prompts (seeded draw, kept in order) continued by `model` for up to `gen_tokens`
    tokens (stopping at end-of-sequence, and after the first `stop` text, e.g. "\\n" for one-line
    answers, when given): a `TokenSet` scored on the continuations only. Prompts of
    one length are generated together (no padding inside a batch, so no position shifts)."""
    if not is_prompt_set(rows):
        raise DataError(
            "on-policy search data needs prompts: rows with 'prompt' only, or chats ending with the user"
        )
    if gen_tokens < 1:
        raise DataError(f"tokens to generate must be at least 1, got {gen_tokens}")
    order = list(range(len(rows)))
    if num_samples is not None and num_samples < len(rows):
        order = sorted(
            np.random.default_rng(seed).choice(len(rows), size=num_samples, replace=False).tolist()
        )
    prompts = {i: prompt_ids(rows[i], tokenizer) for i in order}
    if max_len is not None:
        prompts = {i: p[-max(1, max_len - gen_tokens) :] for i, p in prompts.items()}
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    device = next(p.device for p in model.parameters() if not p.is_meta)
    written: dict[int, list[int]] = {}
    by_length: dict[int, list[int]] = {}
    for i in order:
        by_length.setdefault(len(prompts[i]), []).append(i)
    for batch, (_, members) in enumerate(sorted(by_length.items())):
        ids = torch.tensor([prompts[i] for i in members], device=device)  # (b, P)
        if sample:
            torch.manual_seed(seed + batch)
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen_tokens, do_sample=sample,
            pad_token_id=pad, eos_token_id=eos, use_cache=True,
        )  # fmt: skip
        for i, row in zip(members, out[:, ids.shape[1] :].tolist(), strict=True):
            cut = row.index(eos) + 1 if eos is not None and eos in row else len(row)
            written[i] = _until(row[:cut], stop, tokenizer)
    width = max(len(prompts[i]) + len(written[i]) for i in order)
    input_ids = torch.full((len(order), width), int(pad), dtype=torch.long)  # (B, L)
    attention = torch.zeros(len(order), width, dtype=torch.long)  # (B, L)
    score = torch.zeros(len(order), width, dtype=torch.bool)  # (B, L): the generated tokens
    for b, i in enumerate(order):
        p, g = prompts[i], written[i]
        input_ids[b, : len(p) + len(g)] = torch.tensor(p + g)
        attention[b, : len(p) + len(g)] = 1
        score[b, len(p) : len(p) + len(g)] = True
    if not bool(score.any()):
        raise DataError("the model wrote nothing after the prompts (it ended every one at once)")
    return TokenSet(input_ids, attention, score, [rows[i].domain for i in order])
