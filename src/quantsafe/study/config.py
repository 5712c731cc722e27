"""A study as data: models × variants × benchmarks × judges × decoding, loaded from YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from quantsafe.backends.base import DecodingConfig
from quantsafe.backends.openai_compat import EndpointConfig
from quantsafe.benchmarks.registry import benchmarks
from quantsafe.errors import QuantsafeError, validation_message
from quantsafe.interventions.abliteration import AbliterationConfig
from quantsafe.judges.spec import JudgeSpec
from quantsafe.models.imported import ImportSpec
from quantsafe.models.registry import DEFAULT_MODEL
from quantsafe.quantization import QuantConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VariantSpec(_Strict):
    """One precision of each model: `method: none` is the full-precision reference, another method quantizes it,
    `import: {source: ...}` is an existing quantized checkpoint of one study model (models/imported.py), and
    `abliterate: {...}` is the negative control: the model with its refusal direction removed
    (interventions/abliteration.py)."""

    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True,
                              serialize_by_alias=True)

    method: str = "none"
    bits: int | None = Field(None, ge=2, le=8)
    group_size: int | None = 128
    sym: bool = False
    options: dict[str, Any] = {}
    calibration: dict[str, Any] | None = None
    layer_bits: dict[str, int] = {}
    import_: ImportSpec | None = Field(None, alias="import")
    abliterate: AbliterationConfig | None = None
    models: list[str] | None = None  # only for these study models (the paper ran QAT and abliteration on Llama only)

    @model_validator(mode="after")
    def _import_alone(self) -> VariantSpec:
        defaults = {name: f.get_default(call_default_factory=True) for name, f in type(self).model_fields.items()}
        quantizer_fields = [name for name, default in defaults.items()
                            if name not in ("import_", "abliterate", "models") and getattr(self, name) != default]
        if self.import_ is not None and self.abliterate is not None:
            raise ValueError("a variant is an import or an abliteration, not both")
        for block, what in ((self.import_, "an import"), (self.abliterate, "an abliteration")):
            if block is not None and quantizer_fields:
                raise ValueError(f"{what} takes no quantizer fields ({', '.join(quantizer_fields)}); it is "
                                 "described by its own block")
        return self

    @property
    def is_full_precision(self) -> bool:
        return self.method == "none" and self.import_ is None and self.abliterate is None

    def quant_config(self) -> QuantConfig:
        """The quantizer config this variant means. Only the fields the YAML set are passed on, so a method's own
        defaults apply (`method: quik` is per-row symmetric) and an explicit `group_size: null` stays per-row."""
        return QuantConfig.from_dict(self.model_dump(exclude_unset=True, exclude={"import_", "abliterate", "models"}))

    def label(self) -> str:
        if self.import_ is not None:
            return f"import {self.import_.source}"
        if self.abliterate is not None:
            return f"abliterated (layer {self.abliterate.layer})"
        if self.is_full_precision:
            return "bf16"
        cfg = self.quant_config()
        g = f"-g{cfg.group_size}" if cfg.group_size else ""
        return f"{cfg.method}-w{cfg.bits}{g}"


class ServedSpec(_Strict):
    """A model under test behind an OpenAI-compatible server (vLLM, llama.cpp, TGI), evaluated like any variant.
    Precision and method are declared (the server does not say); `model` names the study model it is a variant
    of, so it is paired against that model's full-precision answers."""

    endpoint: EndpointConfig
    model: str | None = None  # default: the served model name
    precision: str = "served"  # e.g. int4
    method: str = "served"  # e.g. gguf-q4_k_m, awq
    bits_per_weight: float | None = Field(None, gt=0)

    @property
    def label(self) -> str:
        return self.model or self.endpoint.model


