"""Tiny random models built from real transformers configs, one per supported MoE family.

Each config keeps the family's real structure (router kind, shared experts, dense layers, groups)
at toy sizes: hidden 32-64, 2-3 layers, 8 routed experts, top-2.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# Per family: the overrides that make a valid tiny config with 8 routed experts, top-2.
OVERRIDES: dict[str, dict] = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        norm_topk_prob=False,
        mlp_only_layers=[1],
    ),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
    "deepseek_v2": dict(
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        n_shared_experts=1,
        first_k_dense_replace=1,
        topk_method="group_limited_greedy",
        n_group=2,
        topk_group=1,
        routed_scaling_factor=1.5,
        kv_lora_rank=16,
        num_key_value_heads=4,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
    ),
    "deepseek_v3": dict(
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        kv_lora_rank=16,
        num_key_value_heads=4,
        q_lora_rank=24,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
    ),
    "glm4_moe": dict(
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.5,
        norm_topk_prob=True,
    ),
    "gpt_oss": dict(
        num_local_experts=8,
        num_experts_per_tok=2,
        intermediate_size=32,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        sliding_window=16,
    ),
    "granitemoe": dict(num_local_experts=8, num_experts_per_tok=2),
    "phimoe": dict(
        num_local_experts=8, num_experts_per_tok=2, router_jitter_noise=0.01, input_jitter_noise=0.0
    ),
    "ernie4_5_moe": dict(
        moe_num_experts=8,
        moe_k=2,
        moe_intermediate_size=24,
        moe_num_shared_experts=1,
        moe_layer_start_index=1,
        moe_layer_end_index=2,
        moe_layer_interval=1,
    ),
    "llama4_text": dict(
        num_local_experts=8,
        num_experts_per_tok=1,
        intermediate_size_mlp=48,
        moe_layers=[0, 2],
        interleave_moe_layer_step=2,
        no_rope_layers=[1, 1, 1],
        attention_chunk_size=32,
    ),
    "hunyuan_v1_moe": dict(num_experts=8, moe_topk=2, num_shared_expert=1, use_qk_norm=True),
}

FAMILIES = sorted(OVERRIDES)
ROUTER_WEIGHT_NAMES = ("gate.weight", "router.weight", "gate.wg.weight")


def tiny_config(model_type: str):
    """A tiny fp32 config of `model_type` with 8 routed experts."""
    kwargs = {**COMMON, **OVERRIDES[model_type]}
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str, seed: int = 0) -> PreTrainedModel:
    """A tiny random fp32 model; router weights are scaled up so routing is decisive, biases random."""
    torch.manual_seed(seed)
    config = tiny_config(model_type)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 3 or "bias" in name or "moe_statics" in name:
                param.normal_(0.0, 0.2)
            elif name.endswith(ROUTER_WEIGHT_NAMES):
                param.normal_(0.0, 0.5)
        for name, buf in model.named_buffers():
            if "e_score_correction_bias" in name:
                buf.normal_(0.0, 0.2)
    return model
