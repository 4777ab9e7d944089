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

from ..arch import family_of
from ..errors import MoepruneError, UnsupportedModelError
from . import slicing

MANIFEST = "moeprune.json"
CARD = "README.md"
REMOTE_CODE_FILE = "modeling_moeprune.py"
# Largest weight file `save_pruned` writes; bigger checkpoints are sharded with an index (the hub's
# usual shard size; transformers' own default, 50GB, makes shards too large to download in pieces).
DEFAULT_MAX_SHARD_SIZE = "5GB"


def shard_bytes(max_shard_size: int | str) -> int:
    """``"200MB"`` (10**6), ``"2GiB"`` (2**30) or a byte count -> bytes, as transformers reads it."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        size = convert_file_size_to_int(max_shard_size)
    except ValueError:
        size = 0
    if size <= 0:
        raise MoepruneError(
            f"max shard size '{max_shard_size}' is not a positive size such as 5GB, 200MB or 2GiB"
        )
    return size


def _normal_permissions(path: Path) -> None:
    """Give a `tempfile.mkdtemp` directory (mode 0700) the mode a plain ``mkdir`` would get."""
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)


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
        _normal_permissions(tmp)
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
    """``modeling_moeprune.py``: the slicing module plus the family's stock class and spec."""
    base = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(model.config), type(model))
    spec = family_of(model.config).slicing_spec()
    return (
        inspect.getsource(slicing)
        + "\n\n# --- written by moeprune for this checkpoint ---\n"
        + f"from {base.__module__} import {base.__name__} as _Base  # noqa: E402\n\n"
        + f"SPEC = {json.dumps(spec)}\n"
        + "MoepruneForCausalLM = resizable_class(_Base, SPEC)\n"
    )


def is_non_uniform(model: PreTrainedModel) -> bool:
    """Whether `model`'s MoE layers hold different numbers of experts (after surgery)."""
    return getattr(model.config.get_text_config(), "num_experts_per_layer", None) is not None


def save_pruned(
    model: PreTrainedModel,
    out_dir: str | Path,
    *,
    manifest: dict,
    tokenizer=None,
    overwrite: bool = False,
    files: dict[str, str | bytes] | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Save `model` (already pruned in place) with its tokenizer, `moeprune.json` and `files`
    ({name: text or bytes}: model card, run files, plots), atomically. Weights above `max_shard_size`
    are sharded with a ``model.safetensors.index.json``."""
    size = shard_bytes(max_shard_size)

    def weights(tmp: Path) -> None:
        model.save_pretrained(tmp, max_shard_size=size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return write_checkpoint(model, out_dir, weights, manifest=manifest, overwrite=overwrite, files=files)


def write_checkpoint(
    model: PreTrainedModel,
    out_dir: str | Path,
    write_weights: Callable[[Path], None],
    *,
    manifest: dict,
    overwrite: bool = False,
    files: dict[str, str | bytes] | None = None,
) -> Path:
    """The one way a pruned checkpoint is written, atomically: ``write_weights(tmp)`` writes weights,
    config and tokenizer (from the pruned `model`: in memory, or a meta-device skeleton pruned the same
    way when the weights are streamed); then ``modeling_moeprune.py`` for non-uniform counts (so that
    ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` loads it), ``moeprune.json``
    and `files` ({name: text or bytes})."""
    non_uniform = is_non_uniform(model)

    def write(tmp: Path) -> None:
        if non_uniform:
            model.config.auto_map = {"AutoModelForCausalLM": "modeling_moeprune.MoepruneForCausalLM"}
        elif hasattr(model.config, "auto_map"):
            del model.config.auto_map
        write_weights(tmp)
        if non_uniform:
            (tmp / REMOTE_CODE_FILE).write_text(remote_code_source(model))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        for name, content in (files or {}).items():
            (tmp / name).write_bytes(content) if isinstance(content, bytes) else (tmp / name).write_text(
                content
            )

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


def load_tokenizer(path: str | os.PathLike):
    """The checkpoint's tokenizer, or None when it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError):
        return None


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
