"""The quantizer contract, the per-Linear result it returns, and the name → class registry.

A method is one module that defines a `Quantizer` subclass decorated with `@register_quantizer("name")`; the
sequential pipeline, artifact format and CLI need no change to gain it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, TypeVar

import torch
from pydantic import BaseModel, ConfigDict

from quantsafe.errors import QuantsafeError

if TYPE_CHECKING:
    from quantsafe.quantization.config import QuantConfig

SCALE_BITS = 16  # scales are stored as fp16
G_IDX_BITS = 32  # act-order group index, int32 per input column


def layer_storage_bits(rows: int, cols: int, bits: int, group_size: int | None, sym: bool, g_idx: bool) -> int:
    """Bits stored for one quantized matrix: codes + fp16 scales + b-bit zeros (asymmetric) + int32 g_idx.

    This is the accounting of algorithms.md §8; biases are not counted (they stay bf16, like in the papers).
    """
    groups = 1 if group_size is None else math.ceil(cols / group_size)
    total = rows * cols * bits + rows * groups * SCALE_BITS
    if not sym:
        total += rows * groups * bits
    if g_idx:
        total += cols * G_IDX_BITS
    return total


@dataclass
class QuantResult:
    """One quantized Linear weight [rows, cols] in storage form.

    Dequantized weight: W[r, c] = scales[r, g(c)] · (codes[r, c] − zeros[r, g(c)]), where g(c) is `g_idx[c]`
    when act-order permuted the grouping and c // group_size otherwise. Codes keep the original column order.
    """

    codes: torch.Tensor  # uint8 [rows, cols], values in [0, 2^bits − 1]
    scales: torch.Tensor  # fp16 [rows, groups]
    zeros: torch.Tensor | None  # uint8 [rows, groups]; None when symmetric (zero fixed at 2^(bits−1))
    bits: int
    group_size: int | None  # None = one group per row
    g_idx: torch.Tensor | None = None  # int32 [cols]; only when act-order reorders groups
    loss: float | None = None  # the method's own proxy loss (GPTQ: Σ (w − q)² / [H⁻¹]_ii² / 2)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    def group_index(self) -> torch.Tensor:
        """Group of every input column (int64 [cols])."""
        cols = self.shape[1]
        if self.g_idx is not None:
            return self.g_idx.long()
        if self.group_size is None:
            return torch.zeros(cols, dtype=torch.long)
        return torch.arange(cols) // self.group_size

    def zero_points(self) -> torch.Tensor:
        """Zero points as float [rows, groups], including the implied symmetric one."""
        if self.zeros is not None:
            return self.zeros.float()
        return torch.full(self.scales.shape, float(2 ** (self.bits - 1)))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the model will actually use."""
        idx = self.group_index()
        scale = self.scales.float()[:, idx]
        zero = self.zero_points()[:, idx]
        return (scale * (self.codes.float() - zero)).to(dtype)

    def storage_bits(self) -> int:
        """Bits this result takes on disk (see `layer_storage_bits`)."""
        rows, cols = self.shape
        return layer_storage_bits(rows, cols, self.bits, self.group_size, self.zeros is None, self.g_idx is not None)


@dataclass
class LayerStats:
    """What calibration gathered about one Linear's inputs: the running sum of x xᵀ over `n_tokens` tokens."""

    xtx: torch.Tensor  # fp32 [cols, cols]
    n_tokens: int


class NoOptions(BaseModel):
    """Options model of a method that has none."""

    model_config = ConfigDict(extra="forbid")


class Quantizer(ABC):
    """Quantizes one Linear weight at a time.

    `needs_calibration` methods receive the Linear's `LayerStats` from the sequential pipeline;
    `true_sequential` asks the pipeline to recompute those statistics after each group of Linears that share
    an input. `version` is part of every artifact id: raise it with any change that alters a method's output
    (a bug fix included), so artifacts made by the old code are never silently reused.
    """

    name: ClassVar[str]
    version: ClassVar[int]
    needs_calibration: ClassVar[bool] = False
    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, config: QuantConfig) -> None:
        self.config = config

    @property
    def true_sequential(self) -> bool:
        return False

    @abstractmethod
    def quantize(self, weight: torch.Tensor, stats: LayerStats | None = None) -> QuantResult:
        """Quantize `weight` [rows, cols] (any float dtype); never modifies it."""


_REGISTRY: dict[str, type[Quantizer]] = {}
Q = TypeVar("Q", bound=type[Quantizer])


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
