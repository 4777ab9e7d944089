"""``moeprune.json``: what a pruned checkpoint holds (kept/removed original expert ids per decoder
layer index), where it came from and the recipe that made it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from .. import __version__


def manifest(
    source: str | Path, kept: Mapping[int, list[int]], num_experts: Mapping[int, int], **extra
) -> dict:
    """The record: version, source, kept and removed ids per layer, then `extra` (recipe, plan, ...)."""
    return {
        "moeprune_version": __version__,
        "source_model": str(source),
        "kept": {str(k): list(v) for k, v in sorted(kept.items())},
        "removed": {str(k): sorted(set(range(num_experts[k])) - set(v)) for k, v in sorted(kept.items())},
        **extra,
    }
