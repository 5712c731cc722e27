"""WikiText-2 test perplexity, GPTQ protocol (algorithms.md §0): join, tokenize once, non-overlapping windows.

The window length L defaults to 512 on CPU (the papers use 2048); compare only numbers measured with equal L.
The model runs in its own dtype (bf16 here); the log-softmax is taken in fp32.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel

from quantsafe.quantization.calibration import wikitext2_text

DEFAULT_PPL_SEQ_LEN = 512


class PerplexityResult(BaseModel):
    """exp(mean NLL) over `n_tokens` predicted tokens in `n_windows` windows of `seq_len`."""

    ppl: float
    nll: float
    n_windows: int
    n_tokens: int
    seq_len: int
    dataset: str = "wikitext-2 test"


@torch.no_grad()
def perplexity(
    model: Any,
    token_ids: torch.Tensor,
    seq_len: int = DEFAULT_PPL_SEQ_LEN,
    max_windows: int | None = None,
    batch_size: int = 4,
) -> PerplexityResult:
    """Perplexity over the first `max_windows` (all if None) non-overlapping windows of a 1-D token stream."""
    n_windows = token_ids.numel() // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"need at least {seq_len} tokens, got {token_ids.numel()}")
    windows = token_ids[: n_windows * seq_len].reshape(n_windows, seq_len)
    total_nll = 0.0
    for start in range(0, n_windows, batch_size):
        batch = windows[start : start + batch_size].to(getattr(model, "device", "cpu"))  # any callable scores
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        total_nll += F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        ).item()
    n_tokens = n_windows * (seq_len - 1)
    nll = total_nll / n_tokens
    return PerplexityResult(ppl=math.exp(nll), nll=nll, n_windows=n_windows, n_tokens=n_tokens, seq_len=seq_len)


def wikitext2_test_tokens(tokenizer: Any, data_dir: Path | str | None = None) -> torch.Tensor:
    """The WikiText-2 test split joined by "\\n\\n" and tokenized once (no special tokens)."""
    ids = tokenizer(
        wikitext2_text("test", data_dir), add_special_tokens=False, return_attention_mask=False, verbose=False
    )["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def wikitext2_perplexity(
    model: Any,
    tokenizer: Any,
    data_dir: Path | str | None = None,
    seq_len: int = DEFAULT_PPL_SEQ_LEN,
    max_windows: int | None = None,
) -> PerplexityResult:
    """WikiText-2 test perplexity of `model` (never computed on calibration text: that is the valid split)."""
    return perplexity(model, wikitext2_test_tokens(tokenizer, data_dir), seq_len, max_windows)
