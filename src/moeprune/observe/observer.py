"""One calibration pass that records `ExpertStats`, running each expert only on its routed tokens.

`Observer` owns every hook and patch it installs (one `arch.patching.Patches` stack) and removes them
on exit, even on error; accelerate's device-map hooks are wrapped, never removed:

- a forward hook on each router reads the router decision (`decode_router_output`);
- for families whose fused experts take ``(hidden, top_k_index, top_k_weights)`` ("routed"), the
  experts call is wrapped: it runs once on the T*k (token, expert) pairs with unit weights, giving
  every a_i(x), and returns ``sum_j g_j(x) a_j(x)`` summed over the top-k exactly as transformers'
  grouped kernel does. No expert runs twice, so the pass costs about one plain forward;
- for families that call the experts on stacked, input-scaled rows (Llama 4), the router hook runs
  `expert_outputs` on the routed pairs (a_i(x), and c_i(x) = a_i(g_i x)) next to the model's own call.

Only when a dense subsample is asked for (``dense_tokens > 0``, MoP) are ALL experts run, on that
subsample of tokens only. Padding (attention mask 0) never enters any statistic. Per-token values
(norms, dot products) are computed in float32 (or the model's dtype if wider) and summed in float64.

Measured on the testbed (benchmarks/observe.py, results in benchmarks/results/observe.txt): the
observer pass costs 1.08x a plain forward pass; a dense observer (every expert on every token) 6.4x.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from tqdm.auto import tqdm

from ..arch import MoELayer, RouterDecision, decode_router_output, expert_outputs, moe_layers
from ..arch.patching import Patches, input_device
from ..data import TokenSet
from .stats import ExpertStats, LayerStats

LN2 = math.log(2.0)


class Observer:
    """Hooks that accumulate `LayerStats` for every MoE layer while the model runs forward.

    Use as a context manager; call `set_batch` before each forward with the batch's masks.
    """

    def __init__(self, model: nn.Module, dense: bool = False) -> None:
        self.model = model
        self.layers = moe_layers(model)
        self.dense = dense
        self.stats = {
            layer.index: LayerStats(
                index=layer.index,
                num_experts=layer.num_experts,
                top_k=layer.top_k,
                num_groups=layer.num_groups,
                topk_groups=layer.topk_groups,
            )
            for layer in self.layers
        }
        self._dense_parts: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {
            layer.index: [] for layer in self.layers
        }
        self._patches = Patches()  # hooks and wrapped forwards, undone on exit
        self._decision: dict[int, RouterDecision] = {}
        self._reentrant = False
        self._valid: torch.Tensor | None = None  # (T,) bool
        self._dense_sel: torch.Tensor | None = None  # (T,) bool
        self._domain: torch.Tensor | None = None  # (T,) int64

    # ----------------------------------------------------------------- hooks
    def __enter__(self) -> Observer:
        patches = Patches()
        try:
            for layer in self.layers:
                patches.forward_hook(layer.router, self._router_hook(layer))
                if layer.family.experts_call == "routed":
                    patches.wrap_forward(
                        layer.experts, lambda inner, layer=layer: self._experts_forward(layer, inner)
                    )
        except BaseException:
            patches.restore()
            raise
        self._patches = patches
        return self

    def __exit__(self, *exc) -> None:
        patches, self._patches = self._patches, Patches()
        self._decision.clear()
        patches.restore()

    def set_batch(self, attention_mask: torch.Tensor, dense_mask: torch.Tensor, domain: torch.Tensor) -> None:
        """Masks of the next forward, each (B, L): real tokens, dense-subsample tokens, domain index."""
        self._valid = attention_mask.reshape(-1).bool()
        self._dense_sel = (dense_mask.reshape(-1).bool() & self._valid) if self.dense else None
        self._domain = domain.reshape(-1)

    def _router_hook(self, layer: MoELayer):
        def hook(module, args, output):
            if self._reentrant:
                return
            decision = decode_router_output(layer, output)
            if layer.family.experts_call == "routed":
                self._decision[layer.index] = decision
                return
            x = args[0].reshape(-1, args[0].shape[-1])  # (T, H)
            t, k = decision.indices.shape
            ids = decision.indices.reshape(-1)  # (T*k,)
            rows = x.repeat_interleave(k, dim=0)  # (T*k, H)
            self._reentrant = True
            try:
                a = expert_outputs(layer, rows, ids).view(t, k, -1)  # (T, k, H)
                w = decision.weights.reshape(-1, 1).to(rows.dtype)
                c = expert_outputs(layer, rows * w, ids).view(t, k, -1)  # (T, k, H) = a_i(g_i x)
                self._accumulate(layer, x, decision, a, c)
            finally:
                self._reentrant = False

        return hook

    def _experts_forward(self, layer: MoELayer, original):
        def forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs):
            if self._reentrant:
                return original(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
            t, k = top_k_index.shape
            rows = hidden_states.repeat_interleave(k, dim=0)  # (T*k, H): token t's k pairs together
            ones = torch.ones(t * k, 1, dtype=top_k_weights.dtype, device=rows.device)
            with _SingletonSums():
                a = original(rows, top_k_index.reshape(-1, 1), ones).view(t, k, -1)  # (T, k, H)
            c = a * top_k_weights.unsqueeze(-1)  # (T, k, H) = g_i(x) a_i(x), as the kernels weight it
            decision = self._decision.pop(layer.index)
            self._reentrant = True
            try:
                self._accumulate(layer, hidden_states, decision, a, c)
            finally:
                self._reentrant = False
            return c.sum(dim=1).to(hidden_states.dtype)  # (T, H)

        return forward

    # ------------------------------------------------------------ statistics
    @torch.no_grad()
    def _accumulate(
        self, layer: MoELayer, x: torch.Tensor, decision: RouterDecision, a: torch.Tensor, c: torch.Tensor
    ) -> None:
        """Add one batch: x (T, H), a and c (T, k, H), decision (T, k) / (T, E). Formulas: stats.py."""
        if self._valid is None or self._valid.numel() != x.shape[0]:
            raise RuntimeError("Observer.set_batch() must describe the batch the model is running")
        st = self.stats[layer.index]
        e = st.num_experts
        valid = self._valid.to(x.device)
        everything = bool(valid.all())  # packed data: skip the boolean-index copies

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t if everything else t[valid]

        idx = pick(decision.indices)  # (V, k)
        w = pick(decision.weights).double()  # (V, k)
        c_v = pick(c)  # (V, k, H), model dtype: products below are summed in float64
        flat = idx.reshape(-1).cpu()  # (V*k,)
        norms, pair = _norms_and_pairs(pick(a), c_v)  # (V, k) ||a_i(x)||, (V, k, k) c_a . c_b
        norms, pair = norms.double(), pair.double()
        st.tokens += int(idx.shape[0])
        st.count += torch.bincount(flat, minlength=e).double()
        st.gate_sum.index_add_(0, flat, w.reshape(-1).cpu())
        st.norm_sum.index_add_(0, flat, norms.reshape(-1).cpu())
        st.gnorm_sum.index_add_(0, flat, (w * norms).reshape(-1).cpu())
        p = torch.softmax(pick(decision.logits).double(), dim=-1)  # (V, E) router softmax
        st.prob_sum += p.sum(0).cpu()
        st.plogp_sum += (torch.xlogy(p, p).sum(0) / LN2).cpu()  # sum p log2 p (0 log 0 = 0)
        k = idx.shape[1]
        rows = idx[:, :, None].expand(-1, -1, k).reshape(-1).cpu()
        cols = idx[:, None, :].expand(-1, k, -1).reshape(-1).cpu()
        st.gram.index_put_((rows, cols), pair.reshape(-1).cpu(), accumulate=True)
        if self._dense_sel is not None:
            self._dense(layer, x, c)

    def _dense(self, layer: MoELayer, x: torch.Tensor, c: torch.Tensor) -> None:
        """All E experts on the subsample tokens: err (n, E) = ||z(x) - a_i(x)||^2."""
        sel = self._dense_sel.to(x.device)
        n = int(sel.sum())
        if n == 0:
            return
        e = layer.num_experts
        xs = x[sel]  # (n, H)
        rows = xs.repeat(e, 1)  # (E*n, H), expert-major
        ids = torch.arange(e, device=x.device).repeat_interleave(n)  # (E*n,)
        a_all = expert_outputs(layer, rows, ids).view(e, n, -1).transpose(0, 1).double()  # (n, E, H)
        z = c[sel].double().sum(dim=1)  # (n, H) layer output of the routed experts
        err = (z[:, None, :] - a_all).pow(2).sum(-1)  # (n, E)
        self._dense_parts[layer.index].append((xs.float().cpu(), err.cpu(), self._domain[sel.cpu()].cpu()))

    def result(self) -> dict[int, LayerStats]:
        """The accumulated statistics (dense parts concatenated)."""
        for index, parts in self._dense_parts.items():
            if parts:
                st = self.stats[index]
                st.dense_hidden = torch.cat([p[0] for p in parts])
                st.dense_err = torch.cat([p[1] for p in parts])
                st.dense_domain = torch.cat([p[2] for p in parts])
        return self.stats


class _SingletonSums(TorchFunctionMode):
    """Within the per-pair experts call (top-k of 1), a sum over one dimension of size 1 is served as
    that dimension squeezed: transformers' grouped kernel ends with ``out.view(T, k, H).sum(dim=1)``,
    which for k = 1 is a copy that cost ~15 ms per layer and batch of 2048 tokens x 8 pairs on a CPU
    (a third of the observer's cost over a plain forward). The same values: the sum of one element."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.sum and len(args) == 1 and set(kwargs) == {"dim"}:
            x, dim = args[0], kwargs["dim"]
            if isinstance(dim, int) and x.is_floating_point() and x.dim() > 1 and x.shape[dim] == 1:
                return x.squeeze(dim)
        return func(*args, **kwargs)


CHUNK_BYTES = 2 * 2**20  # float32 copies of (tokens, k, H) made this many bytes at a time on a CPU


def _norms_and_pairs(a: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """||a_i(x)|| (V, k) and the dot products c_a . c_b (V, k, k), in float32, from a and c (V, k, H).
    On a CPU a few tokens at a time: their float32 copies then stay in cache instead of being fresh
    (T, k, H) buffers, which made the observer ~1.4x a plain forward at batch 8 on a bf16 model with
    128 experts, top-8 (per token the same operations, so the same values)."""
    v, k, h = a.shape
    step = max(1, CHUNK_BYTES // (4 * k * h)) if a.device.type == "cpu" else max(v, 1)
    norms = torch.empty(v, k, dtype=torch.float32, device=a.device)
    pairs = torch.empty(v, k, k, dtype=torch.float32, device=a.device)
    for s in range(0, v, step):
        e = min(s + step, v)
        norms[s:e] = a[s:e].float().norm(dim=-1)
        f = c[s:e].float()
        torch.bmm(f, f.transpose(1, 2), out=pairs[s:e])
    return norms, pairs


def dense_subsample(data: TokenSet, dense_tokens: int, seed: int) -> torch.Tensor:
    """(B, L) bool: `dense_tokens` real tokens drawn uniformly without replacement (seeded)."""
    mask = torch.zeros_like(data.attention_mask, dtype=torch.bool)
    positions = data.attention_mask.reshape(-1).nonzero().squeeze(-1)  # (N,)
    n = min(dense_tokens, positions.numel())
    if n > 0:
        pick = np.random.default_rng(seed).choice(positions.numel(), size=n, replace=False)
        mask.view(-1)[positions[torch.as_tensor(pick)]] = True
    return mask


@contextmanager
def observing(model: nn.Module, dense: bool = False) -> Iterator[Observer]:
    """``with observing(model) as obs:`` hooks installed for the block, removed after (even on error)."""
    with Observer(model, dense=dense) as obs:
        yield obs


@torch.no_grad()
def observe(
    model: nn.Module,
    data: TokenSet,
    *,
    batch_size: int = 8,
    dense_tokens: int = 0,
    seed: int = 0,
    progress: bool = True,
    model_name: str | None = None,
) -> ExpertStats:
    """Run `data` through `model` once and return the `ExpertStats` of every MoE layer.

    ``dense_tokens`` > 0 also records, on that many seeded random tokens, every expert's output error
    (for MoP). Runs on the model's device; statistics live on the CPU in float64.
    """
    if getattr(model, "runs_layer_by_layer", False):  # an `execute.LayerwiseModel`
        return model.observe(
            data, batch_size=batch_size, dense_tokens=dense_tokens, seed=seed, model_name=model_name
        )
    device = input_device(model)
    dense_mask = dense_subsample(data, dense_tokens, seed)  # (B, L)
    names = data.domain_names
    sample_domain = torch.tensor([names.index(d) for d in data.domains], dtype=torch.long)  # (B,)
    domain = sample_domain[:, None].expand_as(data.attention_mask)  # (B, L)
    was_training = model.training
    model.eval()
    try:
        with observing(model, dense=dense_tokens > 0) as obs:
            starts = range(0, len(data), batch_size)
            for s in tqdm(starts, desc="observe", unit="batch", disable=not progress):
                sl = slice(s, s + batch_size)
                mask = data.attention_mask[sl]
                obs.set_batch(mask, dense_mask[sl], domain[sl])
                model(
                    input_ids=data.input_ids[sl].to(device), attention_mask=mask.to(device), use_cache=False
                )
            layers = obs.result()
    finally:
        model.train(was_training)
    return ExpertStats(layers=layers, meta=observation_meta(model, data, dense_mask, model_name))


def observation_meta(
    model: nn.Module, data: TokenSet, dense_mask: torch.Tensor, model_name: str | None
) -> dict:
    """What `ExpertStats.meta` records about an observation pass (the same in every execution mode)."""
    return {
        "model": model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__,
        "model_type": model.config.get_text_config().model_type,
        "data_fingerprint": data.fingerprint,
        "num_samples": len(data),
        "num_tokens": data.num_tokens,
        "domain_names": data.domain_names,
        "dense_tokens": int(dense_mask.sum()),
    }
