import json
from pathlib import Path

import pytest

from quantsafe.errors import QuantsafeError
from quantsafe.judges.trained import TrainedJudgeConfig
from quantsafe.study import load_study

REPO = Path(__file__).resolve().parents[2]


def test_demo_study_parses() -> None:
    cfg = load_study(REPO / "studies" / "demo.yaml")
    assert [v.label() for v in cfg.variants] == ["bf16", "gptq-w4-g64", "rtn-w2-g64", "gptq-w2-g64"]
    assert {j.kind for j in cfg.judges} == {"trained", "heuristic"}


def test_demo_trained_judge_ships_with_quantsafe() -> None:
    """The demo must not train on an AVX2-only CPU (~20 min of fp32 features): its heads and held-out twins are in
    the package."""
    from quantsafe.judges.trained import SHIPPED_HEADS

    cfg = load_study(REPO / "studies" / "demo.yaml")
    (spec,) = [j for j in cfg.judges if j.kind == "trained"]
    metas = [json.loads((d / "meta.json").read_text()) for d in SHIPPED_HEADS.iterdir()]
    assert {tuple(sorted(m["trained_on"])) for m in metas} >= {tuple(sorted(spec.trained.train_sets))}
    assert all(TrainedJudgeConfig.model_validate_json((d / "config.json").read_text()).model_copy(
        update={"train_sets": spec.trained.train_sets}) == spec.trained for d in SHIPPED_HEADS.iterdir())


