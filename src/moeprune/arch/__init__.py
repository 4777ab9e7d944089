"""Architecture adapters: one data entry per MoE family, bound to a loaded model."""

from .adapter import MoELayer, attention_name, family_of, get_path, moe_layers
from .families import FAMILIES
from .family import MoEFamily
from .routing import RouterDecision, decode_router_output, expert_outputs

__all__ = [
    "FAMILIES",
    "MoEFamily",
    "MoELayer",
    "RouterDecision",
    "attention_name",
    "decode_router_output",
    "expert_outputs",
    "family_of",
    "get_path",
    "moe_layers",
]
