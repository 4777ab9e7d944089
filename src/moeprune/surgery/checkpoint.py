"""Write pruned checkpoints (atomically) and load them back, uniform or not."""

from __future__ import annotations

import glob
import inspect
import json
import os
import re
import secrets
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from ..arch import family_of
from ..errors import MoepruneError, MoepruneWarning, UnsupportedModelError
from ..interrupts import deferred_signals, raise_on_signals
from . import slicing
from .hub_config import write_hub_expert_keys

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


def check_output_dir(out_dir: str | Path, overwrite: bool, *, inputs: tuple = (), model=None) -> Path:
    """Fail early (before any work) when `out_dir` exists and `overwrite` is off, is not a folder, lies
    under a file or an unwritable folder, is one of `inputs` (the model, plan, statistics, data) or
    holds one (replacing it would destroy it), or lies inside the `model` folder."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise MoepruneError(f"output directory {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise MoepruneError(f"output path {out} exists and is not a directory")
    target = out.expanduser().absolute()
    where = target.parent.resolve() / target.name
    for item in (model, *inputs):
        if item is None or not Path(item).expanduser().exists():
            continue
        source = Path(item).expanduser().resolve()
        if where == source:
            raise MoepruneError(f"output directory {out} is the input {item}; write elsewhere")
        if where in source.parents:
            raise MoepruneError(
                f"output directory {out} holds the input {item}; replacing it would delete it"
            )
        if item is model and source in where.parents:
            raise MoepruneError(f"output directory {out} is inside the input model {item}; write elsewhere")
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise MoepruneError(f"output directory {out} cannot be made: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MoepruneError(f"output directory {out} cannot be made: {parent} is not writable")
    return out


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


_HELD: dict[Path, int] = {}  # the outputs this process holds locks on -> nesting depth


@contextmanager
def output_lock(out_dir: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on `out_dir` (``.NAME.lock`` beside it, fcntl; re-entrant within this
    process) so that no two runs write one output at once; folders made for it are removed again
    when nothing was written. Under the lock, partial outputs of killed runs are cleaned up."""
    out = Path(out_dir)
    key = out.expanduser().absolute()
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield out
        finally:
            _HELD[key] -= 1
        return
    created = []
    parent = out.parent
    try:
        while not parent.exists():
            created.append(parent)
            parent = parent.parent
        for folder in reversed(created):
            folder.mkdir()
        fd = _acquire(_lock_path(out), out)
    except OSError as e:
        _remove_empty(created)
        where = out.expanduser().absolute().parent
        raise MoepruneError(
            f"cannot write output directory {out}: {where} takes no new files ({e.strerror or e})"
        ) from None
    except BaseException:
        _remove_empty(created)
        raise
    _HELD[key] = 1
    try:
        clean_stale(out)
        yield out
    finally:
        del _HELD[key]
        if fd is not None:
            try:
                _lock_path(out).unlink()
            except OSError:
                pass
            os.close(fd)
        if not out.exists():
            _remove_empty(created)


def _acquire(lock: Path, out: Path) -> int | None:
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): no lock
        return None
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise MoepruneError(
                f"another moeprune run (pid {holder}) is writing {out}; wait for it or choose another --out"
            ) from None
        try:
            current = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:  # not a lock file its previous holder removed between our open and flock
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # innermost first
        try:
            folder.rmdir()
        except OSError:
            return


def clean_stale(out_dir: str | Path) -> list[Path]:
    """Remove the partial outputs (``.NAME.tmp-*``) and replaced outputs (``.NAME.old-*``) that runs
    killed while saving left beside `out_dir` (call it holding `output_lock`); a replaced output whose
    successor never arrived is put back. Warns (`MoepruneWarning`) about what it did."""
    out = Path(out_dir)
    if not out.parent.is_dir():
        return []
    name = glob.escape(out.name)
    removed = []
    for old in sorted(out.parent.glob(f".{name}.old-*")):
        if not out.exists() and old.is_dir():
            os.replace(old, out)
            warnings.warn(f"restored {out} from {old.name}, left by a run killed while replacing it",
                          MoepruneWarning, stacklevel=2)  # fmt: skip
            continue
        shutil.rmtree(old, ignore_errors=True)
        removed.append(old)
    for tmp in sorted(out.parent.glob(f".{name}.tmp-*")):
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    if removed:
        warnings.warn(
            f"removed {', '.join(p.name for p in removed)}: partial output of a run killed while saving",
            MoepruneWarning,
            stacklevel=2,
        )
    return removed


