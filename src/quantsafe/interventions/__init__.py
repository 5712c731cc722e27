"""Interventions on a model's weights other than quantization: abliteration, the study's negative control."""

from quantsafe.interventions.abliteration import (
    AbliteratedArtifact,
    AbliterationConfig,
    abliterate_variant,
    load_abliterated,
    orthogonalize,
    read_abliteration_manifest,
    refusal_direction,
)
from quantsafe.interventions.instructions import normalize_text, select_instructions

__all__ = [
    "AbliteratedArtifact",
    "AbliterationConfig",
    "abliterate_variant",
    "load_abliterated",
    "normalize_text",
    "orthogonalize",
    "read_abliteration_manifest",
    "refusal_direction",
    "select_instructions",
]
