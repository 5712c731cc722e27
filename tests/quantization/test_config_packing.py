"""Configs, bit packing and the bits-per-weight accounting of algorithms.md §8."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from quantsafe.errors import QuantsafeError
from quantsafe.hashing import stable_hash
from quantsafe.quantization import QuantConfig, effective_bits_per_weight, known_methods, layer_storage_bits
from quantsafe.quantization.methods.rtn import rtn_quantize
from quantsafe.quantization.packing import pack_codes, packed_size, unpack_codes


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("shape", [(7, 13), (64, 96), (1, 1)])
def test_pack_unpack_round_trip(bits: int, shape: tuple[int, int]) -> None:
    codes = torch.randint(0, 2**bits, shape, generator=torch.Generator().manual_seed(bits)).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(codes.numel(), bits)
    assert torch.equal(unpack_codes(packed, bits, shape), codes)


def test_packing_is_exactly_b_bits() -> None:
    assert packed_size(896 * 896, 3) * 8 == 896 * 896 * 3
    assert packed_size(8, 3) == 3 and packed_size(4, 2) == 1 and packed_size(2, 4) == 1 and packed_size(3, 3) == 2


def test_packed_layout_is_a_little_endian_bit_stream() -> None:
    # codes 1, 2, 3 at 3 bits: bits 100 010 110 (LSB first) -> byte 0b11010001, then 0b0
    assert pack_codes(torch.tensor([1, 2, 3]), 3).tolist() == [0b11010001, 0]


def test_pack_rejects_out_of_range_codes() -> None:
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.tensor([4]), 2)


@pytest.mark.parametrize(
    ("rows", "cols", "bits", "group", "sym", "g_idx", "expected"),
    [
        (896, 896, 4, 128, False, False, 4.156),  # GPTQ/AWQ INT4 g128, fp16 scale + 4-bit zero
        (4864, 896, 4, 128, False, False, 4.156),
        (896, 896, 3, 128, False, False, 3.148),
        (896, 896, 2, 128, False, False, 2.141),
        (896, 896, 4, None, True, False, 4.018),  # per-row fp16 scale only
        (896, 896, 4, None, False, False, 4.022),  # GPTQ asymmetric per-row
        (896, 896, 4, 128, False, True, 4.156 + 0.036),  # + act-order g_idx
        (4864, 896, 4, 128, False, True, 4.156 + 0.007),
    ],
)
def test_bits_per_weight_matches_reference_table(
    rows: int, cols: int, bits: int, group: int | None, sym: bool, g_idx: bool, expected: float
) -> None:
    assert layer_storage_bits(rows, cols, bits, group, sym, g_idx) / (rows * cols) == pytest.approx(expected, abs=1e-3)


def test_effective_bpw_of_results() -> None:
    w = torch.randn(896, 896)
    results = {"a": rtn_quantize(w, 4, 128, False), "b": rtn_quantize(w, 4, 128, False)}
    assert effective_bits_per_weight(results) == pytest.approx(4.15625)


@pytest.mark.parametrize("bits", [1, 9])
def test_bad_bits_is_a_clear_error(bits: int) -> None:
    with pytest.raises(ValidationError, match="bits must be between 2 and 8"):
        QuantConfig(method="rtn", bits=bits)
    with pytest.raises(QuantsafeError, match="bits must be between 2 and 8"):
        QuantConfig.from_dict({"method": "rtn", "bits": bits})


def test_unknown_method_lists_known_ones() -> None:
    with pytest.raises(QuantsafeError, match=r"known methods: aqlm, awq, gptq, qlora, quik, quip_sharp, rtn, ste$"):
        QuantConfig(method="nope", bits=4)
    assert {"gptq", "rtn"} <= set(known_methods())


def test_options_are_validated_and_defaults_filled() -> None:
    cfg = QuantConfig.from_dict({"method": "gptq", "bits": 4, "options": {"damp_percent": 0.01}})
    assert cfg.options == {
        "damp_percent": 0.01,
        "act_order": True,
        "block_size": 128,
        "true_sequential": False,
        "static_groups": True,
    }
    assert cfg.calibration is not None and cfg.calibration.n_samples == 128
    # equal meaning, equal hash
    assert stable_hash(cfg) == stable_hash(QuantConfig(method="gptq", bits=4))
    with pytest.raises(QuantsafeError, match="options of method 'gptq': bogus"):
        QuantConfig.from_dict({"method": "gptq", "bits": 4, "options": {"bogus": 1}})
    with pytest.raises(QuantsafeError, match="no calibration"):
        QuantConfig.from_dict({"method": "rtn", "bits": 4, "calibration": {"source": "wikitext2"}})
    with pytest.raises(QuantsafeError, match="group: Extra inputs"):
        QuantConfig.from_dict({"method": "rtn", "bits": 4, "group": 3})


def test_config_loads_from_yaml(tmp_path: object) -> None:
    from pathlib import Path

    p = Path(str(tmp_path)) / "q.yaml"
    p.write_text("method: gptq\nbits: 3\ngroup_size: null\ncalibration: {n_samples: 16, seq_len: 64}\n")
    cfg = QuantConfig.from_yaml(p)
    assert cfg.group_size is None and cfg.calibration is not None and cfg.calibration.seq_len == 64
