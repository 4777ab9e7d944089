"""`MoEFamily`: everything moeprune needs to know about one transformers MoE family, as data.

Algorithms never guess attribute names: they read them from the family entry. Adding a family is
one entry in `families.py` plus passing the shared test matrix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

RouterOutput = Literal["topk", "topk_probs", "dense_scores"]
ExpertsCall = Literal["routed", "stacked"]
LogitsOp = Literal["divide", "multiply", "softcap"]


@dataclass(frozen=True)
class MoEFamily:
    """Description of one MoE family in transformers 5.x.

    Paths are dotted attribute paths. ``block_attr`` and ``attention_attrs`` are relative to a
    decoder layer, ``layers_path`` and ``final_norm`` to the ``*ForCausalLM`` model, the rest to the
    MoE block. Every per-expert tensor has the expert on the given dimension.
    """

    model_type: str  # config.model_type
    block_classes: tuple[str, ...]  # class names of the sparse MoE block
    block_attr: str  # decoder layer -> MoE block, e.g. "mlp"; "" when the layer itself holds router + experts
    router_attr: str  # block -> router module, e.g. "gate"
    routing: str  # how routing weights are made, for humans (README, reports)
    num_experts_keys: tuple[str, ...]  # config keys that hold the routed-expert count
    top_k_key: str  # config key of the number of active experts per token
    # (path in the block, expert dim): router rows and per-expert router biases; a path outside
    # router_attr is a per-expert tensor the block passes to the router as an argument
    router_tensors: tuple[tuple[str, int], ...] = (("gate.weight", 0),)
    # per-expert tensors of the fused experts module (expert dim 0)
    expert_tensors: tuple[str, ...] = ("experts.gate_up_proj", "experts.down_proj")
    # integer attributes that hold the expert count and must follow surgery
    count_attrs: tuple[str, ...] = ("gate.num_experts", "experts.num_experts")
    # (logits, weights, indices) | (probabilities over all experts, weights, indices) | (dense scores, logits)
    router_output: RouterOutput = "topk"
    experts_call: ExpertsCall = (
        "routed"  # experts(h, top_k_index, top_k_weights) | experts(h stacked by expert)
    )
    group_key: str | None = None  # config key of the number of expert groups (group-limited routing)
    group_active: str | None = None  # config (key, value) "key=value" under which groups are used
    shared_attrs: tuple[str, ...] = ()  # shared experts, left untouched
    layers_path: str = "model.layers"
    extra_config_keys: tuple[str, ...] = field(default=())  # other keys that mirror the count
    fixed_top_k: str | None = None  # why the family's routing ignores top_k_key, if it does
    # integer attributes (block-relative) that the modules copied top_k_key into at construction and
    # read when routing; () when the family reads the config at every forward. None: "<router_attr>.top_k"
    top_k_attrs: tuple[str, ...] | None = None
    # --- the decoder stack around the MoE blocks (layer replay, fitness/replay.py) ---
    # the token-mixing sub-module of a decoder layer (attention, or linear attention / mamba / conv in
    # hybrids: every layer holds exactly one of these names as a module); () = none separate from the layer
    attention_attrs: tuple[str, ...] = ("self_attn",)
    final_norm: str | None = "model.norm"  # the norm between the last decoder layer and lm_head
    # config key of a scalar applied to lm_head's output, and how: logits / s, logits * s, or
    # s * tanh(logits / s) (soft-capping); a None config value means no scaling
    logits_scaling: str | None = None
    logits_op: LogitsOp = "divide"
    # why the decoder stack cannot be replayed layer by layer (more than norm -> lm_head -> scaling
    # after the last layer, or layers that need more than their own call's arguments)
    replay_unsupported: str | None = None

    def __post_init__(self) -> None:
        if self.top_k_attrs is None:  # the common case: the router module holds top_k
            object.__setattr__(self, "top_k_attrs", (f"{self.router_attr}.top_k",))

    def slicing_spec(self) -> dict:
        """The plain-dict subset of this entry that `surgery.slicing` needs (also written into
        non-uniform checkpoints, which must load without moeprune)."""
        d = asdict(self)
        return {
            k: d[k]
            for k in (
                "block_attr",
                "block_classes",
                "router_tensors",
                "expert_tensors",
                "count_attrs",
                "layers_path",
            )
        }
