"""Score candidate plans against the teacher by masking, reusing hidden states between candidates.

A candidate's hidden state at the input of decoder layer j depends only on its masks in layers
0..j-1. `CandidateEvaluator` keeps, in a bounded LRU cache, the input of every MoE layer m of the
candidates it has run, with that layer's attention output, keyed by ``(m, removed sets of the MoE
layers before m)``; a new candidate starts from the deepest MoE layer whose key is cached, takes
that layer's attention output from the cache, and replays only the rest.
Restarting changes nothing: the layers' outputs are bitwise those of a full forward (same layers,
same inputs). `evaluate` also runs the last layer's MoE block on the scored positions only (the
only rows the head reads; `LayerReplay.run_layer(rows=...)`), and every other MoE block on the
positions the scored ones depend on (`SearchBatch.needed_positions`: those up to each row's last
scored one, where that skips at least `SKIP_SHARE` of a batch, e.g. the padding and final tokens
of short answers): the same computation on fewer rows, equal up to float rounding of the smaller
matmuls (ESAP to 1e-6, tested on every family). Such states are right at the needed positions only,
so they are cached under their own keys (``partial``), which `candidate_logits` (every position)
never restarts from.
``reuse=False`` and ``full_forward=True`` give the straightforward reference used by the benchmarks.

`evaluate_many` stacks up to ``candidate_batch`` candidates along the batch dimension
(`surgery.mask_stacked`): each joins the stack at its own restart layer and all of them run the
remaining layers as one forward of C * B sequences. That pays where one batch of B sequences leaves
the hardware idle (a GPU, small search batches); equal to one-at-a-time evaluation up to float
rounding of the wider matmuls (tested), so a search's plan does not depend on it in practice.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from ..arch import moe_layers
from ..arch.patching import input_device
from ..errors import MoepruneError, UnsupportedModelError
from ..plan import ExpertPlan
from ..surgery import mask_experts, mask_stacked
from .metrics import FITNESS, Fitness
from .replay import BatchRecord, LayerReplay, StackedCalls
from .searchset import SearchSet
from .teacher import (
    CACHE_KINDS,
    KEEP_PROBS_BYTES,
    CacheKind,
    TeacherCache,
    TeacherSlice,
    keep_teacher_probs,
    teacher_slice,
)
from .totals import FitnessResult, Totals

PrefixKey = tuple[int, tuple[tuple[int, ...], ...], bool]  # (layer, removed sets before it, partial)

# `evaluate` runs the MoE blocks before the last on a batch's needed positions only when they leave out
# at least this share of its positions (the gather and scatter cost more than a few skipped tokens).
SKIP_SHARE = 0.05

# Rows of logits built at once when scoring: (256, V) float32 stays in cache for the log-softmax and the
# fitness, which then cost ~2% of the lm_head instead of ~40% on (B * L, V) (measured on the testbed).
# An accelerator wants fewer, larger launches instead: as many rows as fit in DEVICE_HEAD_BYTES.
HEAD_ROWS = 256
DEVICE_HEAD_BYTES = 256 * 2**20


def head_rows_for(device: torch.device, vocab: int) -> int:
    """Scored rows per head chunk: `HEAD_ROWS` on a CPU, else (rows, V) float32 logits in DEVICE_HEAD_BYTES."""
    return HEAD_ROWS if device.type == "cpu" else max(HEAD_ROWS, DEVICE_HEAD_BYTES // (4 * vocab))


@dataclass
class ReuseStats:
    evaluations: int = 0
    hits: int = 0  # candidates that started past the first MoE layer's shared input
    layers_run: int = 0
    layers_total: int = 0  # layers a full forward of every candidate would run
    attention_reused: int = 0  # restart layers whose attention output came from the cache
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
            "attention_reused": self.attention_reused,
            "eval_seconds": round(self.eval_seconds, 3),
        }


@dataclass
class PrefixState:
    """What every candidate with one mask prefix shares at MoE layer m, per search batch."""

    inputs: list[torch.Tensor]  # layer m's input (B, L, H)
    attention: list | None = None  # layer m's attention sub-module output for that input

    def nbytes(self) -> int:
        tensors = list(self.inputs)
        for out in self.attention or ():
            tensors += [t for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)


class HiddenCache:
    """`PrefixState`s bounded in bytes; evicts the entry whose best plan scored lowest first.

    Every entry carries the best search score of the evaluated plans that ran through it. Evolution
    only mutates its elites, so the prefixes of high-scoring plans are the ones that later candidates
    share; dropping low scorers first keeps them (ties, and entries of unscored runs, go least
    recently used first). Entries of the candidate being evaluated cannot be evicted until `settle`;
    the cache never holds more than `max_bytes`: an entry that fits only by evicting pending ones is
    not stored (that candidate runs on without caching it).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[PrefixKey, PrefixState] = OrderedDict()
        self._scores: dict[PrefixKey, float] = {}

    @staticmethod
    def _size(state: PrefixState) -> int:
        return state.nbytes()

    def get(self, key: PrefixKey) -> PrefixState | None:
        state = self._items.get(key)
        if state is not None:
            self._items.move_to_end(key)
        return state

    def put(self, key: PrefixKey, states: PrefixState) -> bool:
        """Add a pending entry (score +inf until `settle`), evicting settled entries (lowest score,
        then least recently used, first) to make room; False when it is not stored."""
        size = self._size(states)
        if key in self._items or size > self.max_bytes:
            return False
        while self.bytes + size > self.max_bytes:
            settled = [k for k in self._items if self._scores[k] != math.inf]  # LRU order
            if not settled:
                return False  # only pending entries left: the cap holds, this one is not cached
            victim = min(settled, key=self._scores.__getitem__)
            self.bytes -= self._size(self._items.pop(victim))
            del self._scores[victim]
        self._items[key] = states
        self._scores[key] = math.inf
        self.bytes += size
        return True

    def settle(self, keys: list[PrefixKey], score: float | None) -> None:
        """Record that a plan scoring `score` (None: not scored) ran through `keys`."""
        for key in keys:
            if key in self._scores:
                old = self._scores[key]
                new = -math.inf if score is None else score
                self._scores[key] = new if old == math.inf else max(old, new)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: PrefixKey) -> bool:
        return key in self._items


