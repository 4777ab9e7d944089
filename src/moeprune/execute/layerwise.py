"""Layer-by-layer execution: run a model that does not fit in memory one decoder layer at a time.

`LayerwiseModel(checkpoint)` builds the model's skeleton with its parameters on the meta device
(buffers that the checkpoint does not hold, such as rotary tables, are computed as usual). A unit of
weights -- the input embeddings, decoder layer j, or the head (final norm, LM head and anything else
outside the decoder stack) -- is read from the safetensors checkpoint onto the execution device
(a GPU when the run's device is one, else the CPU) when it is needed and put back on the meta
device after. The on-disk names are mapped to the in-memory ones, and fused expert tensors built from
per-expert ones, by transformers' own conversion mapping (``convert_and_load_state_dict_in_model``,
the loader ``from_pretrained`` uses), with the keys located by `surgery.streaming`'s header reader
and `OnDiskLayout`; tensors are read with ``preadv`` (no mapped file pages stay in the process).

A pass over the decoder stack:

1. `record`: with only the embeddings loaded, the model's own forward runs on every batch with its
   decoder layers replaced by recorders: what each layer is called with (position embeddings,
   attention masks, ...: `fitness.replay.BatchRecord`) and layer 0's input. These depend on the
   tokens only.
2. For j = 0..N-1: load layer j, run it on every batch's hidden state (`LayerReplay.run_layer`),
   free it. Hidden states live on the host (`Activations`, spilled to files past a byte budget).
3. Load the head and compute what the pass is for: logits, a teacher cache, fitness values.

Every statistic and score is computed by the same code, on the same inputs, as in memory: the
observer's hooks (installed per MoE block) see layer j's batches in the same order; masking a
candidate patches only the router of the layer that runs, and an EEP merge writes the merged experts
into that layer's loaded weights only (`changes`). `lockstep.LayerwiseEvaluator` scores a
generation's candidates in lockstep: each generation streams the layers once, candidates that agree
on their masks in layers 0..j-1 share one hidden state at layer j (a prefix tree), and the weight I/O
is paid once per generation, not once per candidate.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import get_path, moe_layers
from ..arch.patching import Patches
from ..errors import MoepruneError
from ..fitness.evaluator import TeacherRun
from ..fitness.replay import BatchRecord, LayerReplay
from ..fitness.searchset import SearchSet
from ..fitness.teacher import CACHE_KINDS, TeacherCache, teacher_slice
from ..surgery.checkpoint import _model_class, _read_config
from ..surgery.streaming import OnDiskLayout, Stored, local_checkpoint, read_header, weight_files
from . import direct
from .activations import Activations
from .budget import memory_budget
from .changes import NO_CHANGE, Candidate, applied, as_candidate, layer_changes
from .native import prepare_process, trim, weights_mmapped
from .weights import read_stored, resolve_dtype

Unit = int | str  # a decoder layer index, "embed" or "head"


class _Lazy:
    """A checkpoint tensor read when transformers' loader materialises it (``tensor[...]``)."""

    def __init__(self, stored: Stored, owner: LayerwiseModel) -> None:
        self.stored, self.owner = stored, owner

    def __getitem__(self, index):
        self.owner.bytes_read += self.stored.nbytes
        return read_stored(self.stored)[index]