def check_free_space(out_dir: str | Path, size: int) -> None:
    """One line when the file system of `out_dir` has less than `size` bytes free."""
    out = Path(out_dir)
    parent = out.expanduser().absolute().parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < size:
        raise MoepruneError(
            f"not enough disk space for {out}: about {_mib(size)} needed, {_mib(free)} free; "
            "free some space or choose another --out"
        )


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.1f} GiB"


def _pause_for_tests() -> None:
    """Tests kill a run here (after the files are written, before they move into place)."""
    pause = os.environ.get("MOEPRUNE_TEST_PAUSE_IN_SAVE")
    if pause:
        time.sleep(float(pause))


def atomic_directory(
    out_dir: str | Path, overwrite: bool, write: Callable[[Path], None], *, size: int | None = None
) -> Path:
    """Run ``write(tmp_dir)`` then move the result to `out_dir`, holding `output_lock`; on any error,
    Ctrl-C or SIGTERM nothing is left behind (a SIGKILL leaves ``.NAME.tmp-*``, which the next run
    removes). `size` (bytes), when known, is checked against the free space first. The folder gets
    the permissions a new folder gets (the umask's), and an I/O error is one `MoepruneError` line."""
    out = check_output_dir(out_dir, overwrite)
    with output_lock(out), raise_on_signals(redeliver=True):
        if size is not None:
            check_free_space(out, size)
        tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()  # mode 0777 minus the umask (mkdtemp's would be 0700)
            write(tmp)
            _pause_for_tests()
            trash = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
            with deferred_signals():  # the two renames happen both or not at all
                if out.exists():
                    os.replace(out, trash)
                os.replace(tmp, out)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":
                reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
                io = re.search(r"I/O error: (.+?) \(os error", reason)  # safetensors' wording
                reason = io.group(1) if io else reason
                raise MoepruneError(f"writing {out} failed ({reason}); nothing was written") from None
            raise
        shutil.rmtree(trash, ignore_errors=True)
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
        write_hub_expert_keys(tmp, model.config)  # the family's own count keys too (hub readers use them)
        if non_uniform:
            (tmp / REMOTE_CODE_FILE).write_text(remote_code_source(model))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        for name, content in (files or {}).items():
            (tmp / name).write_bytes(content) if isinstance(content, bytes) else (tmp / name).write_text(
                content
            )

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    extra = sum(len(c) for c in (files or {}).values()) + len(json.dumps(manifest))
    return atomic_directory(out_dir, overwrite, write, size=weights + extra)


def _read_config(path: str | os.PathLike):
    """The model's config; moeprune never runs a checkpoint's own code (``trust_remote_code=False``)."""
    from ..preflight import model_source

    model_source(path)  # a path that does not exist fails here, not as a malformed hub id
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        if "trust_remote_code" in str(e):
            raise UnsupportedModelError(
                f"'{path}' is a model type transformers does not know that needs its own code (auto_map); "
                "moeprune never runs remote code (trust_remote_code=False): use a supported family "
                "(moeprune families)"
            ) from None
        raise UnsupportedModelError(
            f"cannot read a model config from '{path}': {str(e).strip().splitlines()[0]}"
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
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
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
    from ..preflight import check_weights, model_source

    config = _read_config(path)
    folder = model_source(path)
    if folder is not None:
        check_weights(folder)  # truncated or missing files: one line instead of a loader traceback
    kwargs.setdefault("dtype", dtype if dtype is not None else "auto")
    try:
        return _model_class(config).from_pretrained(path, config=config, **kwargs).eval()
    except OSError as e:
        raise UnsupportedModelError(
            f"cannot load the weights of '{path}': {str(e).strip().splitlines()[0]}"
        ) from None
    except Exception as e:
        if type(e).__name__ != "SafetensorError":
            raise
        raise UnsupportedModelError(
            f"weight file of '{path}' is corrupt ({str(e).strip().splitlines()[0]}); re-download or re-save it"
        ) from None
