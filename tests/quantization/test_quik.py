"""QUIK (weight-only): outlier input channels kept in fp16, GPTQ on the rest; and the GPTQ column loop it shares."""

from __future__ import annotations

import hashlib

import pytest
import torch

from quantsafe.quantization.methods.gptq import GPTQOptions, gptq_quantize


def _pin_problem() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(24, 160, generator=gen)
    x = (torch.randn(160, 160, generator=gen) * torch.linspace(0.05, 3, 160)) @ torch.randn(160, 512, generator=gen)
    x[3] = 0  # a dead input
    return w, x @ x.T


@pytest.mark.parametrize(
    ("bits", "group_size", "act_order", "static_groups", "sym", "block_size", "digest"),
    [
        (4, None, True, False, False, 128, "bc5de65cd18915db"),
        (3, 64, True, False, False, 50, "aec098110e791cb6"),
        (2, 64, True, True, True, 50, "71dddc6dbed60c2f"),
    ],
)
def test_gptq_codes_are_pinned(bits: int, group_size: int | None, act_order: bool, static_groups: bool, sym: bool,
                               block_size: int, digest: str) -> None:
    """GPTQ codes as produced before its column loop became `gptq_columns` (shared with QUIK): the refactor must
    not change a single code. Cases whose codes survive a 1e-6 relative perturbation of w and x, so the pin does
    not hinge on one ulp of a BLAS kernel."""
    w, h = _pin_problem()
    options = GPTQOptions(act_order=act_order, static_groups=static_groups, block_size=block_size)
    r = gptq_quantize(w, h, bits, group_size, sym, options)
    assert hashlib.sha256(r.codes.numpy().tobytes()).hexdigest()[:16] == digest