@dataclass
class TeacherRun:
    """The teacher (unpruned model) run once on a search set: what every evaluator of that set shares.

    `records` hold, per search batch, the first layer's input and the per-layer call arguments that
    layer replay needs; `cache` the teacher's distributions on the scored tokens (dense or top-K).
    Build it with `run_teacher`; pass it to any number of `CandidateEvaluator`s (e.g. EEP's prune and
    merge phases) so the teacher pass runs once."""

    search: SearchSet  # on the model's device
    cache: TeacherCache
    records: list[BatchRecord]
    positions: list[torch.Tensor]  # (n_b,) flat indices of the scored tokens
    labels: list[torch.Tensor]  # (n_b,) their next tokens
    replay: LayerReplay | None
    replay_fallback: str | None  # why layer replay is off for this model, if it is
    seconds: float

    @property
    def kind(self) -> CacheKind:
        return self.cache.kind

    @property
    def top_k(self) -> int:
        return self.cache.top_k

    def subset(self, start: int, stop: int) -> TeacherRun:
        """The run on search batches start..stop-1 only (views, nothing copied): a racing slice.
        Whole batches, so a candidate's per-batch computation and its prefix cache stay valid."""
        return dataclasses.replace(
            self,
            search=SearchSet(self.search.batches[start:stop]),
            cache=dataclasses.replace(self.cache, slices=self.cache.slices[start:stop]),
            records=self.records[start:stop],
            positions=self.positions[start:stop],
            labels=self.labels[start:stop],
        )


