"""`ExpertStats`: what one calibration pass recorded per MoE layer, saved as safetensors + JSON.

Per layer with E routed experts, over the N calibration tokens (padding excluded), with
``S_i`` = tokens whose top-k holds expert i, ``g_i(x)`` the routing weight as the model applies it,
``a_i(x)`` expert i's output before the gate weight, ``c_i(x)`` its contribution to the layer output
(``g_i(x) a_i(x)``; ``a_i(g_i(x) x)`` for families that scale the expert input, Llama 4) and
``p_{t,i}`` the router softmax over all E experts::

    count[i]      = |S_i|                           (E,)
    gate_sum[i]   = sum_{x in S_i} g_i(x)           (E,)
    norm_sum[i]   = sum_{x in S_i} ||a_i(x)||_2     (E,)
    gnorm_sum[i]  = sum_{x in S_i} g_i(x) ||a_i(x)||_2   (E,)
    prob_sum[i]   = sum_t p_{t,i}                   (E,)   (MoP's AVS)
    plogp_sum[i]  = sum_t p_{t,i} log2 p_{t,i}      (E,)   (MoP's AVS)
    gram[i, j]    = sum_x c_i(x) . c_j(x)           (E, E) (c_i(x) = 0 when x not in S_i; NAEE)

and, when a dense subsample of n tokens was asked for (MoP), on those tokens only::

    dense_hidden  (n, H) float32   the block input x (for K-means domains)
    dense_err     (n, E)           ||z(x) - a_i(x)||^2, z(x) = sum_{i in topk(x)} c_i(x)
    dense_domain  (n,) int64       index into `domain_names` of the token's sample

Everything but `dense_hidden` is float64.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import MoepruneError

STATS_FILE = "stats.safetensors"
META_FILE = "stats.json"
FORMAT_VERSION = 1
VECTORS = ("count", "gate_sum", "norm_sum", "gnorm_sum", "prob_sum", "plogp_sum")
TENSORS = (*VECTORS, "gram", "dense_hidden", "dense_err", "dense_domain")


@dataclass
class LayerStats:
    """Accumulated statistics of one MoE layer (see the module docstring for the formulas)."""

    index: int  # decoder layer index
    num_experts: int
    top_k: int
    num_groups: int = 1
    topk_groups: int = 1
    tokens: int = 0  # calibration tokens seen (padding excluded)
    count: torch.Tensor = field(default=None)  # type: ignore[assignment]
    gate_sum: torch.Tensor = field(default=None)  # type: ignore[assignment]
    norm_sum: torch.Tensor = field(default=None)  # type: ignore[assignment]
    gnorm_sum: torch.Tensor = field(default=None)  # type: ignore[assignment]
    prob_sum: torch.Tensor = field(default=None)  # type: ignore[assignment]
    plogp_sum: torch.Tensor = field(default=None)  # type: ignore[assignment]
    gram: torch.Tensor = field(default=None)  # type: ignore[assignment]
    dense_hidden: torch.Tensor = field(default=None)  # type: ignore[assignment]
    dense_err: torch.Tensor = field(default=None)  # type: ignore[assignment]
    dense_domain: torch.Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        e = self.num_experts
        for name in VECTORS:
            if getattr(self, name) is None:
                setattr(self, name, torch.zeros(e, dtype=torch.float64))
        if self.gram is None:
            self.gram = torch.zeros(e, e, dtype=torch.float64)
        if self.dense_hidden is None:
            self.dense_hidden = torch.zeros(0, 0)
            self.dense_err = torch.zeros(0, e, dtype=torch.float64)
            self.dense_domain = torch.zeros(0, dtype=torch.long)

    @property
    def dense_tokens(self) -> int:
        return int(self.dense_err.shape[0])

    def scalars(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in TENSORS}


@dataclass
class ExpertStats:
    """Statistics of every MoE layer plus the metadata that identifies how they were made."""

    layers: dict[int, LayerStats]
    meta: dict = field(default_factory=dict)  # model, data_fingerprint, num_tokens, domain_names, ...

    @property
    def domain_names(self) -> list[str]:
        return list(self.meta.get("domain_names", []))

    @property
    def has_dense(self) -> bool:
        return all(ls.dense_tokens > 0 for ls in self.layers.values())

    def check_fits(self, num_experts: dict[int, int]) -> None:
        """The statistics must describe a model with `num_experts` routed experts per MoE layer index."""
        have = {i: ls.num_experts for i, ls in self.layers.items()}
        if have != dict(num_experts):
            raise MoepruneError(
                f"the expert statistics (of '{self.meta.get('model', '?')}') do not fit this model: "
                f"experts per MoE layer {have} vs {dict(num_experts)}"
            )

    def save(self, out_dir: str | Path) -> Path:
        """Write ``stats.safetensors`` and ``stats.json`` into `out_dir` (created)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"{i}.{name}": getattr(ls, name).contiguous() for i, ls in self.layers.items() for name in TENSORS
        }
        save_file(tensors, str(out / STATS_FILE))
        meta = {
            "format_version": FORMAT_VERSION,
            **self.meta,
            "layers": [ls.scalars() for ls in self.layers.values()],
        }
        (out / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        return out

    @classmethod
    def load(cls, path: str | Path) -> ExpertStats:
        """Read statistics written by `save` (a directory holding stats.json + stats.safetensors)."""
        path = Path(path)
        if not (path / META_FILE).exists() or not (path / STATS_FILE).exists():
            raise MoepruneError(
                f"{path} holds no expert statistics ({META_FILE} + {STATS_FILE}); make them with `moeprune observe`"
            )
        try:
            meta = json.loads((path / META_FILE).read_text())
            tensors = load_file(str(path / STATS_FILE))
        except Exception as e:  # corrupt JSON or safetensors
            raise MoepruneError(f"expert statistics in {path} are unreadable ({type(e).__name__})") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise MoepruneError(
                f"expert statistics in {path} have format {meta.get('format_version')}, "
                f"this moeprune reads {FORMAT_VERSION}; re-run `moeprune observe`"
            )
        layers = {}
        for scalars in meta.pop("layers"):
            i = scalars["index"]
            layers[i] = LayerStats(**scalars, **{name: tensors[f"{i}.{name}"] for name in TENSORS})
        return cls(layers=layers, meta=meta)
