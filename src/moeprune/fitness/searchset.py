"""The search set: token batches on which the teacher and every candidate are compared."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import DataError


@dataclass
class SearchBatch:
    input_ids: torch.Tensor  # (B, L) long
    attention_mask: torch.Tensor  # (B, L) long, 1 = real token
    score_mask: torch.Tensor  # (B, L) bool, True = this token is scored (predicted from its prefix)

    def scored_positions(self) -> torch.Tensor:
        """Flat indices into (B * L) of the positions t whose next token t+1 is scored. (n,)

        Logits at position t predict token t+1, so position t counts when t+1 is attended and scored.
        """
        nxt = self.attention_mask[:, 1:].bool() & self.score_mask[:, 1:]  # (B, L-1)
        keep = torch.zeros_like(self.score_mask)  # (B, L)
        keep[:, :-1] = nxt
        return keep.reshape(-1).nonzero().squeeze(1)

    def needed_positions(self, scored: torch.Tensor | None = None) -> torch.Tensor:
        """Flat indices into (B * L) of the positions at or before their row's last scored one: the
        only positions the scored logits depend on (attention is causal), e.g. not the right padding
        and the last token of on-policy answers. (Left padding stays: a scored position may be a pad
        whose next token is the row's first.) `scored`: `scored_positions()` where already known. (m,)"""
        rows, length = self.input_ids.shape
        pos = self.scored_positions() if scored is None else scored  # (n,)
        last = torch.full((rows,), -1, dtype=torch.long, device=pos.device)  # per row; -1: none scored
        last.scatter_reduce_(0, pos // length, pos % length, reduce="amax")
        col = torch.arange(length, device=pos.device).unsqueeze(0)  # (1, L)
        keep = col <= last.unsqueeze(1)  # (B, L)
        return keep.reshape(-1).nonzero().squeeze(1)

    def stacked(self, copies: int) -> SearchBatch:
        """The batch repeated `copies` times along dim 0 (one copy per stacked candidate)."""
        return SearchBatch(
            self.input_ids.repeat(copies, 1),
            self.attention_mask.repeat(copies, 1),
            self.score_mask.repeat(copies, 1),
        )

    def to(self, device: torch.device | str) -> SearchBatch:
        return SearchBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.score_mask.to(device)
        )

    def labels(self) -> torch.Tensor:
        """Next token at every flat position (the last position gets -1). (B * L,)"""
        nxt = torch.full_like(self.input_ids, -1)
        nxt[:, :-1] = self.input_ids[:, 1:]
        return nxt.reshape(-1)


BATCH_TOKENS = 2048  # token positions per search batch (rows x length) by default


@dataclass
class SearchSet:
    """Teacher-forced text for the fitness, as fixed batches (shapes never change between candidates)."""

    batches: list[SearchBatch]

    @classmethod
    def from_tensors(
        cls,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        score_mask: torch.Tensor | None = None,
        batch_size: int | None = None,
        min_batches: int = 1,
    ) -> SearchSet:
        """input_ids (N, L); attention_mask (N, L) (default all ones); score_mask (N, L) bool, e.g.
        assistant-only tokens (default: every attended token). `batch_size` rows per batch; default
        max(1, min(BATCH_TOKENS // L, ceil(N / min_batches))): 8 windows of 256 tokens, or 204 short
        on-policy answers of 10, so that short rows do not pay the per-batch cost of every layer many
        times over; `min_batches` (racing's slices are whole batches) splits a set that would fit
        fewer batches."""
        if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] < 2:
            raise DataError(
                f"search set must be (sequences, length >= 2) token ids, got shape {tuple(input_ids.shape)}"
            )
        input_ids = input_ids.long()
        if batch_size is None:
            n, length = input_ids.shape
            batch_size = max(1, min(BATCH_TOKENS // length, -(-n // max(1, min_batches))))
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if score_mask is None:
            score_mask = attention_mask.bool()
        batches = [
            SearchBatch(
                input_ids[i : i + batch_size],
                attention_mask[i : i + batch_size].long(),
                score_mask[i : i + batch_size].bool(),
            )
            for i in range(0, input_ids.shape[0], batch_size)
        ]
        out = cls(batches)
        if out.num_scored() == 0:
            raise DataError("the search set has no scored tokens (check the attention/score masks)")
        return out

    @classmethod
    def from_tokens(
        cls, data, batch_size: int | None = None, min_batches: int = 1, shuffle_seed: int | None = None
    ) -> SearchSet:
        """From a `data.TokenSet` (or anything with input_ids, attention_mask, score_mask). With
        `shuffle_seed` the rows are first put in a seeded random order, so that every batch holds
        rows of every domain (or prompt kind) the data has: racing's first slices then stand for the
        whole set (benchmarks/racing.py --mix). The exact fitness, a mean over every scored token,
        does not depend on the order."""
        if isinstance(data, SearchSet):
            return data
        ids, mask, score = (
            data.input_ids,
            getattr(data, "attention_mask", None),
            getattr(data, "score_mask", None),
        )
        if shuffle_seed is not None:
            perm = torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(shuffle_seed))  # (N,)
            ids = ids[perm]
            mask = mask[perm] if mask is not None else None
            score = score[perm] if score is not None else None
        return cls.from_tensors(ids, mask, score, batch_size, min_batches)

    def to(self, device: torch.device | str) -> SearchSet:
        """The same batches on `device` (the model's, for a model on GPU)."""
        return SearchSet([b.to(device) for b in self.batches])

    def scored_rows(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per batch, the flat indices of the scored positions (n_b,) and their next tokens (n_b,)."""
        positions = [b.scored_positions() for b in self.batches]
        return positions, [b.labels()[p] for b, p in zip(self.batches, positions, strict=True)]

    def num_scored(self) -> int:
        return sum(int(b.scored_positions().numel()) for b in self.batches)

    def num_tokens(self) -> int:
        return sum(int(b.attention_mask.sum()) for b in self.batches)
