"""The quantizer contract: a method's storage form of one Linear, the input statistics it may ask for, and the
name → class registries of methods and storage formats.

A method is one module that defines a `Quantizer` subclass decorated with `@register_quantizer("name")` and, if
its storage form is new, a `QuantizedLayer` subclass decorated with `@register_layer_format("format")`; the
sequential pipeline, artifact format and CLI need no change to gain it.
"""

from __future__ import annotations

import fnmatch
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict

from quantsafe.errors import QuantsafeError

if TYPE_CHECKING:
    from torch import nn

    from quantsafe.quantization.config import QuantConfig
    from quantsafe.quantization.sequential import BlockContext, Progress

Stat = Literal["xtx", "abs_mean", "abs_max"]
InputsFrom = Literal["quantized", "fp"]


class QuantizedLayer(ABC):
    """One Linear weight [rows, cols] in a method's storage form.

    Every format can rebuild the dense weight exactly (all methods here are weight-only), count the bits it
    takes on disk, and turn itself into named tensors plus a small JSON record and back, bit-exactly.
    Tensors live on the device they were computed on; the artifact writer moves them to the CPU.
    """

    format: ClassVar[str]
    loss: float | None = None  # the method's own proxy loss, when it has one

    @property
    @abstractmethod
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the dense weight."""

    @abstractmethod
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight the model will actually use, on the layer's device."""

    @abstractmethod
    def storage_bits(self) -> int:
        """Exact bits on disk: codes, codebooks, scales, zeros, outliers, indices (biases excluded, §8)."""

    @abstractmethod
    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors to store, by suffix (`<linear name>.<suffix>` in the safetensors file)."""

    @abstractmethod
    def meta(self) -> dict[str, Any]:
        """JSON-able fields that `from_tensors` needs besides the tensors and the shape."""

    @classmethod
    @abstractmethod
    def from_tensors(cls, shape: tuple[int, int], tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                     ) -> QuantizedLayer:
        """Inverse of `to_tensors` + `meta`."""


@dataclass
class LayerStats:
    """What calibration gathered about one Linear's inputs over `n_tokens` tokens; a field is None unless the
    quantizer asked for it (`Quantizer.stats`). All fp32, on the model's device."""

    n_tokens: int
    xtx: torch.Tensor | None = None  # Σ x xᵀ [cols, cols]
    abs_sum: torch.Tensor | None = None  # Σ |x| per input channel [cols]
    abs_max: torch.Tensor | None = None  # max |x| per input channel [cols]

    def hessian(self) -> torch.Tensor:
        """The proxy Hessian E[x xᵀ] (mean not removed)."""
        if self.xtx is None:
            raise QuantsafeError("the quantizer did not ask for x xᵀ statistics")
        return self.xtx / max(self.n_tokens, 1)

    def abs_mean(self) -> torch.Tensor:
        """mean |x| per input channel (AWQ's activation scale)."""
        if self.abs_sum is None:
            raise QuantsafeError("the quantizer did not ask for mean |x| statistics")
        return self.abs_sum / max(self.n_tokens, 1)


class NoOptions(BaseModel):
    """Options model of a method that has none."""

    model_config = ConfigDict(extra="forbid")


class Quantizer(ABC):
    """Quantizes the Linears of a model, by default one decoder block at a time.

    The sequential pipeline calls `quantize_block` for each block; its default gathers the `stats` this method
    asks for per input-sharing group of Linears and calls `quantize` per Linear. Block-level methods (AWQ's scale
    search, AQLM's block fine-tuning) override `quantize_block`; whole-model methods (QAT) override
    `quantize_model`. `inputs_from` says whether the next block's inputs come from this block quantized (GPTQ)
    or in full precision (AWQ). `version` is part of every artifact id: raise it with any change that alters a
    method's output (a bug fix included), so artifacts made by the old code are never silently reused.
    """

    name: ClassVar[str]
    version: ClassVar[int]
    needs_calibration: ClassVar[bool] = False
    stats: ClassVar[frozenset[Stat]] = frozenset()
    Options: ClassVar[type[BaseModel]] = NoOptions
    config_defaults: ClassVar[dict[str, Any]] = {}  # QuantConfig fields this method sets unless a config does

    def __init__(self, config: QuantConfig) -> None:
        self.config = config

    @property
    def true_sequential(self) -> bool:
        return False

    @property
    def inputs_from(self) -> InputsFrom:
        return "quantized"

    def bits_for(self, name: str) -> int:
        """Bit width of the Linear `name` (relative to its block, e.g. "mlp.down_proj"): the first matching
        `layer_bits` pattern of the config, else `bits`."""
        for pattern, bits in self.config.layer_bits.items():
            if fnmatch.fnmatchcase(name, pattern):
                return bits
        return self.config.bits

    @abstractmethod
    def quantize(self, weight: torch.Tensor, stats: LayerStats | None, name: str) -> QuantizedLayer:
        """Quantize `weight` [rows, cols] (any float dtype, any device) of the Linear `name`; never modifies it."""

    def quantize_block(self, ctx: BlockContext) -> dict[str, QuantizedLayer]:
        """Quantize one decoder block in place; returns storage forms by name relative to the block."""
        return ctx.quantize_linears(self)

    def quantize_model(self, model: nn.Module, tokens: torch.Tensor | None, batch_size: int = 8,
                       progress: Progress | None = None) -> dict[str, QuantizedLayer]:
        """Quantize every Linear of the decoder blocks in place (weights become their dequantized values);
        storage forms by full module name."""
        from quantsafe.quantization.sequential import quantize_decoder_blocks

        return quantize_decoder_blocks(model, self, tokens, batch_size, progress)


_REGISTRY: dict[str, type[Quantizer]] = {}
_FORMATS: dict[str, type[QuantizedLayer]] = {}
Q = TypeVar("Q", bound=type[Quantizer])
L = TypeVar("L", bound=type[QuantizedLayer])


def register_quantizer(name: str) -> Callable[[Q], Q]:
    """Class decorator that makes a quantizer available under `name` in configs."""

    def wrap(cls: Q) -> Q:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"quantizer '{name}' is already registered")
        if not isinstance(getattr(cls, "version", None), int):
            raise ValueError(f"quantizer '{name}' must set the class attribute `version` (an int)")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def register_layer_format(name: str) -> Callable[[L], L]:
    """Class decorator that lets artifacts store and load a `QuantizedLayer` subclass under `name`."""

    def wrap(cls: L) -> L:
        if name in _FORMATS and _FORMATS[name] is not cls:
            raise ValueError(f"layer format '{name}' is already registered")
        cls.format = name
        _FORMATS[name] = cls
        return cls

    return wrap


def layer_format(name: str) -> type[QuantizedLayer]:
    """The storage class registered as `name`."""
    try:
        return _FORMATS[name]
    except KeyError:
        raise QuantsafeError(f"unknown layer format '{name}'; known: {', '.join(sorted(_FORMATS))}") from None


def known_methods() -> list[str]:
    """Names usable as `QuantConfig.method`."""
    return sorted(_REGISTRY)


def get_quantizer_class(name: str) -> type[Quantizer]:
    """The registered class for `name`, or a QuantsafeError that lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise QuantsafeError(
            f"unknown quantization method '{name}'; known methods: {', '.join(known_methods())}"
        ) from None


def make_quantizer(config: QuantConfig) -> Quantizer:
    """Instantiate the quantizer a config names."""
    return get_quantizer_class(config.method)(config)
