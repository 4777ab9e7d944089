"""Score candidate plans against the teacher by masking, reusing hidden states between candidates.

A candidate's hidden state at the input of decoder layer j depends only on its masks in layers
0..j-1. `CandidateEvaluator` keeps, in a bounded LRU cache, the input of every MoE layer m of the
candidates it has run, keyed by ``(m, removed sets of the MoE layers before m)``; a new candidate
starts from the deepest MoE layer whose key is cached and replays only the layers after it.
Results are bitwise those of a full forward (same layers, same inputs); ``reuse=False`` and
``full_forward=True`` give the straightforward reference used by the benchmarks.
"""

from __future__ import annotations

import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from ..arch import moe_layers
from ..surgery import ExpertPlan, mask_experts
from .metrics import FITNESS, Fitness
from .replay import BatchRecord, LayerReplay
from .searchset import SearchSet
from .teacher import CacheKind, TeacherCache, teacher_slice

PrefixKey = tuple[int, tuple[tuple[int, ...], ...]]


@dataclass
class FitnessResult:
    """Mean over the scored tokens; ``lower``/``upper`` bound the exact value on a sparse cache."""

    name: str
    value: float
    score: float  # what the search maximises (value, or -value for losses)
    lower: float | None = None
    upper: float | None = None
    tokens: int = 0


@dataclass
class ReuseStats:
    evaluations: int = 0
    hits: int = 0  # candidates that started past the first MoE layer's shared input
    layers_run: int = 0
    layers_total: int = 0  # layers a full forward of every candidate would run
    eval_seconds: float = 0.0

    def hit_rate(self) -> float:
        return self.hits / self.evaluations if self.evaluations else 0.0

    def layer_fraction(self) -> float:
        return self.layers_run / self.layers_total if self.layers_total else 1.0

    def as_dict(self) -> dict:
        return {
            "evaluations": self.evaluations,
            "hit_rate": round(self.hit_rate(), 4),
            "layers_run_fraction": round(self.layer_fraction(), 4),
            "eval_seconds": round(self.eval_seconds, 3),
        }


