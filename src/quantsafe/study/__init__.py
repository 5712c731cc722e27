"""Studies: one YAML that quantizes, generates, judges and reports."""

from quantsafe.study.config import (
    BenchmarkSpec,
    JudgeSpec,
    StudyConfig,
    ValidationSpec,
    VariantSpec,
    load_study,
)

__all__ = ["BenchmarkSpec", "JudgeSpec", "StudyConfig", "ValidationSpec", "VariantSpec", "load_study"]
