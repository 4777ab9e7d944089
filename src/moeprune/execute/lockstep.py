"""Candidates scored layer by layer, in lockstep: the `Scorer`'s evaluator in mode layers.

`LayerwiseEvaluator.evaluate_many(plans)` streams the checkpoint once for all `plans`: decoder layer
j is loaded once and every distinct prefix runs through it before layer j + 1 loads. Plans that
change the MoE layers 0..j-1 alike (the same removed sets, and for EEP merge plans the same merges:
`changes.LayerChange.key`) share one hidden state at layer j (a prefix tree: node = those changes,
children = the distinct changes of layer j), so layer j runs once per distinct prefix of length j,
not once per plan. A merge plan's merged experts are computed from the loaded layer's weights while
it runs (`changes.applied`). The head (final norm -> LM head -> fitness) runs on the scored rows of
each leaf. A search hands a whole generation to one call (`Executor.score`).
"""

from __future__ import annotations

import time

import torch

from ..arch import moe_layers
from ..fitness.evaluator import CandidateEvaluator, TeacherRun, head_rows_for
from ..fitness.totals import FitnessResult, Totals
from .changes import NO_CHANGE, Candidate, LayerChange, applied, as_candidate, layer_changes
from .layerwise import LayerwiseModel

# Scored rows' float32 (rows, V) work on a CPU in pieces of this size (`CandidateEvaluator.head_piece`):
# with 256-row chunks it held ~6 x 33 MB at once (vocabulary 32k), the peak of a search stream.
HEAD_PIECE_BYTES = 8 * 2**20


def layerwise_evaluator(lm: LayerwiseModel, teacher: TeacherRun, spec) -> LayerwiseEvaluator:
    """The evaluator of a `base.ScoreSpec` on a model executed layer by layer (the `Scorer`'s factory
    in mode layers; `teacher`: the spec's slice of the run). Candidate stacking, the prefix cache's
    size and reuse settings do not apply: a call's candidates share prefixes within one stream. A
    racing slice's results keep their per-token values; each slice is one more stream, which is why
    a run in mode layers does not race. Merge plans (``spec.merged``) are scored in lockstep too;
    fewer active experts are set on the skeleton by the `Scorer`."""
    return LayerwiseEvaluator(lm, teacher, fitness=spec.fitness, keep_tokens=spec.slice is not None)


class LayerwiseEvaluator(CandidateEvaluator):
    """`CandidateEvaluator` for a `LayerwiseModel`: `evaluate_many` scores all its plans in one stream
    of the layers (lockstep), sharing hidden states between plans with the same masks in layers
    0..j-1. Results are those of the in-memory evaluator (same layer inputs, same operations). Its
    candidates are plans or EEP merge plans (``{layer: LayerMerge}``: `changes`)."""

    scores_merges = True  # the `Scorer` hands it merge plans as they are

    def __init__(
        self, lm: LayerwiseModel, teacher: TeacherRun, *, fitness: str = "esap", keep_tokens: bool = False
    ) -> None:
        vocab = lm.config.get_text_config().vocab_size
        super().__init__(
            lm.model, teacher, fitness=fitness, reuse=False, head_rows=head_rows_for(lm.device, vocab),
            keep_tokens=keep_tokens,
        )  # fmt: skip
        self.lm = lm
        self.device = lm.device
        if lm.device.type == "cpu":  # the head's float32 temporaries: the peak of a stream on a CPU
            self.head_piece = max(1, HEAD_PIECE_BYTES // (4 * vocab))
        self.full_forward = False  # the teacher run carries every layer's call arguments
        self.shared_runs = 0  # (layer, batch set) runs saved by sharing prefixes

    @torch.inference_mode()
    def evaluate(self, plan: Candidate | dict) -> FitnessResult:
        return self.evaluate_many([plan])[0]

    @torch.inference_mode()
    def candidate_logits(self, plan: Candidate | dict) -> list[torch.Tensor]:
        batches = [(b.input_ids, b.attention_mask) for b in self.search.batches]
        return list(self.lm.batch_logits(batches, as_candidate(plan)))

    @torch.inference_mode()
    def evaluate_many(self, plans: list[Candidate | dict]) -> list[FitnessResult]:
        t0 = time.perf_counter()
        if not plans:
            return []
        moe = set(self.moe_indices)
        changes = [{j: c for j, c in layer_changes(p).items() if j in moe} for p in plans]
        layer = {m.index: m for m in moe_layers(self.model)}  # masks check only the layer that runs
        lm, store = self.lm, self.lm._store()
        # as in memory: the last MoE block runs on the scored rows only, the others on the needed ones
        last = self.replay.num_layers - 1
        try:
            # prefix tree: (changes of the MoE layers run so far) -> (member plans, hidden-state keys)
            groups: dict[tuple, tuple[list[int], list[int]]] = {
                (): (list(range(len(plans))), [store.put(r.layer0_input) for r in self.records])
            }
            for j in lm._layers(f"{len(plans)} candidates"):
                grown: dict[tuple, tuple[list[int], list[int]]] = {}
                for prefix, (members, keys) in groups.items():
                    split: dict[tuple, tuple[LayerChange, list[int]]] = {}
                    for c in members:
                        change = changes[c].get(j, NO_CHANGE)
                        split.setdefault(change.key, (change, []))[1].append(c)
                    for key_j, (change, subset) in split.items():
                        with applied(self.model, j, change, layer.get(j)):
                            out = []
                            for b, key in enumerate(keys):
                                h = store.get(key).to(self.device)
                                rows = self.positions[b] if j == last else self.needed[b]
                                out.append(
                                    store.put(
                                        self.replay.run_layer(
                                            j, h, self.records[b], rows=rows, fast_experts=True
                                        )
                                    )
                                )
                        grown[prefix + ((j, key_j),) if j in moe else prefix] = (subset, out)
                        self.stats.layers_run += 1
                        self.shared_runs += len(subset) - 1
                    for key in keys:
                        store.drop(key)
                groups = grown
            results: list[FitnessResult | None] = [None] * len(plans)
            with lm.loaded("head"):
                for members, keys in groups.values():
                    totals = Totals(self.keep_tokens)
                    self._score_hidden([store.get(k).to(self.device) for k in keys], totals)
                    result = totals.result(self.fitness)
                    for c in members:
                        results[c] = result
        finally:
            store.close()
        n = self.replay.num_layers
        self.stats.layers_total += n * len(plans)
        self.stats.evaluations += len(plans)
        self.stats.eval_seconds += time.perf_counter() - t0
        return results  # type: ignore[return-value]
