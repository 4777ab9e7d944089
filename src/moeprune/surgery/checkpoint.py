"""Write pruned checkpoints (atomically) and load them back, uniform or not."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from ..arch import family_of, moe_layers
from ..errors import MoepruneError, UnsupportedModelError
from . import slicing
from .card import model_card
from .hub_config import write_hub_expert_keys

MANIFEST = "moeprune.json"
CARD = "README.md"
REMOTE_CODE_FILE = "modeling_moeprune.py"


def check_output_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """Fail early (before any work) when `out_dir` exists and `overwrite` is off."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise MoepruneError(f"output directory {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise MoepruneError(f"output path {out} exists and is not a directory")
    return out


def atomic_directory(out_dir: str | Path, overwrite: bool, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_dir)`` then move the result to `out_dir`; on any error nothing is left behind."""
    out = check_output_dir(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / out.name)
            shutil.rmtree(trash)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def remote_code_source(model: PreTrainedModel) -> str:
    """``modeling_moeprune.py``: the slicing module plus the family's base class and spec."""
    base = type(model)
    spec = family_of(model.config).slicing_spec()
    return (
        inspect.getsource(slicing)
        + "\n\n# --- written by moeprune for this checkpoint ---\n"
        + f"from {base.__module__} import {base.__name__} as _Base  # noqa: E402\n\n"
        + f"SPEC = {json.dumps(spec)}\n"
        + "MoepruneForCausalLM = resizable_class(_Base, SPEC)\n"
    )


def save_pruned(
    model: PreTrainedModel,
    out_dir: str | Path,
    *,
    manifest: dict,
    tokenizer=None,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
    card_plot: str | None = None,
    card_evaluation: str | None = None,
) -> Path:
    """Save `model` (already pruned in place) with its tokenizer, `moeprune.json` and a model card
    (``README.md``, see `card`), atomically.

    Non-uniform expert counts add ``auto_map`` + ``modeling_moeprune.py`` so that
    ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` loads the checkpoint.
    """
    config = model.config.get_text_config()
    non_uniform = getattr(config, "num_experts_per_layer", None) is not None

    def write(tmp: Path) -> None:
        if non_uniform:
            model.config.auto_map = {"AutoModelForCausalLM": "modeling_moeprune.MoepruneForCausalLM"}
            (tmp / REMOTE_CODE_FILE).write_text(remote_code_source(model))
        elif hasattr(model.config, "auto_map"):
            del model.config.auto_map
        model.save_pretrained(tmp)
        write_hub_expert_keys(tmp, model.config)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        card = model_card(
            manifest,
            parameters=sum(p.numel() for p in model.parameters()),
            experts={layer.index: layer.num_experts for layer in moe_layers(model)},
            non_uniform=non_uniform,
            plot=card_plot,
            evaluation=card_evaluation,
        )
        (tmp / CARD).write_text(card)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)

    return atomic_directory(out_dir, overwrite, write)


def _read_config(path: str | os.PathLike):
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise UnsupportedModelError(
            f"cannot read a model config from '{path}': {str(e).splitlines()[0]}"
        ) from None


def _model_class(config) -> type:
    """The stock causal-LM class, or its resizable subclass for non-uniform moeprune checkpoints."""
    family = family_of(config)  # a clear error for dense or unknown families
    base = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    if getattr(config.get_text_config(), "num_experts_per_layer", None) is None:
        return base
    return slicing.resizable_class(base, family.slicing_spec())


def skeleton(path: str | os.PathLike) -> PreTrainedModel:
    """The model's module structure on the meta device (no weights): validate plans before loading."""
    config = _read_config(path)
    cls = _model_class(config)
    with torch.device("meta"):
        return cls(config)


def load(path: str | os.PathLike, *, dtype: torch.dtype | str | None = None, **kwargs) -> PreTrainedModel:
    """Load any checkpoint moeprune reads or writes (hub id or directory), without remote code.

    Non-uniform moeprune checkpoints (``num_experts_per_layer`` in the config) are rebuilt with the
    same slicing code that ``modeling_moeprune.py`` carries.
    """
    config = _read_config(path)
    kwargs.setdefault("dtype", dtype if dtype is not None else "auto")
    return _model_class(config).from_pretrained(path, config=config, **kwargs).eval()