@torch.inference_mode()
def run_teacher(
    model: nn.Module,
    search: SearchSet,
    *,
    cache: CacheKind = "sparse",
    top_k: int = 64,
    keep_calls: bool = True,
    nucleus_p: float = 0.95,
    keep_probs_bytes: int = KEEP_PROBS_BYTES,
) -> TeacherRun:
    """Run the unpruned `model` once over `search`: the teacher cache plus the records layer replay
    needs. ``keep_calls=False`` drops the per-layer call arguments (full-forward evaluation only).
    `top_k`: K of the sparse cache, K_max of the nucleus cache; `nucleus_p`: the nucleus's mass.
    `keep_probs_bytes`: the hidden cache keeps the teacher's probabilities (computed once, as a
    candidate's scoring would recompute them) when T x V float32 fit in it (0: never; `teacher`).

    Replaying the layers must reproduce the model's own logits; otherwise candidates are evaluated
    with a full forward each (correct, without reuse), and the reason is recorded (and warned)."""
    if cache not in CACHE_KINDS:
        raise ValueError(f"teacher cache must be one of {CACHE_KINDS}, got {cache!r}")
    if not 0.0 < nucleus_p <= 1.0:
        raise ValueError(f"nucleus_p must be in (0, 1], got {nucleus_p}")
    device = input_device(model)
    search = search.to(device)
    fallback: str | None = None
    try:
        replay: LayerReplay | None = LayerReplay(model)
    except UnsupportedModelError as e:  # the family's stack is more than layers -> norm -> head
        replay, fallback = None, str(e)
    if cache == "hidden" and replay is None:  # its final states come from layer replay: exact dense instead
        warnings.warn(
            f"the hidden teacher cache needs layer replay ({fallback}); using the dense cache", stacklevel=3
        )
        cache = "dense"
    positions, labels = search.scored_rows()  # per batch (n_b,) flat indices, (n_b,) next tokens
    t0 = time.perf_counter()
    records: list[BatchRecord] = []
    slices = []
    for batch, pos in zip(search.batches, positions, strict=True):
        if replay is not None:
            record = replay.record(batch, normed=cache == "hidden")
        else:
            record = _plain_record(model, batch)
        if replay is not None and fallback is None and not records:
            fallback = _replay_problem(replay, record)
        logits = record.logits.reshape(-1, record.logits.shape[-1])[pos]  # (n_b, V)
        normed = None if record.normed is None else record.normed.reshape(-1, record.normed.shape[-1])[pos]
        slices.append(
            teacher_slice(logits, cache, top_k, hidden=normed, nucleus_p=nucleus_p)
        )  # normed: (n_b, H)
        record.logits = record.normed = None
        if not keep_calls:
            record.calls = []
        records.append(record)
    teacher = TeacherCache(kind=cache, top_k=top_k, slices=slices, nucleus_p=nucleus_p)
    if replay is not None:  # a hidden cache whose T x V probabilities fit: computed once, kept
        vocab = model.config.get_text_config().vocab_size
        probs = lambda h: teacher_probs(replay, h)  # noqa: E731
        keep_teacher_probs(teacher, probs, head_rows_for(device, vocab), vocab, keep_probs_bytes)
    if fallback is not None and replay is not None:
        warnings.warn(
            f"{fallback}: evaluating every candidate with a full forward (no hidden-state reuse)",
            stacklevel=3,
        )
    return TeacherRun(
        search=search,
        cache=teacher,
        records=records,
        positions=positions,
        labels=labels,
        replay=replay,
        replay_fallback=fallback,
        seconds=time.perf_counter() - t0,
    )


def teacher_probs(replay: LayerReplay, hidden: torch.Tensor) -> torch.Tensor:
    """The teacher's p = softmax(lm_head(h)) in float32 (c, V) from normed final states h (c, H): the
    one computation behind the hidden cache, whether kept once or recomputed per candidate."""
    return torch.softmax(replay.logits_from_normed(hidden).float(), dim=-1)


