"""The generalised quantizer contract: storage formats, input statistics, block-level hooks, per-layer widths."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from quantsafe.quantization import QuantConfig, make_quantizer
from quantsafe.quantization.artifact import LayerRecord, compute_artifact_id
from quantsafe.quantization.base import LayerStats, QuantizedLayer, Quantizer
from quantsafe.quantization.methods.gptq import GPTQOptions, gptq_quantize
from quantsafe.quantization.methods.rtn import rtn_quantize
from quantsafe.quantization.sequential import BlockContext, capture_block_inputs, quantize_decoder_blocks


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_uniform_layers_round_trip_bit_exactly(round_trip: Callable[[Any], Any], bits: int, sym: bool) -> None:
    w = torch.randn(48, 200, generator=torch.Generator().manual_seed(bits))
    round_trip(rtn_quantize(w, bits, 64, sym))
    x = torch.randn(200, 400, generator=torch.Generator().manual_seed(1))
    grouped = gptq_quantize(w, x @ x.T, bits, 64, sym, GPTQOptions(static_groups=False))
    assert grouped.g_idx is not None
    round_trip(grouped)


def test_schema_1_layer_records_read_as_uniform() -> None:
    rec = LayerRecord.model_validate({"shape": [8, 64], "bits": 3, "group_size": 32, "sym": False, "g_idx": True,
                                      "storage_bits": 1234, "loss": 0.5})
    assert rec.format == "uniform" and rec.tensors == ["qweight", "scales", "qzeros", "g_idx"]
    assert rec.meta == {"bits": 3, "group_size": 32, "sym": False, "g_idx": True}


def test_layer_bits_pick_widths_by_pattern_and_change_the_id() -> None:
    plain = QuantConfig(method="rtn", bits=4, group_size=64)
    mixed = QuantConfig(method="rtn", bits=4, group_size=64, layer_bits={"mlp.down_proj": 8, "self_attn.*": 3})
    q = make_quantizer(mixed)
    assert (q.bits_for("mlp.down_proj"), q.bits_for("self_attn.k_proj"), q.bits_for("mlp.up_proj")) == (8, 3, 4)
    assert compute_artifact_id("0" * 64, plain, None) != compute_artifact_id("0" * 64, mixed, None)
    with pytest.raises(ValueError, match=r"layer_bits\['x'\] must be between 2 and 8"):
        QuantConfig(method="rtn", bits=4, layer_bits={"x": 16})


def test_mixed_widths_reach_the_layers(tiny_model: Callable[..., Any]) -> None:
    cfg = QuantConfig(method="rtn", bits=2, group_size=32, layer_bits={"mlp.down_proj": 8})
    results = quantize_decoder_blocks(tiny_model(), make_quantizer(cfg))
    widths = {name.split(".", 3)[-1]: r.meta()["bits"] for name, r in results.items()}
    assert widths["mlp.down_proj"] == 8 and widths["mlp.up_proj"] == 2


class _Probe(Quantizer):
    """RTN at 2 bits that records the statistics it was given, with a chosen input source."""

    name = "probe"
    version = 1
    needs_calibration = True
    stats = frozenset({"xtx", "abs_mean", "abs_max"})

    def __init__(self, inputs_from: str) -> None:
        super().__init__(QuantConfig(method="rtn", bits=2, group_size=None))
        self._inputs_from = inputs_from
        self.seen: dict[str, LayerStats] = {}
        self.blocks = 0

    @property
    def inputs_from(self) -> Any:
        return self._inputs_from

    def quantize(self, weight: torch.Tensor, stats: LayerStats | None, name: str) -> QuantizedLayer:
        assert stats is not None
        self.seen[f"{self.blocks}.{name}"] = stats
        return rtn_quantize(weight, 2, None, False)

    def quantize_block(self, ctx: BlockContext) -> dict[str, QuantizedLayer]:
        out = super().quantize_block(ctx)
        self.blocks += 1
        return out


def _block_inputs(model: Any, tokens: torch.Tensor, index: int) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(tokens, output_hidden_states=True).hidden_states[index]
        return model.model.layers[index].input_layernorm(hidden).reshape(-1, hidden.shape[-1]).float()


@pytest.mark.parametrize("inputs_from", ["fp", "quantized"])
def test_next_block_inputs_come_from_the_chosen_model(tiny_model: Callable[..., Any], inputs_from: str) -> None:
    model = tiny_model()
    tokens = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    fp_x = _block_inputs(model, tokens, 1)
    probe = _Probe(inputs_from)
    quantize_decoder_blocks(model, probe, tokens, batch_size=2)
    stats = probe.seen["1.self_attn.q_proj"]
    assert stats.xtx is not None
    if inputs_from == "fp":
        torch.testing.assert_close(stats.xtx, fp_x.T @ fp_x, rtol=1e-4, atol=1e-3)
    else:  # 2-bit block 0 changes what block 1 sees
        assert not torch.allclose(stats.xtx, fp_x.T @ fp_x, rtol=1e-2, atol=1e-1)


def test_absolute_statistics_are_per_channel(tiny_model: Callable[..., Any]) -> None:
    model = tiny_model()
    tokens = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(1))
    x = _block_inputs(model, tokens, 0)
    probe = _Probe("fp")
    quantize_decoder_blocks(model, probe, tokens, batch_size=2)
    stats = probe.seen["0.self_attn.k_proj"]
    assert stats is probe.seen["0.self_attn.q_proj"] and stats.n_tokens == 48
    torch.testing.assert_close(stats.abs_mean(), x.abs().mean(dim=0))
    torch.testing.assert_close(stats.abs_max, x.abs().amax(dim=0))
    torch.testing.assert_close(stats.hessian(), x.T @ x / 48, rtol=1e-4, atol=1e-4)


def test_module_inputs_rerun_a_submodule_exactly(tiny_model: Callable[..., Any]) -> None:
    model = tiny_model("qwen2")
    tokens = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(2))
    ctx = BlockContext(model.model.layers[0], 0, capture_block_inputs(model, tokens, batch_size=2))
    attn = model.model.layers[0].self_attn
    seen: list[torch.Tensor] = []
    handle = attn.register_forward_hook(lambda _m, _a, out: seen.append(out[0]))
    calls = ctx.module_inputs(attn)
    handle.remove()
    assert len(calls) == 2
    with torch.no_grad():
        again = [attn(*args, **kwargs)[0] for args, kwargs in calls]
    for a, b in zip(again, seen, strict=True):
        torch.testing.assert_close(a, b)


def test_a_method_fixes_its_own_config_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    from quantsafe.quantization.methods.rtn import RTNQuantizer

    monkeypatch.setattr(RTNQuantizer, "config_defaults", {"group_size": None, "sym": True})
    assert QuantConfig(method="rtn", bits=4).group_size is None
    explicit = QuantConfig(method="rtn", bits=4, group_size=32, sym=False)
    assert (explicit.group_size, explicit.sym) == (32, False)
