"""Run a model's decoder stack layer by layer, from any layer, exactly as its own forward does.

Every family builds the decoder layers' extra arguments differently (rotary tables, partial/no-rope
layers, causal/sliding/chunked masks, embedding multipliers, ...). Instead of re-implementing each,
`LayerReplay.record` runs the stock forward once per batch with forward pre-hooks on the decoder
layers and keeps what each layer was called with. Those arguments depend only on the tokens, never
on which experts are masked, so a candidate can restart at layer j from a hidden state and replay
layers j..N-1 with them; then ``norm -> lm_head`` (``/ logits_scaling`` where the family has it).
This is written once for every family and tested equal to ``model(input_ids).logits`` on all of them.

A layer's attention sub-module sees only the layer's input, never the experts, so a candidate that
restarts at layer j from a cached input can also take layer j's attention output from the run that
cached it (`run_layer(attention_output=...)`): the sub-module is swapped for one returning the stored
value, bitwise what it would compute.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..arch import family_of, get_path
from .searchset import SearchBatch

ATTENTION_ATTRS = ("self_attn", "attention", "attn")  # the attention sub-module of a decoder layer


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


class LayerReplay:
    """Decoder layers, final norm and LM head of one loaded causal LM."""

    def __init__(self, model: nn.Module) -> None:
        family = family_of(model.config)
        self.model = model
        self.layers: nn.ModuleList = get_path(model, family.layers_path)  # type: ignore[assignment]
        backbone = get_path(model, family.layers_path.rsplit(".", 1)[0])
        self.norm: nn.Module = backbone.norm  # type: ignore[union-attr]
        self.lm_head: nn.Module = model.get_output_embeddings()
        self.logits_scaling = float(getattr(model.config.get_text_config(), "logits_scaling", 1.0) or 1.0)
        self.attention_names: list[str | None] = [
            next((a for a in ATTENTION_ATTRS if isinstance(getattr(layer, a, None), nn.Module)), None)
            for layer in self.layers
        ]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @torch.inference_mode()
    def record(self, batch: SearchBatch) -> BatchRecord:
        """One stock forward of `batch`, recording every decoder layer's call."""
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

        handles = [
            layer.register_forward_pre_hook(make_hook(i), with_kwargs=True)
            for i, layer in enumerate(self.layers)
        ]
        try:
            out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        if any(c is None for c in calls):
            raise RuntimeError("not every decoder layer was called by the model's forward; cannot replay it")
        return BatchRecord(layer0_input=first[0], calls=calls, logits=out.logits)  # type: ignore[arg-type]

    def run_layer(
        self,
        index: int,
        hidden: torch.Tensor,
        record: BatchRecord,
        *,
        attention_output=None,
        capture: list | None = None,
    ) -> torch.Tensor:
        """Decoder layer `index` on hidden (B, L, H) -> (B, L, H).

        attention_output: what the layer's attention returned for this same `hidden` in an earlier
        run, used instead of recomputing it. capture: a list the attention's output is appended to."""
        args, kwargs = record.calls[index]
        layer, name = self.layers[index], self.attention_names[index]
        if name is None:
            out = layer(hidden, *args, **kwargs)
        elif attention_output is not None:
            original = getattr(layer, name)
            setattr(layer, name, _StoredOutput(attention_output))
            try:
                out = layer(hidden, *args, **kwargs)
            finally:
                setattr(layer, name, original)
        elif capture is not None:
            handle = getattr(layer, name).register_forward_hook(lambda m, a, o: capture.append(o))
            try:
                out = layer(hidden, *args, **kwargs)
            finally:
                handle.remove()
        else:
            out = layer(hidden, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Last decoder layer's output (B, L, H) -> logits (B, L, V)."""
        logits = self.lm_head(self.norm(hidden))
        return logits / self.logits_scaling if self.logits_scaling != 1.0 else logits

    @torch.inference_mode()
    def forward_from(self, start: int, hidden: torch.Tensor, record: BatchRecord) -> torch.Tensor:
        """Layers start..N-1 then the head: logits (B, L, V)."""
        for i in range(start, self.num_layers):
            hidden = self.run_layer(i, hidden, record)
        return self.head(hidden)