class _Stop(Exception):
    """Raised by the last layer's recorder: the rest of the forward needs weights not loaded."""


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """transformers' per-call "Loading weights" bar off while a unit loads, and its tensors read one
    after the other (no thread pool: the peak stays one unit plus its conversion)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    old = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
    os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_DEACTIVATE_ASYNC_LOAD", None)
        else:
            os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = old
        if was:
            hf_logging.enable_progress_bar()


class LayerwiseModel:
    """A causal LM executed one unit of weights at a time, read from its safetensors checkpoint.

    ``device``: where units run (``cpu``, ``cuda``, ``cuda:1``); ``dtype``: ``auto`` (the
    checkpoint's), ``float32``, ``bfloat16`` or ``float16``; ``activation_bytes``: hidden states
    held in host memory before further ones are spilled to files in ``spill_dir`` (``auto``: a
    quarter of the host's available memory; None: never spilled); ``prefetch``: read and convert
    the next decoder layer in a background thread while one runs, one layer more in memory (None:
    on a GPU, where the host's cores are free, and on a CPU with a core left over by torch's threads;
    with none left the loader would compete with the cores that compute. A 48-layer search, one
    torch thread on two cores: 36.8 s instead of 55.0 s of wall time on a busy machine, +60 MB at
    the peak: benchmarks/results/layers_onednn_cache.txt, runs l and m)."""

    runs_layer_by_layer = True  # what the observer and the evaluation functions test for

    def __init__(
        self,
        source: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "auto",
        activation_bytes: int | str | None = "auto",
        spill_dir: str | Path | None = None,
        progress: bool = False,
        prefetch: bool | None = None,
    ) -> None:
        from accelerate import init_empty_weights
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.modeling_utils import local_torch_dtype

        prepare_process()
        root = local_checkpoint(source)
        if root is None:
            raise MoepruneError(
                f"layer-by-layer execution reads a local safetensors checkpoint (a directory or a cached hub "
                f"id), not '{source}'"
            )
        self.source, self.root = source, root
        config = _read_config(root)
        if getattr(config, "quantization_config", None) is not None:
            raise MoepruneError(
                f"{root}: quantized checkpoints (e.g. block-scaled FP8) cannot run layer by layer yet; "
                "use a bf16 copy"
            )
        self.stored: dict[str, Stored] = {}
        for file in weight_files(root):
            self.stored.update(read_header(file))
        self.dtype = resolve_dtype(dtype, config, self.stored)
        self.device = torch.device(device)
        cls = _model_class(config)
        with init_empty_weights(include_buffers=False), local_torch_dtype(self.dtype, cls.__name__):
            model = cls(config)
        model.eval()
        self.model = model
        for name, buf in list(model.named_buffers()):  # tables the model computes (rotary, ...)
            if not buf.is_meta and buf.device != self.device:
                owner, _, leaf = name.rpartition(".")
                get_path(model, owner)._buffers[leaf] = buf.to(self.device) if owner else buf
        self.replay = LayerReplay(model)  # families whose stack cannot be replayed are refused here
        self.moe_indices = [layer.index for layer in moe_layers(model)]
        self.progress = progress
        if prefetch is None:
            prefetch = self.device.type != "cpu" or (os.cpu_count() or 1) > torch.get_num_threads()
        self.prefetch = prefetch
        if activation_bytes == "auto":  # a quarter of what the host has free now
            activation_bytes = memory_budget("cpu") // 4
        self.activation_bytes, self.spill_dir = activation_bytes, spill_dir
        self.bytes_read = 0  # read to load units
        self.learn_bytes = 0  # read again to learn `direct` recipes (two layers per layer signature)
        self._conversions = get_model_conversion_mapping(model)
        self._dtype_plan = model._get_dtype_plan(self.dtype)
        layout = OnDiskLayout(model, moe_layers(model))
        state = set(model.state_dict())
        self._disk: dict[str, list[str]] = {}  # in-memory name -> checkpoint keys that load it
        for key in self.stored:
            name, _ = layout.in_memory_name(key)
            if name not in state and key in state:
                name = key
            if name in state:
                self._disk.setdefault(name, []).append(key)
        self._tied = {
            t: s for t, s in model.all_tied_weights_keys.items() if t not in self._disk and s in self._disk
        }
        layers = self.replay.family.layers_path + "."
        embed = model.get_input_embeddings()
        embed_name = next(n for n, m in model.named_modules() if m is embed) + "."
        self.units: dict[Unit, list[str]] = {"embed": [], "head": []}
        for j in range(self.replay.num_layers):
            self.units[j] = []
        for name in model.state_dict():
            if name.startswith(layers):
                unit: Unit = int(name[len(layers) :].split(".")[0])
            elif name.startswith(embed_name):
                unit = "embed"
            else:
                unit = "head"
            self.units[unit].append(name)
        missing = [n for n in state if n not in self._disk and n not in self._tied]
        if missing:
            raise MoepruneError(
                f"the checkpoint in {root} has no tensor that loads into '{missing[0]}' "
                f"({len(missing)} tensors of the model unaccounted for)"
            )
        self._recipes = direct.Recipes()  # decoder layers read straight into place (`direct`)
        self._signatures: dict[Unit, tuple | None] = {}  # a layer's `direct.signature`
        self._loaded: set[Unit] = set()
        self.plan: Candidate | None = None  # what `batch_logits` applies by default (`masked`)

    @contextmanager
    def masked(self, plan, active_experts: int | None = None) -> Iterator[LayerwiseModel]:
        """Within the block, forwards (`batch_logits`, so perplexity and multiple choice) compute what
        the model pruned by `plan` computes (exact masking, as `surgery.mask_experts`), or with an EEP
        merge plan (``{layer: LayerMerge}``) what the merged model computes (`changes`); with
        `active_experts` every token is routed to that many experts (`merge.active`)."""
        from ..merge.active import reduced_active_experts

        old = self.plan
        self.plan = None if plan is None else as_candidate(plan)
        try:
            with reduced_active_experts(self.model, active_experts):
                yield self
        finally:
            self.plan = old

    # --- model-like surface (the evaluation helpers take a model or this) ----------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def training(self) -> bool:
        return False

    def eval(self) -> LayerwiseModel:
        return self

    def train(self, mode: bool = True) -> LayerwiseModel:
        return self

    # --- units -----------------------------------------------------------------------------------------
    def unit_bytes(self, unit: Unit) -> int:
        """Checkpoint bytes read to load `unit`."""
        return sum(self.stored[k].nbytes for k in self._keys(unit))

    def _keys(self, unit: Unit) -> list[str]:
        names = self.units[unit]
        keys = {k for n in names for k in self._disk.get(n, ())}
        keys |= {k for n in names if n in self._tied for k in self._disk[self._tied[n]]}
        return sorted(keys)

    def _set(self, name: str, value: torch.Tensor | None) -> None:
        """Put `value` (None: a meta placeholder) at `name`, as a parameter or buffer like the old one."""
        owner, _, leaf = name.rpartition(".")
        module = get_path(self.model, owner) if owner else self.model
        old = getattr(module, leaf)
        value = torch.empty_like(old, device="meta") if value is None else value
        if leaf in module._parameters:
            if not isinstance(value, nn.Parameter):
                value = nn.Parameter(value, requires_grad=False)
            module._parameters[leaf] = value
        else:
            module._buffers[leaf] = value

    def _load(self, unit: Unit, *, background: bool = False) -> None:
        """Read `unit`'s tensors into the skeleton: a decoder layer by its `direct` recipe once one is
        trusted, else by transformers' loader (whose result a recipe is learned from). `background`:
        while another unit runs (glibc's mmap threshold is process-wide, so it is left as it is: see
        `native`)."""
        names = self.units[unit]
        if not names:
            return
        own = [n for n in names if n in self._disk]
        if unit not in self._signatures:
            ok = isinstance(unit, int) and len(own) == len(names)
            self._signatures[unit] = direct.signature(own, self._keys(unit), unit) if ok else None
        sig = self._signatures[unit]
        recipe = self._recipes.get(sig)
        with nullcontext() if background else weights_mmapped():
            if recipe is not None and direct.keys_of(recipe, unit) == set(self._keys(unit)):
                for name, tensor in direct.load(recipe, unit, self.stored, self.device):
                    self._set(name, tensor)
                self.bytes_read += self.unit_bytes(unit)
                return
            self._convert(unit, names)
        if self._recipes.wants(sig, unit):
            tensors = {n: get_path(self.model, n) for n in own}
            self._recipes.add(sig, unit, direct.learn(tensors, self._disk, self.stored, unit))
            self.learn_bytes += self.unit_bytes(unit)

    def _convert(self, unit: Unit, names: list[str]) -> None:
        """`unit`'s tensors read and converted by transformers' loader."""
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        state = {k: _Lazy(self.stored[k], self) for k in self._keys(unit)}
        config = LoadStateDictConfig(
            dtype=self.dtype,
            dtype_plan=self._dtype_plan,
            device_map={"": str(self.device)},
            weight_mapping=self._conversions,
        )
        with _quiet_loading():
            info, _ = convert_and_load_state_dict_in_model(self.model, state, config)
        for target in names:
            source = self._tied.get(target)
            if source is not None:
                self._set(target, get_path(self.model, source))
                if not any(source in self.units[u] for u in self._loaded):
                    self._set(source, None)
        lost = [n for n in names if get_path(self.model, n).is_meta]
        if lost:
            self._free(unit)
            why = next(iter(info.conversion_errors.values()), None) or next(iter(info.mismatched_keys), "")
            raise MoepruneError(
                f"loading '{lost[0]}' from {self.root} failed ({len(lost)} tensors not loaded) {why}".rstrip()
            )

    def _free(self, unit: Unit) -> None:
        for name in self.units[unit]:
            self._set(name, None)
        trim()

    @contextmanager
    def loaded(self, *units: Unit) -> Iterator[None]:
        """Within the block, the weights of `units` are real tensors on the execution device."""
        done: list[Unit] = []
        try:
            for unit in units:
                if unit in self._loaded:
                    continue
                self._load(unit)
                self._loaded.add(unit)
                done.append(unit)
            yield
        finally:
            for unit in reversed(done):
                self._free(unit)
                self._loaded.discard(unit)

    # --- passes ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def record(self, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[BatchRecord]:
        """Per batch (input ids, attention mask), what every decoder layer is called with and layer
        0's input, from the model's own forward with only the embeddings loaded."""
        n = self.replay.num_layers
        calls: list = [None] * n
        first: list[torch.Tensor] = []

        def recorder(i: int):
            def forward(*args, **kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                calls[i] = (args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"})
                if i == 0:
                    first.append(hidden)
                if i == n - 1:
                    raise _Stop
                return hidden

            return forward

        records = []
        with self.loaded("embed"), Patches() as patches:
            for i, layer in enumerate(self.replay.layers):
                patches.wrap_forward(layer, lambda inner, i=i: recorder(i))
            for ids, mask in batches:
                calls[:] = [None] * n
                first.clear()
                try:
                    self.model(
                        input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False
                    )
                except _Stop:
                    pass
                if any(c is None for c in calls) or not first:
                    raise MoepruneError(
                        f"{self.replay.family.model_type}: the model's forward did not call every decoder "
                        "layer; it cannot run layer by layer"
                    )
                records.append(BatchRecord(layer0_input=first[0], calls=list(calls)))
        return records

    def _layers(self, desc: str) -> Iterator[int]:
        """Decoder layer indices, each loaded while the loop body runs. With `prefetch`, layer j + 1
        is read and converted in a background thread while layer j runs (two layers in memory)."""
        n = self.replay.num_layers
        pool = ThreadPoolExecutor(1, thread_name_prefix="moeprune-prefetch") if self.prefetch else None
        ahead: Future | None = None
        try:
            for j in tqdm(range(n), desc=desc, unit="layer", disable=not self.progress):
                if ahead is None:
                    self._load(j)
                else:
                    ahead, loading = None, ahead
                    try:
                        loading.result()  # the background load's error, if any, is raised here
                    except BaseException:
                        self._free(j)
                        raise
                self._loaded.add(j)
                try:
                    if pool is not None and j + 1 < n:
                        ahead = pool.submit(self._load, j + 1, background=True)
                    yield j
                finally:
                    self._free(j)
                    self._loaded.discard(j)
        finally:
            if ahead is not None:  # the loop stopped early: the layer read ahead goes too
                try:
                    ahead.result()
                except Exception:  # what stopped the loop is the error to report
                    pass
                self._free(j + 1)
            if pool is not None:
                pool.shutdown()

    def _run(
        self, j: int, store: Activations, keys: list[int], records: list[BatchRecord], before=None
    ) -> list[int]:
        """Layer j on every batch's hidden state (store keys in, new keys out; the old ones dropped)."""
        out = []
        for b, key in enumerate(keys):
            if before is not None:
                before(b)
            h = store.get(key).to(self.device)
            out.append(store.put(self.replay.run_layer(j, h, records[b])))
            store.drop(key)
        return out

    def _store(self) -> Activations:
        return Activations(self.activation_bytes, self.spill_dir)

    @torch.inference_mode()
    def run_pass(
        self,
        *,
        calibration=None,
        batch_size: int = 8,
        dense_tokens: int = 0,
        seed: int = 0,
        model_name: str | None = None,
        search: SearchSet | None = None,
        cache: str = "sparse",
        top_k: int = 64,
        nucleus_p: float = 0.95,
    ):
        """One stream of the checkpoint that observes `calibration` (a `TokenSet`: `ExpertStats`, as
        `observe.observe` computes them) and/or runs the teacher on `search` (`TeacherRun`, as
        `fitness.run_teacher` builds it: `cache`, `top_k`, `nucleus_p`). Returns (stats or None,
        teacher or None)."""
        from ..observe.observer import Observer, dense_subsample, observation_meta

        if cache not in CACHE_KINDS:
            raise ValueError(f"teacher cache must be one of {CACHE_KINDS}, got {cache!r}")
        if not 0.0 < nucleus_p <= 1.0:
            raise ValueError(f"nucleus_p must be in (0, 1], got {nucleus_p}")
        t0 = time.perf_counter()
        store = self._store()
        try:
            obs = cal_records = cal_keys = None
            with self.loaded("embed"):  # read once for both record passes
                if calibration is not None:
                    dense_mask = dense_subsample(calibration, dense_tokens, seed)
                    names = calibration.domain_names
                    sample_domain = torch.tensor(
                        [names.index(d) for d in calibration.domains], dtype=torch.long
                    )
                    domain = sample_domain[:, None].expand_as(calibration.attention_mask)
                    slices = [slice(s, s + batch_size) for s in range(0, len(calibration), batch_size)]
                    cal_records = self.record(
                        [(calibration.input_ids[s], calibration.attention_mask[s]) for s in slices]
                    )
                    cal_keys = [store.put(r.layer0_input) for r in cal_records]
                    obs = Observer(self.model, dense=dense_tokens > 0)

                    def before(b: int) -> None:
                        s = slices[b]
                        obs.set_batch(calibration.attention_mask[s], dense_mask[s], domain[s])

                if search is not None:
                    search_records = self.record([(b.input_ids, b.attention_mask) for b in search.batches])
                    search_keys = [store.put(r.layer0_input) for r in search_records]
            for j in self._layers(
                "observe" if search is None else "teacher" if obs is None else "observe+teacher"
            ):
                if obs is not None:
                    with obs:  # the observer's hooks only while calibration batches run
                        cal_keys = self._run(j, store, cal_keys, cal_records, before)
                if search is not None:
                    search_keys = self._run(j, store, search_keys, search_records)
            stats = teacher = None
            if obs is not None:
                from ..observe import ExpertStats

                meta = observation_meta(self.model, calibration, dense_mask, model_name or str(self.source))
                stats = ExpertStats(layers=obs.result(), meta=meta)
            if search is not None:
                cache_options = {"kind": cache, "top_k": top_k, "nucleus_p": nucleus_p}
                teacher = self._teacher(search, search_records, search_keys, store, cache_options, t0)
            return stats, teacher
        finally:
            store.close()

    def observe(self, data, **options):
        """`observe.observe` layer by layer (options: batch_size, dense_tokens, seed, model_name)."""
        options.pop("progress", None)
        return self.run_pass(calibration=data, **options)[0]

    def run_teacher(
        self, search: SearchSet, *, cache: str = "sparse", top_k: int = 64, nucleus_p: float = 0.95
    ) -> TeacherRun:
        """`fitness.run_teacher` layer by layer: the teacher cache and the records candidates replay."""
        return self.run_pass(search=search, cache=cache, top_k=top_k, nucleus_p=nucleus_p)[1]

    def _teacher(self, search, records, keys, store, options: dict, t0) -> TeacherRun:
        """The teacher cache (`options`: kind, top_k, nucleus_p) from the last layer's outputs. A hidden
        cache does not keep the teacher's probabilities here (`fitness.teacher.keep_teacher_probs`):
        layer by layer memory comes first (T x V float32 would stay for the whole search), so each
        candidate's scoring recomputes them from the kept final states."""
        cache, top_k, nucleus_p = options["kind"], options["top_k"], options["nucleus_p"]
        search = search.to(self.device)
        positions, labels = search.scored_rows()
        slices = []
        with self.loaded("head"):
            for b, key in enumerate(keys):
                h = store.get(key).to(self.device)  # (B, L, H): the last decoder layer's output
                if (
                    cache == "hidden"
                ):  # the final norm's output on the scored rows; p comes back per candidate
                    normed = self.replay.norm(h)
                    rows = normed.reshape(-1, normed.shape[-1])[positions[b]]  # (n_b, H)
                    slices.append(teacher_slice(None, cache, top_k, hidden=rows))
                    continue
                logits = self.replay.head(h)  # (B, L, V)
                rows = logits.reshape(-1, logits.shape[-1])[positions[b]]  # (n_b, V)
                slices.append(teacher_slice(rows, cache, top_k, nucleus_p=nucleus_p))
        for record in records:  # candidates start from layer 0's input: keep it on the host
            record.layer0_input = record.layer0_input.to("cpu")
        return TeacherRun(
            search=search,
            cache=TeacherCache(kind=cache, top_k=top_k, slices=slices, nucleus_p=nucleus_p),
            records=records,
            positions=positions,
            labels=labels,
            replay=self.replay,
            replay_fallback=None,
            seconds=time.perf_counter() - t0,
        )

    @torch.inference_mode()
    def batch_logits(
        self, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], plan: Candidate | None = None
    ) -> Iterator[torch.Tensor]:
        """Logits (B, L, V) of each (input ids, attention mask) batch, in order, from one stream of
        the layers (masked, or merged, by `plan`: `changes`); the head runs batch by batch as the
        caller takes them."""
        plan = plan if plan is not None else self.plan
        changes = {} if plan is None else layer_changes(plan)
        records = self.record(batches)
        store = self._store()
        try:
            keys = [store.put(r.layer0_input) for r in records]
            for j in self._layers("forward"):
                with applied(self.model, j, changes.get(j, NO_CHANGE)):
                    keys = self._run(j, store, keys, records)
            with self.loaded("head"):
                for key in keys:
                    yield self.replay.head(store.get(key).to(self.device))
        finally:
            store.close()