def _plain_record(model: nn.Module, batch) -> BatchRecord:
    with torch.inference_mode():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return BatchRecord(layer0_input=torch.empty(0), logits=out.logits)


def _replay_problem(replay: LayerReplay, record: BatchRecord) -> str | None:
    """None when replaying the layers reproduces the model's logits, else why not."""
    try:
        if torch.allclose(replay.forward_from(0, record.layer0_input, record), record.logits, atol=1e-5):
            return None
        return "replayed layers do not reproduce the model's logits"
    except Exception as e:  # a family whose layers need more than what its forward passed them
        return f"replaying its layers failed ({type(e).__name__}: {e})"


class CandidateEvaluator:
    """Fitness of any `ExpertPlan` on one search set, against a `TeacherRun`.

    Pass a `TeacherRun` (shared, the teacher runs once) or a `SearchSet` (the teacher runs here,
    with `cache` / `top_k`); candidates are evaluated under `mask_experts`. With `keep_tokens` each
    result keeps its chunk sums and per-token values (racing: `totals.FitnessResult.then`).
    """

    def __init__(
        self,
        model: nn.Module,
        search: SearchSet | TeacherRun,
        *,
        fitness: str = "esap",
        cache: CacheKind = "sparse",
        top_k: int = 64,
        reuse: bool = True,
        full_forward: bool = False,
        cache_bytes: int = 512 * 2**20,
        head_rows: int | None | str = "auto",
        candidate_batch: int = 1,
        keep_tokens: bool = False,
        nucleus_p: float = 0.95,
    ) -> None:
        if candidate_batch < 1:
            raise ValueError(f"candidate_batch must be >= 1, got {candidate_batch}")
        self.model = model
        self.device = input_device(model)
        run = (
            search
            if isinstance(search, TeacherRun)
            else run_teacher(
                model, search, cache=cache, top_k=top_k, keep_calls=not full_forward, nucleus_p=nucleus_p
            )
        )
        if run.replay is not None and run.replay.model is not model:
            # layer replay runs the recorded model's layers: another model would be masked in vain
            raise MoepruneError(
                "the teacher run was recorded on another model object than the one evaluated: build it "
                "with run_teacher(model, ...) on the model the candidates are evaluated on"
            )
        self.teacher_run = run
        self.search = run.search
        self.candidate_batch = candidate_batch
        self.keep_tokens = keep_tokens  # results keep their per-token values (`FitnessResult.then`)
        self._stacked: list[StackedCalls] | None = None
        if head_rows == "auto":
            vocab = model.config.get_text_config().vocab_size
            head_rows = head_rows_for(self.device, vocab)
        self.head_rows = head_rows  # scored rows per log-softmax; None = all of a batch's at once
        self.head_piece: int | None = None  # rows per float32 step within a chunk (`_score_rows`)
        self.fitness: Fitness = FITNESS.get(fitness)
        self.replay = run.replay
        self.replay_fallback = run.replay_fallback
        # no usable replay, or a teacher run without the layers' call arguments: full forwards
        full_forward = full_forward or run.replay_fallback is not None or not run.records[0].calls
        self.reuse = reuse and not full_forward
        self.full_forward = full_forward
        self.moe_indices = [layer.index for layer in moe_layers(model)]
        self.hidden = HiddenCache(cache_bytes)
        self.stats = ReuseStats()
        self.positions, self.labels, self.records = run.positions, run.labels, run.records
        # per batch, the positions the scored ones depend on (m,), or None: every position is run
        self.needed = [
            n if n.numel() <= (1 - SKIP_SHARE) * b.input_ids.numel() else None
            for b, n in (
                (b, b.needed_positions(p)) for b, p in zip(self.search.batches, self.positions, strict=True)
            )
        ]
        self.partial_states = any(n is not None for n in self.needed)  # cached states of evaluate
        self.teacher = run.cache
        self.teacher_seconds = run.seconds

    # --- keys -------------------------------------------------------------------------------
    def _removed(self, plan: ExpertPlan) -> dict[int, tuple[int, ...]]:
        return {m: tuple(sorted(plan.removed.get(m, ()))) for m in self.moe_indices}

    def _key(self, layer: int, removed: dict[int, tuple[int, ...]], partial: bool = False) -> PrefixKey:
        return layer, tuple(removed[m] for m in self.moe_indices if m < layer), partial

    # --- evaluation -------------------------------------------------------------------------
    def _restart(self, removed: dict[int, tuple[int, ...]], touched: list[PrefixKey], partial: bool = False):
        """(start layer, cached `PrefixState` or None): the deepest MoE layer whose input under this
        mask prefix is cached (0, None without one); `partial`: states right at the needed positions."""
        if self.reuse:
            for m in reversed(self.moe_indices):
                hit = self.hidden.get(self._key(m, removed, partial))
                if hit is not None:
                    touched.append(self._key(m, removed, partial))
                    self.stats.hits += m > self.moe_indices[0]
                    return m, hit
        return 0, None

    def _run_layers(
        self, plan: ExpertPlan, touched: list[PrefixKey], scored_only: bool = False
    ) -> list[torch.Tensor]:
        """Last decoder layer's output [(B, L, H)] of the masked model (call under `mask_experts`),
        restarting from the deepest cached MoE-layer input whose mask prefix equals `plan`'s.
        `scored_only`: the last layer's MoE block runs on the scored positions only, the others on
        the needed positions (`self.needed`), and only the scored rows of the output are right
        (`LayerReplay.run_layer(rows=...)`)."""
        n_layers = self.replay.num_layers
        removed = self._removed(plan)
        partial = scored_only and self.partial_states
        start, hit = self._restart(removed, touched, partial)
        states = list(hit.inputs) if hit is not None else [r.layer0_input for r in self.records]
        moe = set(self.moe_indices)
        for i in range(start, n_layers):
            stored = hit.attention if hit is not None and i == start else None
            captured: list | None = [] if self.reuse and i in moe and stored is None else None
            new_states = []
            for b, (h, r) in enumerate(zip(states, self.records, strict=True)):
                attention = stored[b] if stored is not None else None
                rows = None
                if scored_only:
                    rows = self.positions[b] if i == n_layers - 1 else self.needed[b]
                new_states.append(
                    self.replay.run_layer(
                        i, h, r, attention_output=attention, capture=captured, rows=rows, fast_experts=True
                    )
                )
            if stored is not None:
                self.stats.attention_reused += 1
            if captured is not None:
                complete = len(captured) == len(states)
                key = self._key(i, removed, partial)
                self.hidden.put(key, PrefixState(states, captured if complete else None))
                touched.append(key)
            states = new_states
        self.stats.layers_run += n_layers - start
        self.stats.layers_total += n_layers
        return states

    def _run_stacked(
        self, plans: list[ExpertPlan], touched: list[list[PrefixKey]]
    ) -> list[list[torch.Tensor]]:
        """Like `_run_layers` for C plans at once: per plan, the last layer's output [(B, L, H)].

        Candidates are stacked along dim 0 in the order they join (by restart layer); from its
        restart layer on, each runs in one forward with the others, its rows masked by its own plan."""
        n_layers = self.replay.num_layers
        if self._stacked is None:
            self._stacked = [
                self.replay.stacked_calls(batch, record, self.candidate_batch)
                for batch, record in zip(self.search.batches, self.records, strict=True)
            ]
        removed = [self._removed(p) for p in plans]
        restarts = [self._restart(r, t) for r, t in zip(removed, touched, strict=True)]
        joins = sorted(range(len(plans)), key=lambda c: restarts[c][0])
        moe = set(self.moe_indices)
        rows = [r.layer0_input.shape[0] for r in self.records]  # B per search batch
        active: list[int] = []
        states: list[torch.Tensor | None] = [None] * len(self.records)  # (len(active) * B, L, H)
        for i in range(restarts[joins[0]][0], n_layers):
            joining = [c for c in joins if restarts[c][0] == i]
            for b, record in enumerate(self.records):
                parts = [] if states[b] is None else [states[b]]
                for c in joining:
                    hit = restarts[c][1]
                    parts.append(hit.inputs[b] if hit is not None else record.layer0_input)
                states[b] = torch.cat(parts) if len(parts) > 1 else parts[0]
            active += joining
            if self.reuse and i in moe:
                for pos, c in enumerate(active):
                    key = self._key(i, removed[c])
                    if key not in self.hidden:
                        cut = [states[b][pos * n : (pos + 1) * n].clone() for b, n in enumerate(rows)]
                        self.hidden.put(key, PrefixState(cut))
                    touched[c].append(key)
            layer_plans = [ExpertPlan.from_removed({i: removed[c][i]} if i in moe else {}) for c in active]
            with mask_stacked(self.model, layer_plans):
                for b, calls in enumerate(self._stacked):
                    states[b] = self.replay.run_layer(i, states[b], calls.record(len(active)))
        for start, _ in restarts:
            self.stats.layers_run += n_layers - start
            self.stats.layers_total += n_layers
        at = {c: pos for pos, c in enumerate(active)}
        return [
            [states[b][at[c] * n : (at[c] + 1) * n] for b, n in enumerate(rows)] for c in range(len(plans))
        ]

    def _settle(self, touched: list[PrefixKey], score: float | None) -> None:
        self.hidden.settle(touched, score)

    def _full_forward_logits(self) -> list[torch.Tensor]:
        n_layers = self.replay.num_layers if self.replay is not None else 1
        self.stats.layers_run += n_layers
        self.stats.layers_total += n_layers
        return [
            self.model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
            for b in self.search.batches
        ]

    @torch.inference_mode()
    def candidate_logits(self, plan: ExpertPlan | dict) -> list[torch.Tensor]:
        """Logits of the masked model on every batch: [(B, L, V)]."""
        if not isinstance(plan, ExpertPlan):
            plan = ExpertPlan.from_removed(plan)
        with mask_experts(self.model, plan):
            if self.full_forward:
                return self._full_forward_logits()
            touched: list[PrefixKey] = []
            try:
                return [self.replay.head(h) for h in self._run_layers(plan, touched)]
            finally:
                self._settle(touched, None)

    @torch.inference_mode()
    def evaluate(self, plan: ExpertPlan | dict) -> FitnessResult:
        """Fitness of `plan` = mean over the search set's scored tokens (see `metrics`).

        With layer replay, the head (norm -> lm_head -> log-softmax) runs on the scored positions
        only, `head_rows` at a time, each chunk scored while its logits are still in cache; the
        (B, L, V) logits are never built."""
        t0 = time.perf_counter()
        if not isinstance(plan, ExpertPlan):
            plan = ExpertPlan.from_removed(plan)
        totals, touched = Totals(self.keep_tokens), []
        with mask_experts(self.model, plan):
            if self.full_forward:
                for logits, b in zip(self._full_forward_logits(), range(len(self.records)), strict=True):
                    rows = logits.reshape(-1, logits.shape[-1])[self.positions[b]]  # (n_b, V)
                    self._score_rows(b, rows, totals, head=False)
            else:
                try:
                    self._score_hidden(self._run_layers(plan, touched, scored_only=True), totals)
                except BaseException:
                    self._settle(touched, None)
                    raise
        result = totals.result(self.fitness)
        self._settle(touched, result.score)
        self.stats.evaluations += 1
        self.stats.eval_seconds += time.perf_counter() - t0
        return result

    @torch.inference_mode()
    def evaluate_many(self, plans: list[ExpertPlan | dict]) -> list[FitnessResult]:
        """`evaluate` of every plan, in stacks of up to `candidate_batch` (see the module docstring)."""
        plans = [p if isinstance(p, ExpertPlan) else ExpertPlan.from_removed(p) for p in plans]
        if self.candidate_batch == 1 or self.full_forward or len(plans) < 2:
            return [self.evaluate(p) for p in plans]
        results: list[FitnessResult] = []
        for k in range(0, len(plans), self.candidate_batch):
            group = plans[k : k + self.candidate_batch]
            if len(group) == 1:
                results.append(self.evaluate(group[0]))
                continue
            t0 = time.perf_counter()
            touched: list[list[PrefixKey]] = [[] for _ in group]
            try:
                outputs = self._run_stacked(group, touched)
            except BaseException:
                for t in touched:
                    self._settle(t, None)
                raise
            for hidden, t in zip(outputs, touched, strict=True):
                totals = Totals(self.keep_tokens)
                self._score_hidden(hidden, totals)
                results.append(totals.result(self.fitness))
                self._settle(t, results[-1].score)
            self.stats.evaluations += len(group)
            self.stats.eval_seconds += time.perf_counter() - t0
        return results

    def _score_hidden(self, hidden: list[torch.Tensor], totals: Totals) -> None:
        """Score the last decoder layer's outputs [(B, L, H)] (the head runs on scored rows only)."""
        for b, h in enumerate(hidden):
            self._score_rows(b, h.reshape(-1, h.shape[-1])[self.positions[b]], totals, head=True)  # (n_b, H)

    @torch.inference_mode()
    def score_logits(self, all_logits: list[torch.Tensor]) -> FitnessResult:
        """Fitness of any model's logits [(B, L, V)] on the search batches against the teacher."""
        totals = Totals()
        for b, logits in enumerate(all_logits):
            self._score_rows(b, logits.reshape(-1, logits.shape[-1])[self.positions[b]], totals, head=False)
        return totals.result(self.fitness)

    def _score_rows(self, b: int, rows: torch.Tensor, totals: Totals, *, head: bool) -> None:
        """Add the fitness of batch b's scored rows to `totals`; rows are hidden states (n_b, H) when
        `head`, logits (n_b, V) otherwise. The head's matmuls run `head_rows` rows at a time; the
        float32 work after them (log-softmax, the teacher's softmax, the fitness: ~6 (c, V) float32
        temporaries) `head_piece` rows at a time when set (per-row values: the same results, less
        memory; each chunk's values are summed as one)."""
        teacher, labels = self.teacher.slices[b], self.labels[b]
        step = self.head_rows or rows.shape[0]
        for i in range(0, rows.shape[0], step):
            j = min(i + step, rows.shape[0])
            logits = self.replay.head(rows[i:j]) if head else rows[i:j]  # (c, V)
            piece = self.head_piece or j - i
            terms = []
            for k in range(i, j, piece):
                m = min(k + piece, j)
                logq = torch.log_softmax(logits[k - i : m - i].float(), dim=-1)
                terms.append(self.fitness.fn(logq, self._teacher_rows(teacher, k, m), labels[k:m]))
            totals.add(
                *(None if parts[0] is None else torch.cat(parts) for parts in zip(*terms, strict=True))
            )

    def _teacher_rows(self, teacher: TeacherSlice, start: int, stop: int) -> TeacherSlice:
        """The teacher on scored tokens start..stop-1; a hidden cache recomputes p = softmax(head(h))
        unless it keeps p (`teacher.keep_teacher_probs`)."""
        rows = teacher.rows(start, stop)
        if rows.hidden is None:
            return rows
        if rows.kept_probs is not None:
            return TeacherSlice(probs=rows.kept_probs)
        return TeacherSlice(probs=teacher_probs(self.replay, rows.hidden))

    @torch.inference_mode()
    def plain_forward_seconds(self, repeats: int = 1) -> float:
        """Wall time of one stock forward over the whole search set (the unit of evaluation cost)."""
        t0 = time.perf_counter()
        for _ in range(repeats):
            for b in self.search.batches:
                out = self.model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
        out.logits.sum().item()  # waits for an asynchronous device (GPU)
        return (time.perf_counter() - t0) / repeats
