"""Run a model's decoder stack layer by layer, from any layer, exactly as its own forward does.

Every family builds the decoder layers' extra arguments differently (rotary tables, partial/no-rope
layers, causal/sliding/chunked masks, embedding multipliers, ...). Instead of re-implementing each,
`LayerReplay.record` runs the stock forward once per batch with forward pre-hooks on the decoder
layers and keeps what each layer was called with. Those arguments depend only on the tokens, never
on which experts are masked, so a candidate can restart at layer j from a hidden state and replay
layers j..N-1 with them; then the family's head: ``final_norm -> lm_head -> logits scaling`` (the
`MoEFamily` fields). This is written once for every family and tested equal to
``model(input_ids).logits`` on all of them; a family whose stack is more than that says so
(``replay_unsupported``) and `LayerReplay` refuses it with that reason.

A layer's attention sub-module sees only the layer's input, never the experts, so a candidate that
restarts at layer j from a cached input can also take layer j's attention output from the run that
cached it (`run_layer(attention_output=...)`): the sub-module is swapped for one returning the stored
value, bitwise what it would compute.

The last decoder layer's output is read only at the scored positions, and an MoE block acts token
by token: `run_layer(rows=...)` runs the layer's MoE block on those tokens only (the other rows of
that layer's output are then only the residual stream and must not be read). On on-policy data,
where a third of the positions are scored, that skips two thirds of the last block's experts.

Stacked candidates run C copies of a batch in one call (`StackedCalls`): the recorded arguments are
widened along the batch dimension. Which arguments have one is read off a recording of the batch
stacked twice (their dim 0 doubles), so no family's argument layout is assumed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..arch import attention_name, family_of, get_path, moe_layers
from ..arch.experts import sorted_forward
from ..arch.patching import Patches
from ..errors import UnsupportedModelError
from .searchset import SearchBatch


class _StoredOutput(nn.Module):
    """Stands in for an attention sub-module: returns what it returned before for the same input."""

    def __init__(self, output) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args, **kwargs):
        return self.output


@dataclass
class BatchRecord:
    """What one batch's decoder layers were called with, and the input of layer 0."""

    layer0_input: torch.Tensor  # (B, L, H)
    calls: list[tuple[tuple, dict]] = field(
        default_factory=list
    )  # per decoder layer: (args after hidden, kwargs)
    logits: torch.Tensor | None = None  # (B, L, V) of the recording forward
    normed: torch.Tensor | None = None  # (B, L, H) the final norm's output, when asked for


