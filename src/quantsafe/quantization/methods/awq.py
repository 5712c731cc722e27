"""AWQ (Lin et al., MLSys 2024; `mit-han-lab/llm-awq`): activation-aware weight quantization (algorithms.md §3).

Per decoder block, on inputs from the full-precision model:
1. per set of Linears that read one input, s_X = mean |x| per input channel; a grid search of α picks the scale
   s = s_X^α (clamped ≥ 1e-4, normalised by √(max·min)) whose pseudo-quantization Q(W·s)/s gives the smallest
   mean squared error of the inspected module's output (the whole attention for q/k/v, the whole MLP for
   gate/up, the Linear itself for o and down);
2. the scales are folded into the previous op (norm weight or Linear rows ÷ s, the set's columns × s), which
   leaves the full-precision block function unchanged;
3. optionally a clipping search per (row, group) of every Linear but q and k, on the scaled inputs;
4. the scaled, clipped weights are quantized group-wise onto the same grid the search used and stored as
   `UniformLayer`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from quantsafe.errors import QuantsafeError
from quantsafe.quantization.base import InputsFrom, LayerStats, QuantizedLayer, Quantizer, register_quantizer
from quantsafe.quantization.methods.rtn import rtn_quantize
from quantsafe.quantization.uniform import UniformLayer

if TYPE_CHECKING:
    from quantsafe.quantization.config import QuantConfig
    from quantsafe.quantization.sequential import BlockContext

# Blocks whose layout the four scale sets below are known to be right for (the reference supports the same two);
# others (e.g. Gemma's post-attention norm sits on the attention *output*) would be silently wrong if folded.
SUPPORTED_BLOCKS = frozenset({"LlamaDecoderLayer", "Qwen2DecoderLayer"})
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
NO_CLIP = frozenset({"self_attn.q_proj", "self_attn.k_proj"})  # the q·kᵀ product makes clipping hard to judge
MIN_SCALE = 1e-4
CLIP_CHUNK = 2**24  # elements of one [groups, tokens, rows] partial-output tensor in the clip search

Call = tuple[tuple[Any, ...], dict[str, Any]]
PseudoQuantize = Callable[[torch.Tensor, str], torch.Tensor]  # (fp32 weight, Linear name) → dequantized fp32


class AWQOptions(BaseModel):
    """AWQ's knobs, all at the reference code's values."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_grid: int = Field(20, ge=1)  # α = i / n_grid for i < n_grid (α = 1 is not tried, as in the reference)
    clip: bool = True  # the clipping search ("mse_range" in the reference, on by default)
    max_shrink: float = Field(0.5, gt=0, lt=1)  # clip thresholds go down to (1 − max_shrink)·max|w|, exclusive
    n_clip_grid: int = Field(20, ge=1)  # shrink step 1/n_clip_grid
    n_clip_tokens: int = Field(512, ge=1)  # evenly spaced calibration tokens the clip search measures on


@dataclass(frozen=True)
class ScaleSet:
    """Linears that read one input, the op producing that input (scales fold into it) and the module whose
    output the search compares with full precision; names relative to the block."""

    name: str
    prev: str
    linears: tuple[str, ...]
    inspect: str


@dataclass(frozen=True)
class ScaleSearch:
    """The grid search's outcome for one set: the chosen α, its fp32 scales, its loss and the loss at every α."""

    alpha: float
    scales: torch.Tensor
    loss: float
    losses: list[float]


