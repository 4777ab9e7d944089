"""``config.json`` with the routed-expert count also under the key the family's original configs use.

transformers 5 renamed some config attributes and serializes the new name only: a Qwen3-MoE config
saved by transformers 5 says ``"num_local_experts"`` where every Qwen3-MoE config on the hub (and
transformers 4, and tools that read ``config.json`` directly) says ``"num_experts"``. A pruned
checkpoint changes exactly this number, so a reader that looks for the hub key would find no count (and
fall back to its default) instead of the pruned one. `write_hub_expert_keys` adds the family's own
keys (``MoEFamily.num_experts_keys``) where the saved file lacks them; transformers 5 reads both names
as the same attribute.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..arch import family_of

CONFIG = "config.json"


def write_hub_expert_keys(out_dir: str | Path, config) -> list[str]:
    """Add the family's expert-count keys missing from ``out_dir/config.json`` (in the text config's
    section for composite configs); returns the keys added."""
    path = Path(out_dir) / CONFIG
    if not path.is_file():
        return []
    text = config.get_text_config()
    data = json.loads(path.read_text())
    node = data
    if text is not config:  # composite config: the section that holds the text model's config
        node = next(
            (v for v in data.values() if isinstance(v, dict) and v.get("model_type") == text.model_type),
            data,
        )
    added = []
    for key in family_of(config).num_experts_keys:
        if key not in node and getattr(text, key, None) is not None:
            node[key] = getattr(text, key)
            added.append(key)
    if added:
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return added
