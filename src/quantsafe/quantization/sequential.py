"""Layer-by-layer calibration (algorithms.md §0): only one decoder block and its activations are live at once.

1. Run the embeddings with every decoder layer replaced by a recorder, catching block 0's inputs and the
   kwargs each layer is called with (attention mask, position ids, rotary `position_embeddings`, ...).
2. Per block, the quantizer's `quantize_block` gets a `BlockContext`. The default hooks the block's Linears, runs
   the cached inputs through it and accumulates the statistics the method asks for (Σ x xᵀ, Σ|x|, max|x|, fp32)
   per distinct input (q/k/v share one, gate/up share one), then quantizes each Linear.
   True-sequential mode repeats that per input-sharing group ([q,k,v] → [o] → [gate,up] → [down]), each pass
   stopping right after the group's last Linear, so later groups see the already-quantized earlier ones.
   The early stops make that about one extra block forward per block instead of three.
3. The next block's inputs are this block's outputs, quantized or (`inputs_from == "fp"`) computed before any of
   its weights changed.
Everything runs on the model's device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantsafe.errors import QuantsafeError
from quantsafe.quantization.base import LayerStats, QuantizedLayer, Quantizer, Stat

Progress = Callable[[int, int, str], None]  # (blocks done, blocks total, message)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Llama/Qwen2-style causal LM (`model.model.layers`)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise QuantsafeError(f"{type(model).__name__}: no `model.layers` list of decoder blocks; unsupported model")
    return layers


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The Linear layers inside one decoder block, by their name relative to the block."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


@dataclass
class _Batch:
    hidden: torch.Tensor  # [b, seq, hidden], the model dtype
    layer_kwargs: list[dict[str, Any]]  # the kwargs each decoder layer receives for this batch


class _StopForward(Exception):
    """Raised from a hook to end a block forward once the Linears of interest have run."""


class _Recorder:
    """Stands in for a decoder layer's forward: records the call's kwargs and returns the input unchanged."""

    def __init__(self, calls: list[tuple[torch.Tensor, dict[str, Any]]]) -> None:
        self.calls = calls

    def __call__(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise QuantsafeError("decoder layer called with extra positional arguments; unsupported model")
        self.calls.append((hidden_states, kwargs))
        return hidden_states


@torch.no_grad()
def capture_block_inputs(model: nn.Module, tokens: torch.Tensor, batch_size: int) -> list[_Batch]:
    """Inputs of block 0 and every layer's kwargs, per mini-batch, without running any decoder layer."""
    layers = decoder_layers(model)
    base: Any = model.model
    batches: list[_Batch] = []
    tokens = tokens.to(next(model.parameters()).device)
    for start in range(0, tokens.shape[0], batch_size):
        calls: list[tuple[torch.Tensor, dict[str, Any]]] = []
        for layer in layers:
            layer.forward = _Recorder(calls)
        try:
            base(input_ids=tokens[start : start + batch_size], use_cache=False)
        finally:
            for layer in layers:
                del layer.forward
        batches.append(_Batch(hidden=calls[0][0], layer_kwargs=[kwargs for _, kwargs in calls]))
    return batches


class _StatsHooks:
    """Forward hooks that accumulate the wanted input statistics per Linear, once per distinct input tensor."""

    def __init__(self, linears: dict[str, nn.Linear], wanted: frozenset[Stat], stop_after: str | None = None,
                 accumulate: bool = True) -> None:
        self.accumulate = accumulate  # False: only learn the execution order and which Linears share an input
        self.wanted = wanted
        self.stats: dict[str, LayerStats] = {}
        self.order: list[str] = []  # execution order seen on the first batch
        self.shares_with: dict[str, str] = {}  # Linear → the earlier Linear that had the same input tensor
        self._last: tuple[str, torch.Tensor] | None = None
        self._stop_after = stop_after
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in linears.items()]

    def _hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            x = args[0]
            if name not in self.order:
                self.order.append(name)
            if self._last is not None and self._last[1] is x:
                self.shares_with.setdefault(name, self.shares_with.get(self._last[0], self._last[0]))
            elif not self.accumulate:
                self._last = (name, x)
            else:
                self._add(name, x.reshape(-1, x.shape[-1]).float())
                self._last = (name, x)
            if name == self._stop_after:
                raise _StopForward

        return hook

    def _add(self, name: str, flat: torch.Tensor) -> None:
        stats = self.stats.get(name)
        if stats is None:
            cols, dev = flat.shape[1], flat.device
            stats = self.stats[name] = LayerStats(
                n_tokens=0,
                xtx=torch.zeros(cols, cols, device=dev) if "xtx" in self.wanted else None,
                abs_sum=torch.zeros(cols, device=dev) if "abs_mean" in self.wanted else None,
                abs_max=torch.zeros(cols, device=dev) if "abs_max" in self.wanted else None,
            )
        if stats.xtx is not None:
            stats.xtx.addmm_(flat.T, flat)
        if stats.abs_sum is not None:
            stats.abs_sum.add_(flat.abs().sum(dim=0))
        if stats.abs_max is not None:
            torch.maximum(stats.abs_max, flat.abs().amax(dim=0), out=stats.abs_max)
        stats.n_tokens += flat.shape[0]

    def end_batch(self) -> None:
        self._last = None

    def layer_stats(self, name: str) -> LayerStats:
        return self.stats[self.shares_with.get(name, name)]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@contextmanager
def _stats_hooks(linears: dict[str, nn.Linear], wanted: frozenset[Stat], stop_after: str | None = None,
                 accumulate: bool = True) -> Iterator[_StatsHooks]:
    hooks = _StatsHooks(linears, wanted, stop_after, accumulate)
    try:
        yield hooks
    finally:
        hooks.remove()


