"""EEP (evolutionary expert pruning and merging), as problems of the `moeprune.evolve` engine: which
experts each layer keeps (`selection_search`), merging matrices that fold the others into them
(`merge_search`), merging itself (`merging`) and active-expert reduction (`active`)."""

from .merge_search import MergeConfig, MergeProblem, MergeResult, search_merges
from .selection_search import (
    EEPConfig,
    EEPResult,
    LayerChoice,
    SelectionProblem,
    layer_choices,
    search_selections,
)

__all__ = [
    "EEPConfig",
    "EEPResult",
    "LayerChoice",
    "MergeConfig",
    "MergeProblem",
    "MergeResult",
    "SelectionProblem",
    "layer_choices",
    "search_merges",
    "search_selections",
]
