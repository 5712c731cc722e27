"""AQLM: storage round trips and bit counts, the greedy code pass, the Adam step, k-means init, a tiny-model run."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch

from quantsafe.errors import QuantsafeError
from quantsafe.quantization import QuantConfig, make_quantizer
from quantsafe.quantization.methods import aqlm
from quantsafe.quantization.methods.aqlm import (
    AQLMLayer,
    AQLMOptions,
    adam_codebooks_and_scales,
    aqlm_quantize,
    aqlm_storage_bits,
    greedy_code_pass,
    layer_loss,
    residual_kmeans_init,
)
from quantsafe.quantization.methods.rtn import rtn_quantize
from quantsafe.quantization.sequential import quantize_decoder_blocks

FAST = {"steps_per_epoch": 3, "max_epochs": 2, "init_max_iter": 5}


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """These layers are tiny: with two OpenMP threads that spin (torch imported before the package conftest
    could set OMP_WAIT_POLICY=PASSIVE) on a busy 2-core machine the file ran 14x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _problem(rows: int = 24, cols: int = 64, dtype: torch.dtype = torch.float32, seed: int = 0,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and the second moment H of inputs with correlated, unevenly scaled channels."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen, dtype=dtype)
    mix = torch.randn(cols, cols, generator=gen, dtype=dtype) * torch.linspace(0.1, 2, cols, dtype=dtype)
    x = mix @ torch.randn(cols, 4 * cols, generator=gen, dtype=dtype)
    return w, x @ x.T / x.shape[1]


def _random_state(rows: int, cols: int, m: int, nbits: int, dtype: torch.dtype, seed: int = 1,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(2**nbits, (rows, cols // 8, m), generator=gen)
    books = torch.randn(m, 2**nbits, 8, generator=gen, dtype=dtype) / 2
    scales = torch.rand(rows, generator=gen, dtype=dtype) + 0.5
    return codes, books, scales


def _loss(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, books: torch.Tensor, scales: torch.Tensor,
          ) -> float:
    return layer_loss(w, aqlm._reconstruct(codes, books, scales), h)


@pytest.mark.parametrize(("m", "nbits", "bits"), [(2, 8, 2), (1, 16, 2), (3, 8, 3), (4, 8, 4)])
def test_quantized_layer_round_trips_bit_exactly(m: int, nbits: int, bits: int,
                                                  round_trip: Callable[[Any], Any]) -> None:
    w, h = _problem(rows=12, cols=32)
    options = AQLMOptions(num_codebooks=m, nbits_per_codebook=nbits, **FAST)
    layer = aqlm_quantize(w, h, options, torch.Generator().manual_seed(0))
    assert layer.codes.shape == (12, 4, m)
    assert layer.codes.dtype == (torch.uint8 if nbits <= 8 else torch.int32)
    assert layer.codebooks.dtype == layer.scales.dtype == torch.float16
    assert int(layer.codes.max()) < 2**nbits
    again = round_trip(layer)
    assert torch.equal(again.codes.long(), layer.codes.long())
    # stored code bits are exactly B per code (1×16: low byte + 8 high bits)
    packed = sum(t.numel() for k, t in layer.to_tensors().items() if k.startswith("codes"))
    assert packed * 8 == 12 * 4 * m * nbits
    assert layer.storage_bits() == 12 * 4 * m * nbits + m * 2**nbits * 8 * 16 + 12 * 16
    assert layer.loss == pytest.approx(layer_loss(w, layer.dequantize(), h), rel=1e-5)
    assert bits * 8 == m * nbits


def test_wide_codes_survive_packing(round_trip: Callable[[Any], Any]) -> None:
    """Codes that use all 16 bits (the high byte included) come back unchanged."""
    codes = torch.tensor([[[0], [65535]], [[256], [40000]]], dtype=torch.int32)
    books = torch.randn(1, 2**16, 8).half()
    layer = AQLMLayer(codes=codes, codebooks=books, scales=torch.ones(2).half(), nbits=16)
    assert torch.equal(round_trip(layer).codes, codes)


def test_bits_per_weight_match_algorithms_md() -> None:
    a, b = (896, 896), (4864, 896)

    def bpw(shape: tuple[int, int], m: int, nbits: int) -> float:
        return aqlm_storage_bits(*shape, m, nbits, 8) / (shape[0] * shape[1])

    # §8 rounds to 3 decimals (2.0995 → 2.100)
    assert bpw(a, 2, 8) == pytest.approx(2.100, abs=6e-4)
    assert bpw(a, 1, 16) == pytest.approx(12.467, abs=6e-4)
    assert bpw(b, 2, 8) == pytest.approx(2.033, abs=6e-4)
    assert bpw(b, 1, 16) == pytest.approx(3.943, abs=6e-4)
    assert bpw(a, 3, 8) == pytest.approx(3.140, abs=6e-4)
    assert bpw(a, 4, 8) == pytest.approx(4.181, abs=6e-4)
    assert aqlm_storage_bits(896, 896, 1, 16, 8) == 10_008_576  # the worked example of §8


@pytest.mark.parametrize(("m", "nbits"), [(2, 8), (1, 16), (3, 4)])
def test_greedy_pass_never_increases_the_layer_loss(m: int, nbits: int) -> None:
    w, h = _problem(dtype=torch.float64)
    codes, books, scales = _random_state(24, 64, m, nbits, torch.float64)
    gen = torch.Generator().manual_seed(0)
    losses = [_loss(w, h, codes, books, scales)]
    for _ in range(3):
        codes = greedy_code_pass(w, h, codes, books, scales, gen)
        losses.append(_loss(w, h, codes, books, scales))
    assert all(after <= before * (1 + 1e-12) for before, after in itertools.pairwise(losses))
    assert losses[1] < 0.5 * losses[0]  # from random codes a pass is a large improvement


def test_greedy_pass_is_exact_coordinate_descent() -> None:
    """Lazy batching and candidate chunking change the arithmetic, not the result: the same codes as one group
    at a time with all candidates at once. And after a pass with M = 1, no single code change lowers the loss
    of the last group visited."""
    w, h = _problem(dtype=torch.float64)
    codes, books, scales = _random_state(24, 64, 1, 6, torch.float64)
    plain = greedy_code_pass(w, h, codes, books, scales, torch.Generator().manual_seed(3), lazy_groups=1)
    lazy = greedy_code_pass(w, h, codes, books, scales, torch.Generator().manual_seed(3), lazy_groups=5)
    assert torch.equal(plain, lazy)
    small = aqlm._SCORE_ELEMENTS
    try:
        aqlm._SCORE_ELEMENTS = 24 * 7  # chunks of 7 candidates
        chunked = greedy_code_pass(w, h, codes, books, scales, torch.Generator().manual_seed(3))
    finally:
        aqlm._SCORE_ELEMENTS = small
    assert torch.equal(plain, chunked)
    last = torch.randperm(8, generator=torch.Generator().manual_seed(3))[-1].item()
    base = _loss(w, h, plain, books, scales) * 24
    for row in (0, 5):
        for cand in range(0, 64, 9):
            trial = plain.clone()
            trial[row, last, 0] = cand
            assert _loss(w, h, trial, books, scales) * 24 >= base - 1e-9


def test_adam_gradient_matches_autograd_and_steps_lower_the_loss() -> None:
    w, h = _problem()
    codes, books, scales = _random_state(24, 64, 2, 4, torch.float32)
    books.requires_grad_(True)
    scales.requires_grad_(True)
    # lr 0: one call leaves the written-out gradient in .grad without moving anything
    adam_codebooks_and_scales(w, h, codes, torch.optim.SGD([books, scales], lr=0.0), books, scales, 1)
    ours = (books.grad.clone(), scales.grad.clone())
    books.grad = scales.grad = None
    delta = aqlm._reconstruct(codes, books, scales) - w
    ((delta @ h) * delta).sum().div(24).backward()
    assert torch.allclose(ours[0], books.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(ours[1], scales.grad, rtol=1e-4, atol=1e-6)

    optimizer = torch.optim.Adam([books, scales], lr=1e-2, betas=(0.0, 0.95), amsgrad=True)
    first = adam_codebooks_and_scales(w, h, codes, optimizer, books, scales, 20)
    after = _loss(w, h, codes, books.detach(), scales.detach())
    assert after < 0.8 * first
    # the early-stop threshold: above it, no step is taken
    before = books.detach().clone()
    adam_codebooks_and_scales(w, h, codes, optimizer, books, scales, 5, stop_above=0.0)
    assert torch.equal(books.detach(), before)


def test_kmeans_init_beats_random_centres_and_random_codes() -> None:
    w, _ = _problem(rows=64, cols=128)

    def weight_error(iters: int) -> tuple[float, torch.Tensor, torch.Tensor]:
        codes, books, scales = residual_kmeans_init(w, 2, 5, 8, iters, None, torch.Generator().manual_seed(0))
        return float((aqlm._reconstruct(codes, books, scales) - w).square().sum()), books, scales

    fitted, books, scales = weight_error(20)
    random_centres, _, _ = weight_error(0)  # centres = random points, then nearest assignment
    assert fitted < 0.9 * random_centres
    random_codes = torch.randint(32, (64, 16, 2), generator=torch.Generator().manual_seed(1))
    assert fitted < 0.5 * float((aqlm._reconstruct(random_codes, books, scales) - w).square().sum())
    # subsampled fitting (max points per centroid) still assigns every point
    codes, _, _ = residual_kmeans_init(w, 2, 5, 8, 5, 4, torch.Generator().manual_seed(0))
    assert codes.shape == (64, 16, 2)


def test_aqlm_beats_rtn_at_the_same_code_bits() -> None:
    """Same code bits per weight as RTN 2-bit with groups of 8 (which adds a scale and zero per 8 weights), on
    i.i.d. Gaussian weights (no structure for the codebooks to exploit) with 8 groups per codebook entry."""
    w, h = _problem(rows=128, cols=128)
    layer = aqlm_quantize(w, h, AQLMOptions(steps_per_epoch=5, max_epochs=4, init_max_iter=10),
                          torch.Generator().manual_seed(0))
    rtn = layer_loss(w, rtn_quantize(w, 2, 8, False).dequantize(), h)
    assert layer.loss is not None and layer.loss < 0.8 * rtn


def _logits(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float()


def test_tiny_model_run(tiny_model: Callable[..., Any]) -> None:
    """2×8 on a tiny Qwen2 (biases on q/k/v): every Linear stored as AQLM and replaced by its dequantized
    weight, each layer's loss below RTN 2-bit g8's (a larger budget: it adds fp16 scales and zeros), and the
    logits close to full precision. Tolerance: cosine > 0.97 per position; a 64-wide layer with 256-entry
    codebooks has only 512 groups per codebook, so it fits far better than 2 bits would on a real model."""
    fp = tiny_model("qwen2")
    model = tiny_model("qwen2")
    tokens = torch.randint(128, (8, 32), generator=torch.Generator().manual_seed(0))
    options = {"steps_per_epoch": 5, "max_epochs": 3, "init_max_iter": 10}
    quantizer = make_quantizer(QuantConfig(method="aqlm", bits=2, options=options))
    results = quantize_decoder_blocks(model, quantizer, tokens, batch_size=4)
    assert len(results) == 2 * 7 and all(isinstance(r, AQLMLayer) for r in results.values())
    modules = dict(model.named_modules())
    fp_modules = dict(fp.named_modules())
    for name, layer in results.items():
        assert torch.equal(modules[name].weight, layer.dequantize(modules[name].weight.dtype))
        weight = fp_modules[name].weight.detach()
        assert layer.loss is not None and layer.loss > 0
        assert layer.storage_bits() == aqlm_storage_bits(*layer.shape, 2, 8, 8)
        assert (layer.dequantize() - weight).norm() < 0.5 * weight.norm()
    cos = torch.nn.functional.cosine_similarity(_logits(fp, tokens), _logits(model, tokens), dim=-1)
    assert cos.min() > 0.97


def test_layer_losses_beat_rtn_g8_on_tiny_model(tiny_model: Callable[..., Any]) -> None:
    model = tiny_model()
    tokens = torch.randint(128, (4, 32), generator=torch.Generator().manual_seed(0))
    block = model.model.layers[0]
    from quantsafe.quantization.sequential import BlockContext, capture_block_inputs

    ctx = BlockContext(block, 0, capture_block_inputs(model, tokens, 4))
    names = list(ctx.linears)
    stats = ctx.collect_stats(names, frozenset({"xtx"}))
    quantizer = make_quantizer(QuantConfig(method="aqlm", bits=2, options=FAST))
    for name in names:
        weight = ctx.linears[name].weight.detach()
        layer = quantizer.quantize(weight, stats[name], name)
        rtn = layer_loss(weight.float(), rtn_quantize(weight, 2, 8, False).dequantize(), stats[name].hessian())
        assert layer.loss is not None and layer.loss < rtn, name


def test_finetune_lowers_block_output_error(tiny_model: Callable[..., Any]) -> None:
    from quantsafe.quantization.sequential import BlockContext, capture_block_inputs

    errors = []
    for finetune in (False, True):
        model = tiny_model()
        ctx = BlockContext(model.model.layers[0], 0,
                           capture_block_inputs(model, torch.randint(128, (4, 32),
                                                                     generator=torch.Generator().manual_seed(0)), 4))
        targets = ctx.forward()
        options = FAST | {"finetune": finetune, "finetune_lr": 1e-3, "finetune_epochs": 10}
        results = make_quantizer(QuantConfig(method="aqlm", bits=2, options=options)).quantize_block(ctx)
        for name, layer in results.items():  # the fine-tuned codebooks and scales are what the Linears hold
            assert torch.equal(ctx.linears[name].weight, layer.dequantize(ctx.linears[name].weight.dtype))
        errors.append(sum(float((out - t).square().sum()) for out, t in zip(ctx.forward(), targets, strict=True)))
    assert errors[1] < 0.9 * errors[0]


def test_bits_must_match_the_codebooks() -> None:
    with pytest.raises(QuantsafeError, match=r"bits = 3 does not match .* 2×8/8 = 2"):
        make_quantizer(QuantConfig(method="aqlm", bits=3))
    with pytest.raises(QuantsafeError, match=r"layer_bits\['mlp.down_proj'\] = 4"):
        make_quantizer(QuantConfig(method="aqlm", bits=2, layer_bits={"mlp.down_proj": 4}))
    make_quantizer(QuantConfig(method="aqlm", bits=2, options={"num_codebooks": 1, "nbits_per_codebook": 16}))
    make_quantizer(QuantConfig(method="aqlm", bits=3, options={"num_codebooks": 3}))
    with pytest.raises(QuantsafeError, match="beam_size 1"):
        QuantConfig.from_dict({"method": "aqlm", "bits": 2, "options": {"beam_size": 4}})


def test_inputs_not_a_multiple_of_the_group_are_refused() -> None:
    w, h = _problem(rows=4, cols=20)
    with pytest.raises(QuantsafeError, match="multiple of in_group_size 8"):
        aqlm_quantize(w, h, AQLMOptions(**FAST), torch.Generator())