class HiddenCache:
    """LRU of per-batch hidden states, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[PrefixKey, list[torch.Tensor]] = OrderedDict()

    @staticmethod
    def _size(states: list[torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in states)

    def get(self, key: PrefixKey) -> list[torch.Tensor] | None:
        states = self._items.get(key)
        if states is not None:
            self._items.move_to_end(key)
        return states

    def put(self, key: PrefixKey, states: list[torch.Tensor]) -> None:
        size = self._size(states)
        if key in self._items or size > self.max_bytes:
            return
        self._items[key] = states
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= self._size(old)

    def __len__(self) -> int:
        return len(self._items)


class CandidateEvaluator:
    """Teacher cache + fitness of any `ExpertPlan` on one search set.

    The teacher (unpruned model) is run once, here; candidates are evaluated under `mask_experts`.
    """

    def __init__(
        self,
        model: nn.Module,
        search: SearchSet,
        *,
        fitness: str = "esap",
        cache: CacheKind = "sparse",
        top_k: int = 64,
        reuse: bool = True,
        full_forward: bool = False,
        cache_bytes: int = 512 * 2**20,
    ) -> None:
        self.model = model
        self.search = search
        self.fitness: Fitness = FITNESS.get(fitness)
        self.replay_fallback: str | None = None  # why layer replay is off for this model, if it is
        try:
            self.replay: LayerReplay | None = LayerReplay(model)
        except (AttributeError, TypeError) as e:
            self.replay, self.replay_fallback = None, f"no layers/norm/head to replay ({e})"
            full_forward = True
        self.reuse = reuse and not full_forward
        self.full_forward = full_forward
        self.moe_indices = [layer.index for layer in moe_layers(model)]
        self.hidden = HiddenCache(cache_bytes)
        self.stats = ReuseStats()
        self.positions = [b.scored_positions() for b in search.batches]  # (n_b,) flat indices
        self.labels = [b.labels()[p] for b, p in zip(search.batches, self.positions, strict=True)]  # (n_b,)
        t0 = time.perf_counter()
        self.records: list[BatchRecord] = []
        slices = []
        for batch, pos in zip(search.batches, self.positions, strict=True):
            record = self.replay.record(batch) if self.replay is not None else self._plain_record(batch)
            if not self.full_forward and not self.records:
                self._check_replay(record)
            logits = record.logits.reshape(-1, record.logits.shape[-1])[pos]  # (n_b, V)
            slices.append(teacher_slice(logits, cache, top_k))
            record.logits = None
            if self.full_forward:
                record.calls = []
            self.records.append(record)
        self.teacher = TeacherCache(kind=cache, top_k=top_k, slices=slices)
        self.teacher_seconds = time.perf_counter() - t0

    def _plain_record(self, batch) -> BatchRecord:
        with torch.inference_mode():
            out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        return BatchRecord(layer0_input=torch.empty(0), logits=out.logits)

    def _check_replay(self, record: BatchRecord) -> None:
        """Replaying the layers must reproduce the model's own logits; otherwise fall back to a full
        forward per candidate (correct, without reuse) and say so."""
        try:
            ok = torch.allclose(
                self.replay.forward_from(0, record.layer0_input, record), record.logits, atol=1e-5
            )
            reason = "replayed layers do not reproduce the model's logits"
        except Exception as e:  # a family whose layers need more than what its forward passed them
            ok, reason = False, f"replaying its layers failed ({type(e).__name__}: {e})"
        if not ok:
            self.replay_fallback = reason
            self.full_forward, self.reuse = True, False
            warnings.warn(
                f"{reason}: evaluating every candidate with a full forward (no hidden-state reuse)",
                stacklevel=3,
            )

    # --- keys -------------------------------------------------------------------------------
    def _removed(self, plan: ExpertPlan) -> dict[int, tuple[int, ...]]:
        return {m: tuple(sorted(plan.removed.get(m, ()))) for m in self.moe_indices}

    def _key(self, layer: int, removed: dict[int, tuple[int, ...]]) -> PrefixKey:
        return layer, tuple(removed[m] for m in self.moe_indices if m < layer)

    # --- evaluation -------------------------------------------------------------------------
    @torch.inference_mode()
    def candidate_logits(self, plan: ExpertPlan | dict) -> list[torch.Tensor]:
        """Logits of the masked model on every batch: [(B, L, V)]."""
        if not isinstance(plan, ExpertPlan):
            plan = ExpertPlan.from_removed(plan)
        n_layers = self.replay.num_layers if self.replay is not None else 1
        with mask_experts(self.model, plan):
            if self.full_forward:
                self.stats.layers_run += n_layers
                self.stats.layers_total += n_layers
                return [
                    self.model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
                    for b in self.search.batches
                ]
            removed = self._removed(plan)
            start, states = 0, [r.layer0_input for r in self.records]
            if self.reuse:
                for m in reversed(self.moe_indices):
                    cached = self.hidden.get(self._key(m, removed))
                    if cached is not None:
                        start, states = m, cached
                        self.stats.hits += m > self.moe_indices[0]
                        break
            states = list(states)
            for i in range(start, n_layers):
                if self.reuse and i in self.moe_indices and i != start:
                    self.hidden.put(self._key(i, removed), list(states))
                states = [self.replay.run_layer(i, h, r) for h, r in zip(states, self.records, strict=True)]
            self.stats.layers_run += n_layers - start
            self.stats.layers_total += n_layers
            return [self.replay.head(h) for h in states]

    @torch.inference_mode()
    def evaluate(self, plan: ExpertPlan | dict) -> FitnessResult:
        """Fitness of `plan` = mean over the search set's scored tokens (see `metrics`)."""
        t0 = time.perf_counter()
        result = self.score_logits(self.candidate_logits(plan))
        self.stats.evaluations += 1
        self.stats.eval_seconds += time.perf_counter() - t0
        return result

    @torch.inference_mode()
    def score_logits(self, all_logits: list[torch.Tensor]) -> FitnessResult:
        """Fitness of any model's logits [(B, L, V)] on the search batches against the teacher."""
        total, lower, upper, n = 0.0, 0.0, 0.0, 0
        has_lower = has_upper = False
        parts = zip(all_logits, self.positions, self.labels, self.teacher.slices, strict=True)
        for logits, pos, labels, teacher in parts:
            logq = torch.log_softmax(logits.reshape(-1, logits.shape[-1])[pos].float(), dim=-1)  # (n_b, V)
            value, lo, up = self.fitness.fn(logq, teacher, labels)
            total += float(value.double().sum())
            if lo is not None:
                has_lower, lower = True, lower + float(lo.double().sum())
            if up is not None:
                has_upper, upper = True, upper + float(up.double().sum())
            n += int(pos.numel())
        value = total / n
        return FitnessResult(
            name=self.fitness.name,
            value=value,
            score=self.fitness.score(value),
            lower=lower / n if has_lower else None,
            upper=upper / n if has_upper else None,
            tokens=n,
        )

    @torch.inference_mode()
    def plain_forward_seconds(self, repeats: int = 1) -> float:
        """Wall time of one stock forward over the whole search set (the unit of evaluation cost)."""
        t0 = time.perf_counter()
        for _ in range(repeats):
            for b in self.search.batches:
                self.model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
        return (time.perf_counter() - t0) / repeats
