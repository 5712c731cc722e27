"""QLoRA (Dettmers et al. 2023; algorithms.md §7): a frozen k-bit NormalFloat base plus LoRA adapters on every
Linear of the decoder blocks, trained through `peft`.

The base is NF-k per block of `group_size` weights with absmax scales, double-quantized by default (NF4 + DQ is
QLoRA's own; NF3 and NF2, which QLoRA does not define and the paper does not name, are the same quantile
construction with 2^k levels, see `quantization.normalfloat`). As algorithms.md §7 prescribes for CPUs, the
base is dequantized once into the model's frozen weights and only the adapters train: numerically QLoRA's
forward and backward (y = W_base x + (α/r)·B A dropout(x), A Kaiming-uniform, B = 0), without its memory saving.

The result keeps the base and the adapters apart (`QLoRALayer`): the k-bit claim holds for the base only, the
bf16 adapters are extra bits, counted in `storage_bits` and shown apart in the layer's meta (`base_bits`,
`adapter_bits`; r = 64 adds 2.29 bits per weight on a 896×896 matrix, r = 16 adds 0.57).

Defaults follow the Guanaco-7B script (lr 2e-4, constant schedule with 3% warm-up, max-grad-norm 0.3, AdamW
β 0.9/0.999 without weight decay, dropout 0.1, α 16) except: r = 16 instead of 64 (QLoRA found r irrelevant once
every Linear has adapters; 16 quarters the adapter bits and the CPU cost), plain instead of paged AdamW (no GPU
paging on CPU), and the budget, 32 steps × 2 windows × 256 tokens instead of 1875 × 16 (minutes on two CPU
cores for the 0.5B model). Data: the calibration windows, loss on every token; the paper's QAT data (TULU-V2-Mix,
loss on responses) is not available offline (see `quantization.training`).

Sample YAML::

    method: qlora
    bits: 2
    group_size: 64          # NF block size; the default (QLoRA's)
    options: {r: 16, alpha: 16, dropout: 0.1, double_quant: true, steps: 32, batch_size: 2, window: 256,
              lr: 2.0e-4, schedule: constant, warmup_ratio: 0.03, max_grad_norm: 0.3}
    calibration: {source: wikitext2, n_samples: 32, seq_len: 512}   # training windows (or text_file)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from quantsafe.errors import QuantsafeError
from quantsafe.quantization.base import LayerStats, QuantizedLayer, Quantizer, register_layer_format, register_quantizer
from quantsafe.quantization.config import QuantConfig
from quantsafe.quantization.normalfloat import NFLayer, nf_quantize
from quantsafe.quantization.sequential import Progress, block_linears, decoder_layers
from quantsafe.quantization.training import Schedule, TrainOptions, TrainReport, train, training_windows

ADAPTER_BITS = 16  # LoRA A and B are stored in bf16
_LORA_TENSORS = ("lora_A", "lora_B")


class QLoRAOptions(TrainOptions):
    """QLoRA settings: Guanaco-7B's where they fit a CPU (see the module docstring)."""

    r: int = Field(16, ge=1)  # Guanaco: 64; adapters are 0.57 bpw on 896×896 at 16 (2.29 at 64)
    alpha: int = Field(16, ge=1)  # Guanaco
    dropout: float = Field(0.1, ge=0, lt=1)  # Guanaco-7B (0.05 for 33B/65B)
    double_quant: bool = True  # QLoRA
    steps: int = Field(32, ge=1)  # Guanaco: 1875; 32 keeps the 0.5B run to minutes on 2 cores
    batch_size: int = Field(2, ge=1)  # Guanaco: 16 (4 × 4 accumulation)
    grad_accum: int = Field(1, ge=1)
    window: int | None = Field(256, ge=8)
    lr: float = Field(2e-4, gt=0)  # Guanaco-7B
    schedule: Schedule = "constant"  # Guanaco
    warmup_ratio: float = Field(0.03, ge=0, lt=1)  # Guanaco
    max_grad_norm: float | None = Field(0.3, gt=0)  # Guanaco


