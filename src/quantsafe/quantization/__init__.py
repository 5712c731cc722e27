"""Weight quantization: configs as data, one module per method, sequential calibration, artifacts."""

from quantsafe.quantization import methods as _methods  # noqa: F401  (registers every method)
from quantsafe.quantization.artifact import (
    QuantizedArtifact,
    effective_bits_per_weight,
    load_quantized,
    quantize_variant,
)
from quantsafe.quantization.base import (
    LayerStats,
    QuantizedLayer,
    Quantizer,
    get_quantizer_class,
    known_methods,
    make_quantizer,
    register_layer_format,
    register_quantizer,
)
from quantsafe.quantization.calibration import CalibrationSet, build_calibration
from quantsafe.quantization.config import CalibrationConfig, QuantConfig
from quantsafe.quantization.perplexity import PerplexityResult, perplexity, wikitext2_perplexity
from quantsafe.quantization.sequential import BlockContext
from quantsafe.quantization.uniform import UniformLayer, layer_storage_bits

__all__ = [
    "BlockContext",
    "CalibrationConfig",
    "CalibrationSet",
    "LayerStats",
    "PerplexityResult",
    "QuantConfig",
    "QuantizedArtifact",
    "QuantizedLayer",
    "Quantizer",
    "UniformLayer",
    "build_calibration",
    "effective_bits_per_weight",
    "get_quantizer_class",
    "known_methods",
    "layer_storage_bits",
    "load_quantized",
    "make_quantizer",
    "perplexity",
    "quantize_variant",
    "register_layer_format",
    "register_quantizer",
    "wikitext2_perplexity",
]