def awq_scale_sets(block: nn.Module, index: int) -> list[ScaleSet]:
    """The reference's four sets for a Llama/Qwen2 block; v→o only when v and o have the same shape (not GQA)."""
    kind = type(block).__name__
    linears = {n for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    if kind not in SUPPORTED_BLOCKS or linears != set(LINEARS):
        raise QuantsafeError(
            f"AWQ: decoder block {index} ({kind}, Linears {sorted(linears)}) has no known scale-folding layout; "
            f"supported: {', '.join(sorted(SUPPORTED_BLOCKS))} with {', '.join(LINEARS)}"
        )
    sets = [ScaleSet("qkv", "input_layernorm", LINEARS[:3], "self_attn")]
    v, o = _linear(block, "self_attn.v_proj"), _linear(block, "self_attn.o_proj")
    if v.weight.shape == o.weight.shape:
        sets.append(ScaleSet("o", "self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"))
    sets.append(ScaleSet("gate_up", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"))
    sets.append(ScaleSet("down", "mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"))
    return sets


def _linear(block: nn.Module, name: str) -> nn.Linear:
    module = block.get_submodule(name)
    assert isinstance(module, nn.Linear)  # awq_scale_sets checked the layout
    return module


def _output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def capture_calls(ctx: BlockContext, names: list[str]) -> dict[str, list[Call]]:
    """The (args, kwargs) every named submodule is called with on each cached batch, in one block forward
    (`ctx.module_inputs` would run the block once per module)."""
    calls: dict[str, list[Call]] = {n: [] for n in names}

    def recorder(name: str) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]:
        def pre(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            calls[name].append((args, dict(kwargs)))

        return pre

    handles = [ctx.block.get_submodule(n).register_forward_pre_hook(recorder(n), with_kwargs=True) for n in names]
    try:
        ctx.forward()
    finally:
        for handle in handles:
            handle.remove()
    return calls


@dataclass
class InputSummary:
    """What AWQ keeps of a Linear's cached inputs: mean |x| per channel over all tokens (fp32) and a sample of
    evenly spaced tokens for the clip search (fp32 [≤ n, cols]); never the whole fp32 matrix."""

    abs_mean: torch.Tensor
    sample: torch.Tensor


def summarize_inputs(calls: list[Call], n_sample: int) -> InputSummary:
    """One pass over a Linear's cached inputs, batch by batch (no fp32 copy of them all)."""
    flats = [args[0].reshape(-1, args[0].shape[-1]) for args, _ in calls]
    total = sum(f.shape[0] for f in flats)
    device = flats[0].device
    abs_sum = torch.zeros(flats[0].shape[1], device=device)
    picks = torch.linspace(0, total - 1, min(n_sample, total), device=device).round().long()
    parts, offset = [], 0
    for flat in flats:
        abs_sum += flat.float().abs().sum(dim=0)
        mine = picks[(picks >= offset) & (picks < offset + flat.shape[0])] - offset
        parts.append(flat[mine].float())
        offset += flat.shape[0]
    return InputSummary(abs_mean=abs_sum / total, sample=torch.cat(parts))


@torch.no_grad()
def module_mse(module: nn.Module, calls: list[Call], reference: list[torch.Tensor]) -> float:
    """Mean squared error (fp32) of `module`'s outputs on `calls` against `reference`."""
    total, count = torch.zeros((), device=reference[0].device), 0
    for (args, kwargs), ref in zip(calls, reference, strict=True):
        out = _output(module(*args, **kwargs))
        total += (out.float() - ref.float()).pow(2).sum()
        count += out.numel()
    return float(total) / max(count, 1)  # one device sync per α, not per batch


def alpha_scales(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max(s_X^α, 1e-4), normalised by √(max s · min s) so the scales straddle 1."""
    s = x_mean.pow(alpha).clamp(min=MIN_SCALE)
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def search_scales(block: nn.Module, sset: ScaleSet, x_mean: torch.Tensor, calls: list[Call],
                  reference: list[torch.Tensor], pseudo_quantize: PseudoQuantize, n_grid: int) -> ScaleSearch:
    """Grid search of α for one set: for each α the set's weights become Q(W·s)/s (in the model's dtype), the
    inspected module runs on its cached inputs, and its output error is measured; the weights are restored.
    Ties keep the smaller α, so the result is never worse than plain quantization (α = 0, s = 1)."""
    module = block.get_submodule(sset.inspect)
    linears = [_linear(block, n) for n in sset.linears]
    originals = [lin.weight.detach().clone() for lin in linears]
    losses: list[float] = []
    try:
        for i in range(n_grid):
            s = alpha_scales(x_mean, i / n_grid)
            for name, lin, w in zip(sset.linears, linears, originals, strict=True):
                lin.weight.copy_((pseudo_quantize(w.float() * s, name) / s).to(w.dtype))
            losses.append(module_mse(module, calls, reference))
    finally:
        for lin, w in zip(linears, originals, strict=True):
            lin.weight.copy_(w)
    finite = [loss for loss in losses if math.isfinite(loss)]
    if not finite:
        raise QuantsafeError(f"AWQ: every scale of set '{sset.name}' gave a non-finite output error")
    best = losses.index(min(finite))
    return ScaleSearch(alpha=best / n_grid, scales=alpha_scales(x_mean, best / n_grid), loss=losses[best],
                       losses=losses)


@torch.no_grad()
def fold_scales(block: nn.Module, sset: ScaleSet, scales: torch.Tensor, weights: dict[str, torch.Tensor]) -> None:
    """Divide the previous op's output by s and multiply the set's input columns by s: the full-precision
    function is unchanged. `weights` holds fp32 master copies of the block's Linear weights (updated in place,
    then written to the modules in their dtype), so repeated folds round only once."""
    prev = block.get_submodule(sset.prev)
    if isinstance(prev, nn.Linear):
        weights[sset.prev].div_(scales[:, None])
        prev.weight.copy_(weights[sset.prev].to(prev.weight.dtype))
    else:
        gamma = prev.weight
        assert isinstance(gamma, torch.Tensor)
        gamma.copy_((gamma.float() / scales).to(gamma.dtype))
    bias = getattr(prev, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.copy_((bias.float() / scales).to(bias.dtype))
    for name in sset.linears:
        weights[name].mul_(scales)
        lin = _linear(block, name)
        lin.weight.copy_(weights[name].to(lin.weight.dtype))


@torch.no_grad()
def search_clip(weight: torch.Tensor, x: torch.Tensor, group_size: int | None,
                pseudo_quantize: Callable[[torch.Tensor], torch.Tensor], options: AWQOptions) -> torch.Tensor:
    """The weight clamped to ±c per (row, group), c = (1 − i/n_clip_grid)·max|w| chosen to minimise the mean
    squared error of the group's partial dot products with the sampled inputs `x` [tokens, cols] after
    `pseudo_quantize` (which gets the clamped groups as rows). The clamp is symmetric even for an asymmetric
    grid, like the reference. A partial last group is padded with its last column (same min, max and grid) and
    zero inputs (no contribution)."""
    w = weight.float()
    rows, cols = w.shape
    g = cols if group_size is None else group_size
    n_groups = -(-cols // g)
    pad = n_groups * g - cols
    x = x.float()
    if pad:
        w = torch.cat([w, w[:, -1:].expand(rows, pad)], dim=1)
        x = torch.cat([x, x.new_zeros(x.shape[0], pad)], dim=1)
    wg = w.reshape(rows, n_groups, g)
    xg = x.reshape(x.shape[0], n_groups, g).transpose(0, 1)  # [groups, tokens, g]
    limit = wg.abs().amax(dim=2, keepdim=True)  # [rows, groups, 1]
    best = limit.clone()
    steps = math.floor(options.max_shrink * options.n_clip_grid + 1e-9)
    chunk = max(1, CLIP_CHUNK // (n_groups * x.shape[0]))
    for start in range(0, rows, chunk):
        wb, lim = wg[start : start + chunk], limit[start : start + chunk]
        reference = torch.bmm(xg, wb.permute(1, 2, 0))  # [groups, tokens, chunk]
        min_err = torch.full(lim.shape, torch.inf, device=w.device)
        for i in range(steps):
            c = lim * (1 - i / options.n_clip_grid)
            q = pseudo_quantize(torch.clamp(wb, -c, c).reshape(-1, g)).reshape(wb.shape)
            err = (torch.bmm(xg, q.permute(1, 2, 0)) - reference).pow(2).mean(dim=1).T[..., None]
            better = err < min_err
            min_err = torch.where(better, err, min_err)
            best[start : start + chunk] = torch.where(better, c, best[start : start + chunk])
    clipped = torch.clamp(wg, -best, best).reshape(rows, n_groups * g)
    return clipped[:, :cols]


@register_quantizer("awq")
class AWQQuantizer(Quantizer):
    """AWQ: activation-aware scales searched per Linear set on the block output error, folded into the previous
    norm or Linear; optional clipping search; group-wise integer grid (asymmetric INT4 g128 by default, g64 on
    576-wide SmolLM2). Works on Llama and Qwen2 blocks.

    The grid is the project's `fit_grid` (range widened to contain 0, fp16 scale rounded up) rather than the
    reference's raw min/max: the two coincide for every group that straddles 0 (all groups of real weights),
    and this one always fits the zero point in `bits` bits; the search pseudo-quantizes onto exactly the grid
    that is stored.

    Sample YAML::

        method: awq
        bits: 4
        group_size: 64
        options: {n_grid: 20, clip: true, max_shrink: 0.5, n_clip_grid: 20, n_clip_tokens: 512}
        calibration: {source: wikitext2, n_samples: 128, seq_len: 512}
    """

    version = 1
    needs_calibration = True
    Options = AWQOptions

    def __init__(self, config: QuantConfig) -> None:
        super().__init__(config)
        self.options = AWQOptions.model_validate(self.config.options)

    @property
    def inputs_from(self) -> InputsFrom:
        return "fp"

    def quantize(self, weight: torch.Tensor, stats: LayerStats | None, name: str) -> UniformLayer:
        """Plain group-wise quantization of an already scaled and clipped weight (the last step of a block)."""
        return rtn_quantize(weight, self.bits_for(name), self.config.group_size, self.config.sym)

    def pseudo_quantize(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        """The weight as it would be stored (fp32), on the same grid as `quantize`."""
        return self.quantize(weight, None, name).dequantize()

    @torch.no_grad()
    def row_pseudo_quantize(self, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """Pseudo-quantization with one group per row, for the clip search's [rows·groups, group] weights."""
        bits, sym = self.bits_for(name), self.config.sym
        return lambda w: rtn_quantize(w, bits, None, sym).dequantize()

    @torch.no_grad()
    def quantize_block(self, ctx: BlockContext) -> dict[str, QuantizedLayer]:
        block = ctx.block
        sets = awq_scale_sets(block, ctx.index)
        # each Linear → the Linear whose cached input it reads (q/k/v and gate/up share one)
        source = {n: s.linears[0] for s in sets for n in s.linears} | {"self_attn.o_proj": "self_attn.o_proj"}
        calls = capture_calls(ctx, sorted({s.inspect for s in sets} | set(source.values())))
        inputs = {n: summarize_inputs(calls[n], self.options.n_clip_tokens) for n in set(source.values())}
        searches: dict[str, ScaleSearch] = {}
        for sset in sets:  # every search sees the unscaled full-precision block, like the reference
            module = block.get_submodule(sset.inspect)
            reference = [_output(module(*args, **kwargs)) for args, kwargs in calls[sset.inspect]]
            searches[sset.name] = search_scales(block, sset, inputs[sset.linears[0]].abs_mean, calls[sset.inspect],
                                                reference, self.pseudo_quantize, self.options.n_grid)
        del calls

        weights = {name: _linear(block, name).weight.detach().float().clone() for name in LINEARS}
        for sset in sets:
            fold_scales(block, sset, searches[sset.name].scales, weights)
            inputs[sset.linears[0]].sample.div_(searches[sset.name].scales)  # the clip search sees x / s
        if self.options.clip:
            for name in LINEARS:
                if name not in NO_CLIP:
                    weights[name] = search_clip(weights[name], inputs[source[name]].sample, self.config.group_size,
                                                self.row_pseudo_quantize(name), self.options)

        losses = {n: searches[s.name].loss for s in sets for n in s.linears}
        results: dict[str, QuantizedLayer] = {}
        for name in LINEARS:
            layer = self.quantize(weights[name], None, name)
            layer.loss = losses.get(name)
            lin = _linear(block, name)
            lin.weight.copy_(layer.dequantize(lin.weight.dtype))
            results[name] = layer
        return results
