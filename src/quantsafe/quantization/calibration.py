"""Calibration token windows: random, seeded windows of `seq_len` tokens from one token stream.

Sources: WikiText-2 validation (the local tokenized release, the raw release, or the HF `wikitext-2-raw-v1`
dataset when `datasets` is installed), a user text file, or text the model generates itself. The sha256 of the
token ids goes into the artifact ID, so a different tokenizer or text gives a different artifact.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from quantsafe.datadir import resolve_data_dir
from quantsafe.errors import DataError, QuantsafeError
from quantsafe.quantization.config import CalibrationConfig

WIKITEXT_DIRS = (("wikitext-2", "tokens"), ("wikitext-2-raw", "raw"))
SELF_GENERATION_BATCH = 8


class CalibrationSet(BaseModel):
    """The calibration tokens [n_samples, seq_len] and what they are."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    tokens: torch.Tensor
    token_sha256: str
    source: str
    n_samples: int
    seq_len: int
    seed: int
    stream_tokens: int  # length of the stream the windows were cut from

    def record(self) -> dict[str, Any]:
        """What an artifact stores about its calibration (everything except the tokens)."""
        return self.model_dump(mode="json", exclude={"tokens"})


def token_sha256(tokens: torch.Tensor) -> str:
    """sha256 over the shape and the int32 little-endian token ids."""
    t = tokens.to(torch.int32).contiguous()
    h = hashlib.sha256(repr(tuple(t.shape)).encode())
    h.update(t.numpy().astype("<i4").tobytes())
    return h.hexdigest()


def wikitext2_text(split: str, data_dir: Path | str | None = None) -> str:
    """WikiText-2 `split` ("valid"/"test") joined GPTQ-style: its lines (newlines kept) joined by "\\n\\n"."""
    lines: list[str] | None = None
    try:
        root = resolve_data_dir(data_dir)
    except DataError:
        root = None
    if root is not None:
        for sub, ext in WIKITEXT_DIRS:
            f = root / sub / f"wiki.{split}.{ext}"
            if f.is_file():
                lines = f.read_text(encoding="utf-8").splitlines(keepends=True)
                break
    if lines is None:
        lines = _wikitext2_from_hub(split)
    return "\n\n".join(lines)


def _wikitext2_from_hub(split: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise QuantsafeError(
            "WikiText-2 not found: put wikitext-2/wiki.{valid,test}.tokens in the data directory, "
            "or install `datasets` to fetch wikitext-2-raw-v1"
        ) from None
    hf_split = {"valid": "validation", "test": "test"}[split]
    return list(datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=hf_split)["text"])


def _tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def random_windows(stream: torch.Tensor, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """`n_samples` windows of `seq_len` consecutive tokens at seeded uniform starts (GPTQ's sampler)."""
    if stream.numel() <= seq_len:
        raise QuantsafeError(f"calibration text has {stream.numel()} tokens, fewer than seq_len={seq_len}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len, (n_samples,), generator=gen)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def self_generated_tokens(model: Any, tokenizer: Any, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """Sample `n_samples` continuations of exactly `seq_len` tokens from the model itself (temperature 1).

    The prompt is neutral: the BOS token if the tokenizer has one, else a newline. EOS is suppressed until
    `seq_len` tokens exist, so every window is full length.
    """
    prompt = tokenizer.bos_token or "\n"
    prompt_ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]], device=model.device)
    torch.manual_seed(seed)
    out = []
    with torch.no_grad():
        for start in range(0, n_samples, SELF_GENERATION_BATCH):
            b = min(SELF_GENERATION_BATCH, n_samples - start)
            ids = prompt_ids.expand(b, -1)
            gen = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=seq_len,
                min_new_tokens=seq_len,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
            out.append(gen[:, ids.shape[1] :].cpu())
    return torch.cat(out)


def build_calibration(
    config: CalibrationConfig, tokenizer: Any, data_dir: Path | str | None = None, model: Any = None
) -> CalibrationSet:
    """Token windows for `config`; `model` is needed only for source="self_generated"."""
    if config.source == "self_generated":
        if model is None:
            raise QuantsafeError("calibration source 'self_generated' needs the model")
        tokens = self_generated_tokens(model, tokenizer, config.n_samples, config.seq_len, config.seed)
        stream_len = int(tokens.numel())
    else:
        if config.source == "wikitext2":
            text = wikitext2_text("valid", config.path or data_dir)
        else:
            assert config.path is not None  # enforced by CalibrationConfig
            if not config.path.is_file():
                raise DataError(config.path, "calibration text file does not exist")
            text = config.path.read_text(encoding="utf-8")
        stream = _tokenize(tokenizer, text)
        tokens = random_windows(stream, config.n_samples, config.seq_len, config.seed)
        stream_len = int(stream.numel())
    return CalibrationSet(
        tokens=tokens,
        token_sha256=token_sha256(tokens),
        source=config.source,
        n_samples=config.n_samples,
        seq_len=config.seq_len,
        seed=config.seed,
        stream_tokens=stream_len,
    )