def _run_block(block: nn.Module, batches: list[_Batch], index: int, hooks: _StatsHooks | None = None) -> None:
    for batch in batches:
        with suppress(_StopForward):
            block(batch.hidden, **batch.layer_kwargs[index])
        if hooks is not None:
            hooks.end_batch()


def _output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


class BlockContext:
    """One decoder block during quantization, with its cached inputs, and what a method may do with it."""

    def __init__(self, block: nn.Module, index: int, batches: list[_Batch] | None) -> None:
        self.block = block
        self.index = index
        self.batches = batches  # None for methods without calibration

    @property
    def linears(self) -> dict[str, nn.Linear]:
        return block_linears(self.block)

    def _calibrated(self) -> list[_Batch]:
        if self.batches is None:
            raise QuantsafeError("this step needs calibration inputs, and the method declared none")
        return self.batches

    @torch.no_grad()
    def forward(self) -> list[torch.Tensor]:
        """The block's output on every cached batch, as the block is now."""
        return [_output(self.block(b.hidden, **b.layer_kwargs[self.index])) for b in self._calibrated()]

    def inputs(self) -> list[tuple[torch.Tensor, dict[str, Any]]]:
        """(hidden states, layer kwargs) of every cached batch, for methods that run the block themselves."""
        return [(b.hidden, b.layer_kwargs[self.index]) for b in self._calibrated()]

    @torch.no_grad()
    def module_inputs(self, module: nn.Module) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
        """The (args, kwargs) `module` (a submodule of the block) is called with on every batch; the block
        forward stops as soon as the module has run."""
        calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

        def pre(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            calls.append((args, dict(kwargs)))

        def post(*_: Any) -> None:
            raise _StopForward

        handles = [module.register_forward_pre_hook(pre, with_kwargs=True), module.register_forward_hook(post)]
        try:
            _run_block(self.block, self._calibrated(), self.index)
        finally:
            for handle in handles:
                handle.remove()
        return calls

    @torch.no_grad()
    def collect_stats(self, names: list[str], wanted: frozenset[Stat], stop_after: str | None = None,
                      ) -> dict[str, LayerStats]:
        """Input statistics of the Linears `names` over all batches; Linears that share an input share one
        LayerStats object."""
        linears = self.linears
        with _stats_hooks({n: linears[n] for n in names}, wanted, stop_after) as hooks:
            _run_block(self.block, self._calibrated(), self.index, hooks)
        return {n: hooks.layer_stats(n) for n in names}

    def input_groups(self) -> list[list[str]]:
        """Linears of the block in execution order, grouped by shared input (found on one batch; Σ x xᵀ is not
        accumulated here: for a 4864-wide down_proj input that alone was ~9% of a GPTQ run)."""
        with _stats_hooks(self.linears, frozenset(), accumulate=False) as hooks:
            _run_block(self.block, self._calibrated()[:1], self.index, hooks)
        groups: list[list[str]] = []
        for name in hooks.order:
            if name in hooks.shares_with:
                next(g for g in groups if hooks.shares_with[name] in g).append(name)
            else:
                groups.append([name])
        return groups

    @torch.no_grad()
    def quantize_linears(self, quantizer: Quantizer, names: list[str] | None = None) -> dict[str, QuantizedLayer]:
        """The default block step: statistics per input group, then `quantizer.quantize` per Linear, whose
        dequantized weight replaces the Linear's. `names` limits it to some Linears (all by default)."""
        linears = self.linears
        wanted = quantizer.stats
        if self.batches is None or not wanted:
            return self._quantize_into(quantizer, [n for n in linears if names is None or n in names], {})
        groups = [[n for n in g if names is None or n in names] for g in self.input_groups()]
        groups = [g for g in groups if g]
        if quantizer.true_sequential:
            results: dict[str, QuantizedLayer] = {}
            for group in groups:
                results |= self._quantize_into(quantizer, group, self.collect_stats(group, wanted, group[-1]))
            return results
        flat = [n for g in groups for n in g]
        return self._quantize_into(quantizer, flat, self.collect_stats(flat, wanted))

    def _quantize_into(self, quantizer: Quantizer, names: list[str], stats: dict[str, LayerStats],
                       ) -> dict[str, QuantizedLayer]:
        results = {}
        linears = self.linears
        for name in names:
            layer = linears[name]
            result = quantizer.quantize(layer.weight, stats.get(name), name)
            layer.weight.copy_(result.dequantize(layer.weight.dtype))
            results[name] = result
        return results


@torch.no_grad()
def quantize_decoder_blocks(
    model: nn.Module,
    quantizer: Quantizer,
    tokens: torch.Tensor | None = None,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> dict[str, QuantizedLayer]:
    """Quantize every Linear inside the decoder blocks in place (weights become the dequantized values).

    Calibrated methods need `tokens` [n, seq_len]. Returns the storage form of each Linear by its full module
    name (e.g. "model.layers.0.self_attn.q_proj").
    """
    layers = decoder_layers(model)
    batches: list[_Batch] | None = None
    if quantizer.needs_calibration:
        if tokens is None:
            raise QuantsafeError(f"method '{quantizer.name}' needs calibration tokens")
        batches = capture_block_inputs(model, tokens, batch_size)
    results: dict[str, QuantizedLayer] = {}
    for i, block in enumerate(layers):
        ctx = BlockContext(block, i, batches)
        fp_outputs = ctx.forward() if batches is not None and quantizer.inputs_from == "fp" else None
        results |= {f"model.layers.{i}.{name}": r for name, r in quantizer.quantize_block(ctx).items()}
        if batches is not None:
            for batch, out in zip(batches, fp_outputs if fp_outputs is not None else ctx.forward(), strict=True):
                batch.hidden = out
        if progress:
            progress(i + 1, len(layers), f"block {i}")
    return results