@pytest.mark.parametrize(("text", "needle"), [
    ("name: x\nbenchmarks: [{name: opensafetymini}]\njudges: [{kind: heuristic}]\nbogus: 1\n", "field 'bogus'"),
    ("name: x\nbenchmarks: []\njudges: [{kind: heuristic}]\n", "field 'benchmarks': List should have at least 1"),
    ("name: x\nbenchmarks: [{name: opensafetymini}]\njudges: []\n", "field 'judges'"),
    ("name: x\nbenchmarks: [{name: opensafetymini}]\njudges: [{kind: heuristic}]\nvariants: []\n",
     "field 'variants'"),
    ("name: x\nbenchmarks: [{name: opensafetymini}]\njudges: [{kind: heuristic}]\ndtype: float8\n", "field 'dtype'"),
    ("name: x\nbenchmarks: [{name: opensafetymini}]\njudges: [{kind: llm}]\nvariants: [{method: rtn, bits: 9}]\n",
     "field 'variants.0.bits'"),
    ("name: x\nbenchmarks: [{name: nope}]\njudges: [{kind: heuristic}]\n", "field 'benchmarks.0.name'"),
    ("name: x\nbenchmarks: [{name: nope}]\njudges: [{kind: heuristic}]\n", "unknown benchmark 'nope'; known: "),
    ("name: x\nbenchmarks: [{name: hotpotqa}]\njudges: [{kind: heuristic}]\n"
     "variants: [{abliterate: {layer: 0.5}, bits: 4}]\n", "an abliteration takes no quantizer fields (bits)"),
    ("name: x\nbenchmarks: [{name: hotpotqa}]\njudges: [{kind: heuristic}]\n"
     "variants: [{abliterate: {layer: 1.5}}]\n", "field 'variants.0.abliterate.layer'"),
    ("name: [unclosed\n", "invalid YAML"),
    ("- just a list\n", "must be a YAML mapping"),
])
def test_bad_study_is_one_clear_line(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(QuantsafeError) as exc:
        load_study(path)
    assert needle in str(exc.value) and str(path) in str(exc.value) and "\n" not in str(exc.value)


def test_non_utf8_and_missing(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(QuantsafeError, match="not UTF-8"):
        load_study(path)
    with pytest.raises(QuantsafeError, match="does not exist"):
        load_study(tmp_path / "missing.yaml")


def test_judge_options_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("name: x\nbenchmarks: [{name: opensafetymini}]\n"
                    "judges: [{kind: llm, degeneration_check: false, max_item_chars: 500}]\n")
    judge = load_study(path).judges[0]
    assert judge.degeneration_check is False and judge.max_item_chars == 500


def test_unknown_trained_judge_set_fails_before_any_model(tmp_path: Path, data_dir: Path) -> None:
    from quantsafe.study.runner import _plan

    cfg = load_study(REPO / "studies" / "demo.yaml").model_copy(update={"data_dir": data_dir})
    bad = cfg.judges[0].model_copy(update={"trained": cfg.judges[0].trained.model_copy(update={"train_sets": ("x",)})})
    with pytest.raises(QuantsafeError, match=r"judges\.0\.trained\.train_sets: .*unknown labelled set 'x'"):
        _plan(cfg.model_copy(update={"judges": [bad]}), tmp_path / "out")


IMPORT_STUDY = "name: x\nbenchmarks: [{name: opensafetymini}]\njudges: [{kind: heuristic}]\n"


def test_import_variants_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(IMPORT_STUDY + "models: [smollm2-135m, qwen2.5-coder-0.5b]\nvariants:\n  - {method: none}\n"
                    "  - import: {source: ~/q4.gguf, model: qwen2.5-coder-0.5b, precision: int4}\n"
                    "  - import: {source: org/awq, model: smollm2-135m, revision: main, bits_per_weight: 4.25}\n")
    cfg = load_study(path)
    imports = [v for v in cfg.variants if v.import_ is not None]
    assert [cfg.import_base(v) for v in imports] == ["qwen2.5-coder-0.5b", "smollm2-135m"]
    assert [v.label() for v in cfg.variants] == ["bf16", "import ~/q4.gguf", "import org/awq"]
    assert not any(v.is_full_precision for v in imports) and cfg.import_base(cfg.variants[0]) is None
    dumped = cfg.model_dump(mode="json")  # recorded with the study; must read back as the same study
    assert dumped["variants"][1]["import"]["source"] == "~/q4.gguf"
    assert type(cfg).model_validate(dumped) == cfg


def test_one_model_needs_no_model_field(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(IMPORT_STUDY + "models: [smollm2-135m]\nvariants: [{import: {source: a.gguf}}]\n")
    cfg = load_study(path)
    assert cfg.import_base(cfg.variants[0]) == "smollm2-135m"


@pytest.mark.parametrize(("text", "needle"), [
    ("models: [a, b]\nvariants: [{import: {source: x.gguf}}]\n",
     "variants.0.import.model: name the study model this checkpoint is a variant of"),
    ("models: [a]\nvariants: [{import: {source: x.gguf, model: b}}]\n",
     "variants.0.import.model: 'b' is not in the study's models"),
    ("models: [a]\nvariants: [{method: none}, {import: {source: x.gguf}, bits: 4}]\n",
     "field 'variants.1': Value error, an import takes no quantizer fields (bits)"),
    ("models: [a]\nvariants: [{import: {source: x.gguf, format: awq}}]\n", "field 'variants.0.import.format'"),
    ("models: [a]\nvariants: [{import: {source: x.gguf, bits: 4}}]\n", "field 'variants.0.import.bits'"),
    ("models: [a]\nvariants: [{import: {}}]\n", "field 'variants.0.import.source'"),
])
def test_bad_import_is_one_clear_line(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(IMPORT_STUDY + text)
    with pytest.raises(QuantsafeError) as exc:
        load_study(path)
    assert needle in str(exc.value) and str(path) in str(exc.value) and "\n" not in str(exc.value)


def test_variants_pass_only_what_the_yaml_set_to_the_quantizer() -> None:
    """An explicit `group_size: null` stays per-row, and a method's own defaults apply to what was not set."""
    from quantsafe.study.config import VariantSpec

    per_row = VariantSpec.model_validate({"method": "rtn", "bits": 4, "group_size": None})
    assert per_row.quant_config().group_size is None
    assert VariantSpec.model_validate({"method": "rtn", "bits": 4}).quant_config().group_size == 128
    quik = VariantSpec.model_validate({"method": "quik", "bits": 4, "layer_bits": {"mlp.down_proj": 8}})
    cfg = quik.quant_config()
    assert (cfg.group_size, cfg.sym, cfg.layer_bits) == (None, True, {"mlp.down_proj": 8})
    assert quik.label() == "quik-w4"


def test_abliteration_instructions_never_overlap_the_study(tmp_path: Path, data_dir: Path) -> None:
    """The direction's instructions are chosen among prompts the study does not evaluate; when too few remain,
    the study fails before any model loads, naming the variant."""
    from quantsafe.study.runner import _plan

    path = tmp_path / "s.yaml"
    path.write_text(f"name: x\ndata_dir: {data_dir}\nbenchmarks: [{{name: xstest}}]\njudges: [{{kind: heuristic}}]\n"
                    "variants: [{method: none}, {abliterate: {n_instructions: 8, harmful_sources: [xstest-unsafe]}}]\n")
    cfg = load_study(path)
    with pytest.raises(QuantsafeError, match=r"variants\.1\.abliterate: .*only 0 harmful instructions"):
        _plan(cfg, tmp_path / "out")
    few = cfg.model_copy(update={"benchmarks": [cfg.benchmarks[0].model_copy(update={"limit": 40})]})
    plan = _plan(few, tmp_path / "out")
    harmful, harmless = plan.abliterations[1]
    assert len(harmful) == len(harmless) == 8
    assert not {" ".join(h.casefold().split()) for h in harmful} & {
        " ".join(p.text.casefold().split()) for p in plan.prompts}
