"""Quantization configs as data: pydantic models that load from YAML, validate early, hash into IDs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from quantsafe.errors import QuantsafeError

MIN_BITS = 2
MAX_BITS = 8


def _describe(err: Any) -> str:
    where = ".".join(str(p) for p in err["loc"]) or "config"
    return f"{where}: {err['msg'].removeprefix('Value error, ')}"


class CalibrationConfig(BaseModel):
    """Which text calibrates a method and how it is cut into token windows.

    Sample YAML::

        calibration: {source: wikitext2, n_samples: 128, seq_len: 512, seed: 0}
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Literal["wikitext2", "text_file", "self_generated"] = "wikitext2"
    path: Path | None = None  # the text file for source=text_file; a data dir override for wikitext2
    n_samples: int = Field(128, ge=1)
    seq_len: int = Field(512, ge=8)
    seed: int = 0

    @model_validator(mode="after")
    def _path_for_text_file(self) -> CalibrationConfig:
        if self.source == "text_file" and self.path is None:
            raise ValueError("calibration source 'text_file' needs a path")
        return self


class QuantConfig(BaseModel):
    """One quantization variant: method, bit width, grouping and the method's own options.

    Sample YAML::

        method: gptq
        bits: 4
        group_size: 64          # null = one scale per output row
        sym: false
        options: {damp_percent: 0.01, act_order: true, block_size: 128, true_sequential: true}
        calibration: {source: wikitext2, n_samples: 128, seq_len: 512}
        layer_bits: {mlp.down_proj: 8}   # optional: other widths for Linears matching a pattern

    `options` is validated (and filled with defaults) by the method's own options model, so two configs that
    mean the same thing hash to the same artifact ID. `layer_bits` patterns (fnmatch) match a Linear's name
    inside its decoder block; the first match wins.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str
    bits: int
    group_size: int | None = Field(128, ge=1)
    sym: bool = False
    options: dict[str, Any] = Field(default_factory=dict)
    calibration: CalibrationConfig | None = None
    seed: int = 0
    layer_bits: dict[str, int] = Field(default_factory=dict)

    @field_validator("bits")
    @classmethod
    def _bits_in_range(cls, bits: int) -> int:
        if not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f"bits must be between {MIN_BITS} and {MAX_BITS}, got {bits}")
        return bits

    @field_validator("layer_bits")
    @classmethod
    def _layer_bits_in_range(cls, layer_bits: dict[str, int]) -> dict[str, int]:
        for pattern, bits in layer_bits.items():
            if not MIN_BITS <= bits <= MAX_BITS:
                raise ValueError(f"layer_bits['{pattern}'] must be between {MIN_BITS} and {MAX_BITS}, got {bits}")
        return layer_bits

    def __repr_args__(self) -> Any:
        """Artifact ids hash this repr (nested in a dict): without per-layer widths it stays as before the
        field existed, so existing artifacts keep their ids."""
        return [(k, v) for k, v in super().__repr_args__() if k != "layer_bits" or v]

    @model_validator(mode="before")
    @classmethod
    def _method_defaults(cls, data: Any) -> Any:
        """Fields a method fixes unless the config says otherwise (QUIK's per-row symmetric grid, QLoRA's block
        of 64), so `method: quik` alone is a valid config."""
        from quantsafe.quantization.base import get_quantizer_class, known_methods

        if isinstance(data, dict) and data.get("method") in known_methods():
            return get_quantizer_class(data["method"]).config_defaults | data
        return data

    @model_validator(mode="after")
    def _known_method_and_options(self) -> QuantConfig:
        from quantsafe.quantization.base import get_quantizer_class

        cls = get_quantizer_class(self.method)
        try:
            options = cls.Options.model_validate(self.options)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"options of method '{self.method}': {problems}") from None
        # Store the normalised options (defaults filled) so equal meanings hash equally; frozen model.
        object.__setattr__(self, "options", options.model_dump(mode="json"))
        if cls.needs_calibration and self.calibration is None:
            object.__setattr__(self, "calibration", CalibrationConfig())
        if not cls.needs_calibration and self.calibration is not None:
            raise ValueError(f"method '{self.method}' uses no calibration data; remove 'calibration'")
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        """Build from a YAML/JSON mapping; any validation problem becomes one readable QuantsafeError."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(_describe(err) for err in exc.errors())
            raise QuantsafeError(f"invalid quantization config: {problems}") from exc

    @classmethod
    def from_yaml(cls, path: Path) -> QuantConfig:
        """Load a config from a YAML file."""
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise QuantsafeError(f"{path}: cannot read quantization config ({exc})") from exc
        if not isinstance(data, dict):
            raise QuantsafeError(f"{path}: a quantization config must be a mapping")
        return cls.from_dict(data)