def _map_tensors(value, fn):
    """`value` with every tensor inside tuples/lists/dicts replaced by fn(tensor)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple | list):
        return type(value)(_map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def _zip_tensors(one, two, fn):
    """Like `_map_tensors` over `one`, calling fn(tensor_of_one, same_place_tensor_of_two)."""
    if isinstance(one, torch.Tensor):
        return fn(one, two)
    if isinstance(one, tuple | list):
        return type(one)(_zip_tensors(a, b, fn) for a, b in zip(one, two, strict=True))
    if isinstance(one, dict):
        return {k: _zip_tensors(v, two[k], fn) for k, v in one.items()}
    return one


class StackedCalls:
    """A batch's per-layer call arguments for 1..`width` stacked copies of the batch.

    Built from the batch's record (1 copy) and a record of the batch stacked twice: a tensor whose
    dim 0 doubled is per sequence and is repeated (widest copy kept, narrower widths are views of it);
    any other value is shared as recorded. Memory: `width` copies of the per-sequence arguments of
    every search batch (e.g. a padded batch's 4D attention mask; packed windows usually have none)."""

    def __init__(self, one: BatchRecord, two: BatchRecord, width: int) -> None:
        self.width = width
        self.rows = one.layer0_input.shape[0]  # B
        self._per_row: set[int] = set()

        def widen(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            if a.dim() and b.shape[0] == 2 * a.shape[0] and b.shape[1:] == a.shape[1:]:
                wide = a.repeat(width, *([1] * (a.dim() - 1)))  # (width * B, ...)
                self._per_row.add(id(wide))
                return wide
            return a

        self._calls = [_zip_tensors(c1, c2, widen) for c1, c2 in zip(one.calls, two.calls, strict=True)]
        self._records: dict[int, BatchRecord] = {}

    def record(self, copies: int) -> BatchRecord:
        """The calls for `copies` stacked copies (1 <= copies <= width)."""
        if not 1 <= copies <= self.width:
            raise ValueError(f"{copies} stacked copies, at most {self.width}")
        if copies not in self._records:
            n = copies * self.rows
            cut = lambda t: t[:n] if id(t) in self._per_row else t  # noqa: E731
            self._records[copies] = BatchRecord(
                layer0_input=torch.empty(0), calls=[_map_tensors(c, cut) for c in self._calls]
            )
        return self._records[copies]


def _on_rows(inner, rows: torch.Tensor):
    """A token-wise block's forward computed on the tokens `rows` (flat indices into its input's
    leading dims) only: the output holds zeros elsewhere (same shape and structure as `inner`'s)."""

    def forward(hidden_states, *args, **kwargs):
        width = hidden_states.shape[-1]
        flat = hidden_states.reshape(-1, width)  # (B * L, H)
        if rows.numel() == 0:  # nothing scored in this batch (rare): the whole block, as it was
            return inner(hidden_states, *args, **kwargs)
        out = inner(flat[rows].unsqueeze(0), *args, **kwargs)  # (1, n, H) or a tuple led by it
        main = out[0] if isinstance(out, tuple) else out
        full = flat.new_zeros(flat.shape)
        full[rows] = main.reshape(-1, width).to(full.dtype)
        full = full.view(hidden_states.shape)
        return (full, *out[1:]) if isinstance(out, tuple) else full

    return forward


class LayerReplay:
    """Decoder layers, final norm and LM head of one loaded causal LM."""

    def __init__(self, model: nn.Module) -> None:
        family = family_of(model.config)
        if family.replay_unsupported:
            raise UnsupportedModelError(
                f"{family.model_type}: layer replay cannot reproduce this model: {family.replay_unsupported}"
            )
        self.model = model
        self.family = family
        self.layers: nn.ModuleList = get_path(model, family.layers_path)  # type: ignore[assignment]
        self.norm: nn.Module = get_path(model, family.final_norm or "", None)  # type: ignore[assignment]
        if not isinstance(self.norm, nn.Module):
            raise UnsupportedModelError(
                f"{family.model_type}: no final norm module at '{family.final_norm}' ({type(model).__name__})"
            )
        self.lm_head: nn.Module = model.get_output_embeddings()
        text = model.config.get_text_config()
        scale = getattr(text, family.logits_scaling, None) if family.logits_scaling else None
        self.logits_scale: float | None = None if scale is None else float(scale)
        self.attention_names: list[str | None] = [
            attention_name(family, i, layer) for i, layer in enumerate(self.layers)
        ]
        # decoder layer -> its sparse MoE block, where the block is a sub-module of the layer
        self.blocks: dict[int, nn.Module] = {
            m.index: m.block for m in moe_layers(model) if m.block is not self.layers[m.index]
        }

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @torch.inference_mode()
    def record(self, batch: SearchBatch, normed: bool = False) -> BatchRecord:
        """One stock forward of `batch`, recording every decoder layer's call (and, with `normed`,
        the final norm's output: what the LM head reads)."""
        calls: list[tuple[tuple, dict] | None] = [None] * self.num_layers
        first: list[torch.Tensor] = []

        def make_hook(i: int):
            def hook(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                rest = args[1:] if args else ()
                kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                calls[i] = (rest, kw)
                if i == 0:
                    first.append(hidden)

            return hook

        final: list[torch.Tensor] = []
        with Patches() as patches:
            for i, layer in enumerate(self.layers):
                patches.forward_pre_hook(layer, make_hook(i), with_kwargs=True)
            if normed:
                patches.forward_hook(self.norm, lambda m, a, o: final.append(o))
            out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        if any(c is None for c in calls):
            raise RuntimeError("not every decoder layer was called by the model's forward; cannot replay it")
        return BatchRecord(
            layer0_input=first[0], calls=calls, logits=out.logits, normed=final[-1] if final else None
        )  # type: ignore[arg-type]

    def stacked_calls(self, batch: SearchBatch, one: BatchRecord, width: int) -> StackedCalls:
        """`StackedCalls` for `batch` (recorded as `one`) up to `width` copies; costs a forward of 2B rows."""
        two = self.record(batch.stacked(2))
        two.logits = None
        return StackedCalls(one, two, width)

    def run_layer(
        self,
        index: int,
        hidden: torch.Tensor,
        record: BatchRecord,
        *,
        attention_output=None,
        capture: list | None = None,
        rows: torch.Tensor | None = None,
        fast_experts: bool = False,
    ) -> torch.Tensor:
        """Decoder layer `index` on hidden (B, L, H) -> (B, L, H).

        attention_output: what the layer's attention returned for this same `hidden` in an earlier
        run, used instead of recomputing it. capture: a list the attention's output is appended to.
        rows: flat indices (n,) into B * L: the layer's MoE block runs on those tokens only, and
        only those rows of the output are the layer's (module docstring). fast_experts: transformers'
        fused experts run `arch.experts.sorted_forward` where it applies (a CPU; equal up to rounding)."""
        args, kwargs = record.calls[index]
        layer, name = self.layers[index], self.attention_names[index]
        with Patches() as patches:
            if name is not None and attention_output is not None:
                patches.setattr(layer, name, _StoredOutput(attention_output))
            elif name is not None and capture is not None:
                patches.forward_hook(getattr(layer, name), lambda m, a, o: capture.append(o))
            if rows is not None and index in self.blocks:
                patches.wrap_forward(self.blocks[index], lambda inner: _on_rows(inner, rows))
            if fast_experts and index in self.blocks:
                experts = getattr(self.blocks[index], "experts", None)
                fast = sorted_forward(experts)
                if fast is not None:
                    patches.wrap_forward(experts, lambda inner: fast)
            out = layer(hidden, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Last decoder layer's output (B, L, H) -> logits (B, L, V)."""
        return self.logits_from_normed(self.norm(hidden))

    def logits_from_normed(self, normed: torch.Tensor) -> torch.Tensor:
        """The final norm's output (..., H) -> logits (..., V): the LM head and the family's scaling."""
        logits = self.lm_head(normed)
        s, op = self.logits_scale, self.family.logits_op
        if s is None or (op != "softcap" and s == 1.0):
            return logits
        if op == "divide":
            return logits / s
        if op == "multiply":
            return logits * s
        return torch.tanh(logits / s) * s  # softcap

    @torch.inference_mode()
    def forward_from(self, start: int, hidden: torch.Tensor, record: BatchRecord) -> torch.Tensor:
        """Layers start..N-1 then the head: logits (B, L, V)."""
        for i in range(start, self.num_layers):
            hidden = self.run_layer(i, hidden, record)
        return self.head(hidden)
