"""Candidates scored layer by layer, in lockstep: the `Scorer`'s evaluator in mode layers.

`LayerwiseEvaluator.evaluate_many(plans)` streams the checkpoint once for all `plans`: decoder layer
j is loaded once and every distinct mask prefix runs through it before layer j + 1 loads. Plans with
the same removed sets in the MoE layers 0..j-1 share one hidden state at layer j (a prefix tree:
node = those removed sets, children = the distinct sets of layer j), so layer j runs once per
distinct prefix of length j, not once per plan. The head (final norm -> LM head -> fitness) runs on
the scored rows of each leaf. A search hands a whole generation to one call (`Executor.score`).
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from ..errors import MoepruneError
from ..fitness.evaluator import CandidateEvaluator, TeacherRun, head_rows_for
from ..fitness.totals import FitnessResult, Totals
from ..plan import ExpertPlan
from ..surgery import mask_experts
from .layerwise import LayerwiseModel


def layerwise_evaluator(lm: LayerwiseModel, teacher: TeacherRun, spec) -> LayerwiseEvaluator:
    """The evaluator of a `base.ScoreSpec` on a model executed layer by layer (the `Scorer`'s factory
    in mode layers; `teacher`: the spec's slice of the run). Candidate stacking, the prefix cache's
    size and reuse settings do not apply: a call's candidates share prefixes within one stream. A
    racing slice's results keep their per-token values; each slice is one more stream, which is why
    a run in mode layers does not race."""
    if spec.merged or spec.active_experts is not None:
        raise MoepruneError("mode layers: EEP merging and fewer active experts need the model in memory")
    return LayerwiseEvaluator(lm, teacher, fitness=spec.fitness, keep_tokens=spec.slice is not None)


class LayerwiseEvaluator(CandidateEvaluator):
    """`CandidateEvaluator` for a `LayerwiseModel`: `evaluate_many` scores all its plans in one stream
    of the layers (lockstep), sharing hidden states between plans with the same masks in layers
    0..j-1. Results are those of the in-memory evaluator (same layer inputs, same operations)."""

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
        self.full_forward = False  # the teacher run carries every layer's call arguments
        self.shared_runs = 0  # (layer, batch set) runs saved by sharing prefixes

    @torch.inference_mode()
    def evaluate(self, plan: ExpertPlan | dict) -> FitnessResult:
        return self.evaluate_many([plan])[0]

    @torch.inference_mode()
    def candidate_logits(self, plan: ExpertPlan | dict) -> list[torch.Tensor]:
        plan = plan if isinstance(plan, ExpertPlan) else ExpertPlan.from_removed(plan)
        batches = [(b.input_ids, b.attention_mask) for b in self.search.batches]
        return list(self.lm.batch_logits(batches, plan))

    @torch.inference_mode()
    def evaluate_many(self, plans: list[ExpertPlan | dict]) -> list[FitnessResult]:
        t0 = time.perf_counter()
        plans = [p if isinstance(p, ExpertPlan) else ExpertPlan.from_removed(p) for p in plans]
        if not plans:
            return []
        removed = [self._removed(p) for p in plans]
        moe = set(self.moe_indices)
        lm, store = self.lm, self.lm._store()
        try:
            # prefix tree: (masks of the MoE layers run so far) -> (member plans, hidden-state keys)
            groups: dict[tuple, tuple[list[int], list[int]]] = {
                (): (list(range(len(plans))), [store.put(r.layer0_input) for r in self.records])
            }
            for j in lm._layers(f"{len(plans)} candidates"):
                grown: dict[tuple, tuple[list[int], list[int]]] = {}
                for prefix, (members, keys) in groups.items():
                    split: dict[tuple, list[int]] = {}
                    for c in members:
                        split.setdefault(removed[c][j] if j in moe else (), []).append(c)
                    for mask, subset in split.items():
                        masked = ExpertPlan.from_removed({j: list(mask)}) if mask else None
                        with mask_experts(self.model, masked) if masked is not None else nullcontext():
                            out = []
                            for b, key in enumerate(keys):
                                h = store.get(key).to(self.device)
                                out.append(store.put(self.replay.run_layer(j, h, self.records[b])))
                        grown[prefix + ((j, mask),) if j in moe else prefix] = (subset, out)
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