class BenchmarkSpec(_Strict):
    """One benchmark of the study (any registered name: `quantsafe.benchmarks.benchmarks()`)."""

    name: str
    langs: list[str] = ["en"]
    limit: int | None = Field(None, ge=1)
    limit_per_scenario: int | None = Field(None, ge=1)
    seed: int = 0  # sampling, and what a loader chooses (HotPotQA's distractors, option permutations)
    permutations: int = Field(0, ge=0, le=3)  # multiple choice: shuffled-option copies to measure position bias

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        known = benchmarks()
        if name not in known:
            raise ValueError(f"unknown benchmark '{name}'; known: {', '.join(sorted(known))}")
        return name


class ValidationSpec(_Strict):
    """Which human-labelled XSTest completion files measure each judge, and how many items of each."""

    sets: list[str] = Field(["gpt4", "llama2orig", "mistralinstruct_even_ids"], min_length=1)
    limit_per_set: int | None = Field(None, ge=1)
    seed: int = 0


class StudyConfig(_Strict):
    """A study; empty lists are errors, since they would silently produce an empty report."""

    name: str = Field(min_length=1)
    models: list[str] = [DEFAULT_MODEL]
    served: list[ServedSpec] = []  # models under test over HTTP, beside the local models x variants
    variants: list[VariantSpec] = Field([VariantSpec()], min_length=1)
    benchmarks: list[BenchmarkSpec] = Field(min_length=1)
    judges: list[JudgeSpec] = Field(min_length=1)
    decoding: DecodingConfig = DecodingConfig()
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = "auto"  # auto: bf16 only where the machine has it
    device: str = "auto"  # auto: CUDA where the cells run has it, else the CPU; or cpu, cuda, cuda:N
    validation: ValidationSpec | None = ValidationSpec()
    data_dir: Path | None = None
    artifacts_dir: Path | None = None
    paper_results: Path | None = None  # the paper's results CSV for side-by-side tables ($QUANTSAFE_PAPER_RESULTS)

    @model_validator(mode="after")
    def _something_to_evaluate(self) -> StudyConfig:
        if not self.models and not self.served:
            raise ValueError("a study needs at least one entry in models or served")
        return self

    @model_validator(mode="after")
    def _imports_name_their_model(self) -> StudyConfig:
        """An imported checkpoint is a variant of one base model: its answers pair with that model's
        full-precision ones, so the model must be in the study (and named when there are several)."""
        for i, v in enumerate(self.variants):
            if v.import_ is None:
                continue
            if v.import_.model is None and len(self.models) != 1:
                raise ValueError(f"variants.{i}.import.model: name the study model this checkpoint is a variant of "
                                 f"(one of models: {self.models})")
            if v.import_.model is not None and v.import_.model not in self.models:
                raise ValueError(f"variants.{i}.import.model: '{v.import_.model}' is not in the study's models "
                                 f"{self.models}")
        return self

    @model_validator(mode="after")
    def _variant_models_exist(self) -> StudyConfig:
        for i, v in enumerate(self.variants):
            unknown = [m for m in v.models or () if m not in self.models]
            if unknown:
                raise ValueError(f"variants.{i}.models: {unknown} not in the study's models {self.models}")
        return self

    def applies(self, spec: VariantSpec, model: str) -> bool:
        """Whether variant `spec` is made of study model `model` (an import belongs to one model; `models` limits
        any variant to some)."""
        if spec.import_ is not None:
            return self.import_base(spec) == model
        return spec.models is None or model in spec.models

    def import_base(self, spec: VariantSpec) -> str | None:
        """The `models` entry an import variant belongs to (None for other variants, which apply to every model)."""
        if spec.import_ is None:
            return None
        return spec.import_.model or self.models[0]


def load_study(path: Path) -> StudyConfig:
    """Parse and validate a study YAML; every problem becomes one line naming the file and field."""
    if not path.is_file():
        raise QuantsafeError(f"{path}: study file does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise QuantsafeError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise QuantsafeError(f"{path}:{where} invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise QuantsafeError(f"{path}: a study must be a YAML mapping")
    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as exc:
        raise QuantsafeError(validation_message(exc, str(path))) from None
