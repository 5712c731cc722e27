"""The training loop the QAT methods (STE, QLoRA) share: calibration windows as a causal-LM training set, a
seeded order, gradient accumulation, gradient clipping and a warm-up schedule.

Training data are the calibration windows (`QuantConfig.calibration`: WikiText-2 validation or a text file),
optionally cut into shorter windows; the loss is next-token cross-entropy over every token. The paper's QAT data
(TULU-V2-Mix, chat-formatted, loss on responses) is not available offline; a plain-text `text_file` of chat
transcripts is the closest substitute and trains on every token.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from quantsafe.errors import QuantsafeError
from quantsafe.quantization.sequential import Progress

Schedule = Literal["cosine", "constant"]


class TrainOptions(BaseModel):
    """Training-loop settings common to STE and QLoRA (each method sets its own defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(32, ge=1)  # optimizer steps
    batch_size: int = Field(2, ge=1)  # windows per micro-batch
    grad_accum: int = Field(1, ge=1)  # micro-batches per optimizer step
    window: int | None = Field(256, ge=8)  # calibration windows are cut into windows of this many tokens; None: as is
    lr: float = Field(1e-5, gt=0)
    schedule: Schedule = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    max_grad_norm: float | None = Field(None, gt=0)  # None: no clipping


def training_windows(tokens: torch.Tensor, window: int | None) -> torch.Tensor:
    """The calibration windows [n, seq] cut into non-overlapping windows of `window` tokens (a shorter tail of
    each is dropped), or unchanged when `window` is None."""
    if window is None:
        return tokens
    if window > tokens.shape[1]:
        raise QuantsafeError(f"training window {window} is longer than the calibration windows ({tokens.shape[1]})")
    per = tokens.shape[1] // window
    return tokens[:, : per * window].reshape(-1, window)


def lr_factor(step: int, steps: int, warmup_ratio: float, schedule: Schedule) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based): linear warm-up over
    ceil(ratio·steps) steps that reaches the peak on the last warm-up step (the first step never has lr 0),
    then constant or a half cosine towards 0."""
    warmup = math.ceil(warmup_ratio * steps)
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _batches(n: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Index batches over a seeded permutation of n windows, reshuffled each epoch."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


@dataclass
class TrainReport:
    """What a training run did: the mean loss of every optimizer step and the wall time."""

    losses: list[float]
    seconds: float
    windows: int  # size of the training set
    tokens_seen: int


def train(model: nn.Module, params: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer, windows: torch.Tensor,
          options: TrainOptions, seed: int, progress: Progress | None = None) -> TrainReport:
    """Minimise the causal-LM loss of `model` on `windows` by updating `params` (everything else must not
    require grad). The model is in train mode (LoRA dropout) during the loop and in eval mode after."""
    if windows.shape[0] < options.batch_size:
        raise QuantsafeError(
            f"{windows.shape[0]} training windows, fewer than batch_size={options.batch_size}: "
            "raise calibration.n_samples or lower the batch size"
        )
    device = params[0].device
    windows = windows.to(device)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    batches = _batches(windows.shape[0], options.batch_size, seed)
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    try:
        for step in range(options.steps):
            factor = lr_factor(step, options.steps, options.warmup_ratio, options.schedule)
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor
            total = 0.0
            for _ in range(options.grad_accum):
                ids = windows[next(batches)]
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss / options.grad_accum
                loss.backward()
                total += float(loss.detach())
            if options.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, options.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(total)
            if progress:
                progress(step + 1, options.steps, f"step {step + 1}: loss {total:.4f}")
    finally:
        model.eval()
    tokens = options.steps * options.grad_accum * options.batch_size * windows.shape[1]
    return TrainReport(losses=losses, seconds=time.perf_counter() - start, windows=int(windows.shape[0]),
                       tokens_seen=tokens)
