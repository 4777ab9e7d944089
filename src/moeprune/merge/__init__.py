"""EEP (evolutionary expert pruning and merging). Implemented: the prune phase (`prune_search`)."""

from .prune_search import EEPConfig, EEPResult, LayerChoice, eep_prune_search, layer_choices

__all__ = ["EEPConfig", "EEPResult", "LayerChoice", "eep_prune_search", "layer_choices"]
