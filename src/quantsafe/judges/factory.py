"""Build a judge from plain settings (what a study YAML holds); the only place that loads a judge model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch

from quantsafe.backends.base import Backend, DecodingConfig
from quantsafe.backends.openai_compat import OpenAIBackend
from quantsafe.backends.request_cache import RequestCache
from quantsafe.benchmarks.xstest import load_labelled_sets
from quantsafe.errors import QuantsafeError
from quantsafe.judges.base import Judge
from quantsafe.judges.fake import FakeJudge
from quantsafe.judges.heuristic import RefusalHeuristicJudge
from quantsafe.judges.llm import (
    DEFAULT_FEW_SHOT,
    DEFAULT_MAX_ITEM_CHARS,
    DEFAULT_REFUSAL_FEW_SHOT,
    FewShotExample,
    LLMJudge,
)
from quantsafe.judges.spec import JudgeSpec, TrainedJudgeConfig
from quantsafe.judges.template import load_template
from quantsafe.models.dtype import dtype_name


def load_judge_backend(model: str, dtype: torch.dtype = torch.bfloat16, device: str = "cpu") -> Backend:
    """Resolve and load a judge model; its name carries the weights' hash and the compute dtype, so the judge
    id tracks both (verdict log-probs differ between bf16 and fp32)."""
    from quantsafe.backends.hf import HFBackend
    from quantsafe.models import load_model, resolve_model

    resolved = resolve_model(model)
    hf_model, tokenizer = load_model(resolved, dtype, device=device)
    return HFBackend(hf_model, tokenizer, f"{resolved.name}@{resolved.source_sha256[:16]}/{dtype_name(dtype)}")


def build_judge(
    kind: Literal["llm", "heuristic", "fake"],
    *,
    model: str | None = None,
    mode: Literal["full", "fast"] = "fast",
    calibrate: bool = True,
    few_shot: bool | Sequence[FewShotExample] = True,
    max_retries: int = 2,
    decoding: DecodingConfig | None = None,
    data_dir: Path | str | None = None,
    criteria: Mapping[str, str] | None = None,
    backend: Backend | None = None,
    dtype: torch.dtype = torch.bfloat16,
    degeneration_check: bool = True,
    max_item_chars: int = DEFAULT_MAX_ITEM_CHARS,
    device: str = "cpu",
) -> Judge:
    """kind "llm": LLMJudge on `backend` (or the loaded `model`), with the official template when `data_dir`
    has it; `few_shot=True` means DEFAULT_FEW_SHOT (and DEFAULT_REFUSAL_FEW_SHOT for refusal calls).
    "heuristic" and "fake" ignore the LLM settings."""
    if kind == "heuristic":
        return RefusalHeuristicJudge()
    if kind == "fake":
        return FakeJudge()
    if kind != "llm":
        raise QuantsafeError(f"unknown judge kind {kind!r} (llm, heuristic, fake)")
    if backend is None:
        if model is None:
            from quantsafe.models import DEFAULT_MODEL

            model = DEFAULT_MODEL
        backend = load_judge_backend(model, dtype, device)
    examples: Sequence[FewShotExample] = (
        DEFAULT_FEW_SHOT if few_shot is True else () if few_shot is False else tuple(few_shot)
    )
    return LLMJudge(
        backend,
        load_template(data_dir),
        criteria,
        mode=mode,
        max_retries=max_retries,
        decoding=decoding,
        calibrate=calibrate,
        few_shot=examples,
        refusal_few_shot=DEFAULT_REFUSAL_FEW_SHOT if examples else (),
        degeneration_check=degeneration_check,
        max_item_chars=max_item_chars,
    )


def judge_from_spec(
    spec: JudgeSpec, *, data_dir: Path | None, criteria: Mapping[str, str] | None = None,
    dtype: torch.dtype = torch.bfloat16, requests: RequestCache | None = None, device: str = "cpu",
) -> Judge:
    """The judge a study or the CLI names; an HTTP judge stores its responses in `requests`, a trained one is
    trained on its labelled sets (or its stored artifact reused)."""
    if spec.kind == "trained":
        return build_trained_judge(spec.trained, data_dir, dtype, device)
    backend = OpenAIBackend(spec.endpoint, requests) if spec.endpoint is not None else None
    return build_judge(spec.kind, model=spec.model, mode=spec.mode, calibrate=spec.calibrate,
                       few_shot=spec.few_shot, max_retries=spec.max_retries, decoding=spec.decoding,
                       data_dir=data_dir, criteria=criteria, dtype=dtype, backend=backend,
                       degeneration_check=spec.degeneration_check, max_item_chars=spec.max_item_chars,
                       device=device)


def build_trained_judge(config: TrainedJudgeConfig, data_dir: Path | None, dtype: torch.dtype,
                        device: str = "cpu") -> Judge:
    """Training sets are files of the data directory's labelled completions or paths to CSVs in their layout,
    named by file stem (the names `trained_on` and validation compare)."""
    from quantsafe.judges.trained import feature_extractor, train_judge

    labelled = load_labelled_sets(config.train_sets, data_dir)
    config = config.model_copy(update={"train_sets": tuple(labelled)})
    extractor = feature_extractor(config, dtype, device=device) if device != "cpu" else None
    return train_judge(config, labelled, dtype, extractor)