@register_layer_format("qlora")
@dataclass
class QLoRALayer(QuantizedLayer):
    """A frozen NF-k base and its bf16 LoRA adapters: W = base + (alpha / r)·B·A, computed in fp32."""

    base: NFLayer
    lora_a: torch.Tensor  # bf16 [r, cols]
    lora_b: torch.Tensor  # bf16 [rows, r]
    alpha: float

    @property
    def shape(self) -> tuple[int, int]:
        return self.base.shape

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[0])

    def delta(self) -> torch.Tensor:
        """The adapters' dense contribution (alpha / r)·B·A, fp32."""
        return (self.alpha / self.rank) * (self.lora_b.float() @ self.lora_a.float())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.base.dequantize(torch.float32) + self.delta()).to(dtype)

    def adapter_bits(self) -> int:
        return (self.lora_a.numel() + self.lora_b.numel()) * ADAPTER_BITS

    def storage_bits(self) -> int:
        """Base and adapters together: everything the artifact stores for this Linear."""
        return self.base.storage_bits() + self.adapter_bits()

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return self.base.to_tensors() | {"lora_A": self.lora_a.cpu().contiguous(),
                                         "lora_B": self.lora_b.cpu().contiguous()}

    def meta(self) -> dict[str, Any]:
        return {"base": self.base.meta(), "r": self.rank, "alpha": self.alpha,
                "base_bits": self.base.storage_bits(), "adapter_bits": self.adapter_bits()}

    @classmethod
    def from_tensors(cls, shape: tuple[int, int], tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                     ) -> QLoRALayer:
        base_tensors = {k: v for k, v in tensors.items() if k not in _LORA_TENSORS}
        return cls(base=NFLayer.from_tensors(shape, base_tensors, meta["base"]), lora_a=tensors["lora_A"],
                   lora_b=tensors["lora_B"], alpha=float(meta["alpha"]))


@register_quantizer("qlora")
class QLoRAQuantizer(Quantizer):
    """NF-k base (frozen) + LoRA adapters on every decoder-block Linear, trained on the calibration windows."""

    version = 1
    needs_calibration = True
    Options = QLoRAOptions
    config_defaults: ClassVar[dict[str, Any]] = {"group_size": 64}  # QLoRA's NF block

    def __init__(self, config: QuantConfig) -> None:
        super().__init__(config)
        if config.group_size is None:
            raise QuantsafeError("method 'qlora' needs `group_size` (its NF block size; QLoRA uses 64)")
        self.options = QLoRAOptions.model_validate(config.options)
        self.report: TrainReport | None = None  # the last training run (losses per step, wall time)

    def base(self, weight: torch.Tensor, name: str) -> NFLayer:
        return nf_quantize(weight, self.bits_for(name), self.config.group_size or 0, self.options.double_quant)

    def quantize(self, weight: torch.Tensor, stats: LayerStats | None, name: str) -> NFLayer:
        """The frozen base alone (QLoRA before any training, i.e. blockwise NF-k round-to-nearest)."""
        return self.base(weight, name)

    def quantize_model(self, model: nn.Module, tokens: torch.Tensor | None, batch_size: int = 8,
                       progress: Progress | None = None) -> dict[str, QuantizedLayer]:
        """Quantize the base, train the adapters, store both. `batch_size` (the pipeline's forward batch) is
        unused: the training batch is an option, so it is part of the artifact id."""
        from peft import LoraConfig, get_peft_model

        if tokens is None:
            raise QuantsafeError("method 'qlora' trains on the calibration windows and got none")
        targets = {f"model.layers.{i}.{name}": (name, linear)
                   for i, block in enumerate(decoder_layers(model)) for name, linear in block_linears(block).items()}
        bases: dict[str, NFLayer] = {}
        with torch.no_grad():
            for full, (name, linear) in targets.items():
                bases[full] = self.base(linear.weight, name)
                linear.weight.copy_(bases[full].dequantize(linear.weight.dtype))
        model.requires_grad_(False)
        opts = self.options
        lora = LoraConfig(r=opts.r, lora_alpha=opts.alpha, lora_dropout=opts.dropout, target_modules=list(targets),
                          bias="none", init_lora_weights=True)
        peft_model = get_peft_model(model, lora)
        try:
            params = [p for p in peft_model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=opts.lr, betas=(0.9, 0.999), weight_decay=0.0)
            self.report = train(peft_model, params, optimizer, training_windows(tokens, opts.window), opts,
                                self.config.seed, progress)
            adapters = {full: self._adapters(peft_model.get_submodule(f"base_model.model.{full}"))
                        for full in targets}
        finally:
            peft_model.unload()  # the original Linears back in place, adapters dropped
        results: dict[str, QuantizedLayer] = {}
        with torch.no_grad():
            for full, (_, linear) in targets.items():  # `unload` put these very Linears back
                a, b = adapters[full]
                layer = QLoRALayer(base=bases.pop(full), lora_a=a, lora_b=b, alpha=float(opts.alpha))
                linear.weight.copy_(layer.dequantize(linear.weight.dtype))
                results[full] = layer
        return results

    @staticmethod
    def _adapters(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        lora_a: Any = module.lora_A
        lora_b: Any = module.lora_B
        return (lora_a["default"].weight.detach().to(torch.bfloat16, copy=True),
                lora_b["default"].weight.detach().to(torch.bfloat16, copy=True))
