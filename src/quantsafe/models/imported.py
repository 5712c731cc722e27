"""Existing quantized checkpoints as study variants: quantization is skipped and the source recorded.

Two formats. `hf`: a Hugging Face directory (or hub id) whose config.json has a `quantization_config` (GPTQ, AWQ,
AQLM, compressed-tensors, bitsandbytes, HQQ...); transformers' own quantizer integration loads it, so its kernels
(or its dequantization, on CPU) are what runs. `gguf`: a llama.cpp file, dequantized by transformers' GGUF loader
into a cached bf16 checkpoint exactly as GGUF-sourced base models are (weight-only effect: llama.cpp's own kernels
also quantize activations for their dot products; serve the file with llama.cpp as a `served` entry for that).

Sample YAML (inside a study's `variants` list)::

    - import: {source: ~/ckpt/Qwen2.5-0.5B-Instruct-GPTQ-Int4}      # format hf, precision int4 inferred
    - import: {source: ~/gguf/qwen2.5-0.5b-instruct-q4_k_m.gguf, model: qwen2.5-coder-0.5b}
    - import: {source: ISTA-DASLab/Llama-3.1-8B-Instruct-AQLM-PV-2Bit-1x16-hf, revision: main,
               precision: int2, bits_per_weight: 2.07}

The identity of an import is the content of its files (weights, config, tokenizer; sha256 cached by path + mtime +
size), never its path, so two checkpoints never share results and a moved one keeps them.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any, BinaryIO, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from quantsafe.datadir import cache_dir
from quantsafe.errors import QuantsafeError
from quantsafe.hashing import cached_file_sha256, stable_hash
from quantsafe.models.loading import (
    SOURCE_FILE,
    WEIGHT_HASH_CACHE,
    ResolvedModel,
    _dir_fingerprint,
    _first_line,
    _from_gguf,
    check_model,
    load_model,
)

Format = Literal["hf", "gguf"]
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]  # weights, configs, tokenizer, template


class ImportSpec(BaseModel):
    """What a study says about a checkpoint to import; everything not declared is read from the checkpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(min_length=1)  # local directory, .gguf file, hub id, or hub `owner/repo/file.gguf`
    format: Format | None = None  # inferred: a .gguf file is gguf, a directory with a quantization_config is hf
    model: str | None = None  # the study model it is a variant of; may be omitted when the study has one model
    revision: str | None = None  # hub sources only
    precision: str | None = None  # e.g. int4; inferred where the checkpoint says
    method: str | None = None  # report label; default import:<quant_method> or import:gguf-<file type>
    bits_per_weight: float | None = Field(None, gt=0)  # declared; measured exactly for GGUF files


class ImportedCheckpoint(BaseModel):
    """An import located, hashed and checked (no weights loaded): everything its variant row records."""

    spec: ImportSpec
    path: Path  # the local directory or .gguf file (a hub snapshot once downloaded)
    format: Format
    content_sha256: str
    method: str
    precision: str
    bits: int | None = None
    group_size: int | None = None
    bits_per_weight: float | None = None
    details: dict[str, Any] = {}  # the quantization_config, or the GGUF file type and tensor types

    def variant_id(self, base_sha256: str) -> str:
        """Content, never path: the same bytes anywhere are one variant; declared labels and the base it pairs
        with are part of it, so one row never describes two things."""
        return stable_hash({"import": self.content_sha256, "format": self.format, "method": self.method,
                            "precision": self.precision, "bits_per_weight": self.bits_per_weight,
                            "base": base_sha256})

    def record(self) -> dict[str, Any]:
        """The variant row's config: the spec as written plus what was read from the checkpoint."""
        return {"import": self.spec.model_dump(mode="json", exclude_none=True), "path": str(self.path),
                "format": self.format, "content_sha256": self.content_sha256, "details": self.details}


def inspect_import(spec: ImportSpec) -> ImportedCheckpoint:
    """Locate, hash and check an import before any model loads; every problem is one line naming the source."""
    path = _locate(spec)
    fmt = _format(spec, path)
    if fmt == "gguf":
        return _inspect_gguf(spec, path)
    return _inspect_hf(spec, path)


def load_imported(ckpt: ImportedCheckpoint, dtype: torch.dtype) -> tuple[Any, Any]:
    """Model (eval mode) and tokenizer in the compute dtype; GGUF files are dequantized once and cached."""
    if ckpt.format == "gguf":
        return load_model(_dequantized(ckpt.path, ckpt.content_sha256), dtype)
    return load_model(_as_resolved(ckpt.path, ckpt.content_sha256), dtype)


def _as_resolved(path: Path, sha: str) -> ResolvedModel:
    return ResolvedModel(name=path.name, path=path, source=str(path), source_sha256=sha, dequantized_gguf=False)


# --- where the files are --------------------------------------------------------------------------------------

def _locate(spec: ImportSpec) -> Path:
    path = Path(spec.source).expanduser()
    if path.exists():
        if spec.revision is not None:
            raise QuantsafeError(f"{path}: import.revision applies to hub ids only, not to local files")
        return path
    slashes, gguf = spec.source.count("/"), path.suffix == ".gguf"
    hub_like = slashes >= 2 if gguf else slashes == 1  # owner/repo, or owner/repo[/dir]/file.gguf
    if spec.source.startswith((".", "/", "~")) or not hub_like:
        raise QuantsafeError(f"{path}: import.source does not exist (a local directory, a .gguf file or a hub id)")
    return _from_hub(spec.source, spec.revision)


def _from_hub(source: str, revision: str | None) -> Path:
    """A hub id resolves to its local snapshot (downloaded once; HF_HUB_OFFLINE=1 uses the cache only), so the
    files themselves are hashed, not the name."""
    from huggingface_hub import hf_hub_download, snapshot_download

    owner, repo, *rest = source.split("/")
    repo_id = f"{owner}/{repo}"
    try:
        if rest:
            return Path(hf_hub_download(repo_id, "/".join(rest), revision=revision))
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # the hub client raises many types; the user needs one line
        raise QuantsafeError(f"import.source '{source}': not a local path and could not be fetched from the hub "
                             f"({type(exc).__name__}: {_first_line(exc)})") from exc


def _format(spec: ImportSpec, path: Path) -> Format:
    actual: Format = "gguf" if path.is_file() and path.suffix == ".gguf" else "hf"
    if path.is_file() and actual == "hf":
        raise QuantsafeError(f"{path}: import.source is a file but not a .gguf file; an HF checkpoint is a "
                             "directory with config.json")
    if spec.format is not None and spec.format != actual:
        what = "a .gguf file" if actual == "gguf" else "a directory"
        raise QuantsafeError(f"{path}: import.format is '{spec.format}' but the source is {what} (format "
                             f"'{actual}')")
    return actual


# --- Hugging Face checkpoints ---------------------------------------------------------------------------------

def _inspect_hf(spec: ImportSpec, path: Path) -> ImportedCheckpoint:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise QuantsafeError(f"{path}: not a Hugging Face checkpoint (no config.json)")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise QuantsafeError(f"{cfg_file}: not valid JSON ({_first_line(exc)})") from None
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(qc, dict) or not isinstance(qc.get("quant_method"), str):
        raise QuantsafeError(f"{cfg_file}: no quantization_config with a quant_method, so this is not a quantized "
                             "checkpoint; list a full-precision checkpoint under the study's models instead")
    quant_method: str = qc["quant_method"]
    _check_environment(cfg_file, qc)
    bits, group_size, inferred = _hf_precision(qc)
    precision = spec.precision or inferred
    if precision is None:
        raise QuantsafeError(f"{cfg_file}: cannot tell the precision from its quantization_config (quant_method "
                             f"'{quant_method}'); declare it as import.precision, e.g. int4")
    sha = _dir_fingerprint(path)
    check_model(_as_resolved(path, sha))  # tokenizer and chat template, without the weights
    return ImportedCheckpoint(spec=spec, path=path, format="hf", content_sha256=sha,
                              method=spec.method or f"import:{quant_method}", precision=precision, bits=bits,
                              group_size=group_size, bits_per_weight=spec.bits_per_weight,
                              details={"quantization_config": qc})


def _check_environment(cfg_file: Path, qc: dict[str, Any]) -> None:
    """transformers' own check for this quantization method (its packages, its hardware), run now rather than
    after an hour of other variants: its message names the package to install."""
    import transformers
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AutoHfQuantizer

    method = qc["quant_method"]
    if not AutoHfQuantizer.supports_quant_method(qc):
        # transformers would load such a checkpoint as a dense model, silently (it only logs a warning)
        raise QuantsafeError(f"{cfg_file}: quantization_config.quant_method '{method}' is not one transformers "
                             f"{transformers.__version__} can load ({', '.join(sorted(AUTO_QUANTIZER_MAPPING))})")
    try:
        quantizer = AutoHfQuantizer.from_config(qc, pre_quantized=True)  # some raise ImportError here already
        quantizer.validate_environment(device_map=None, weights_only=True)
    except (ImportError, RuntimeError) as exc:
        raise QuantsafeError(f"{cfg_file}: transformers cannot load this '{method}' checkpoint on this machine: "
                             f"{_first_line(exc)}") from None
    except Exception as exc:  # a malformed config: ValueError, TypeError, KeyError... the user needs one line
        raise QuantsafeError(f"{cfg_file}: quantization_config is not a valid '{method}' config for transformers "
                             f"({type(exc).__name__}: {_first_line(exc)})") from None


def _hf_precision(qc: dict[str, Any]) -> tuple[int | None, int | None, str | None]:
    """(bits, group size, precision label) where the quantization_config states them."""
    method = qc["quant_method"]
    if isinstance(qc.get("bits"), int):  # gptq, awq, auto-round, hqq-style configs
        group = qc.get("group_size")
        return qc["bits"], group if isinstance(group, int) and group > 0 else None, f"int{qc['bits']}"
    if method == "compressed-tensors":
        weights = [g.get("weights") or {} for g in (qc.get("config_groups") or {}).values() if isinstance(g, dict)]
        kinds = {(w.get("num_bits"), w.get("type", "int"), w.get("group_size")) for w in weights}
        if len(kinds) == 1:
            ((bits, kind, group),) = kinds
            if isinstance(bits, int):
                return bits, group, f"{'fp' if kind == 'float' else 'int'}{bits}"
        return None, None, None
    if method == "aqlm":
        keys = ("num_codebooks", "nbits_per_codebook", "in_group_size", "out_group_size")
        if all(isinstance(qc.get(k), int) for k in keys):  # code bits per weight, codebooks and scales aside
            bits = round(qc["num_codebooks"] * qc["nbits_per_codebook"] / (qc["in_group_size"] * qc["out_group_size"]))
            return bits, None, f"int{bits}"
        return None, None, None
    if method == "bitsandbytes":
        if qc.get("load_in_4bit"):
            return 4, None, str(qc.get("bnb_4bit_quant_type") or "nf4")
        if qc.get("load_in_8bit"):
            return 8, None, "int8"
    return None, None, None


# --- GGUF files -----------------------------------------------------------------------------------------------

class _GGUFHeader(BaseModel):
    model_config = ConfigDict(frozen=True)

    file_type: str | None  # LlamaFileType name without MOSTLY_, lower case (q4_k_m)
    has_chat_template: bool
    tensors: list[tuple[str, int, int, str]]  # name, dimensions, elements, ggml type


def _inspect_gguf(spec: ImportSpec, path: Path) -> ImportedCheckpoint:
    header = _read_gguf_header(path)
    if not header.has_chat_template:
        raise QuantsafeError(f"{path}: the GGUF has no tokenizer.chat_template; quantsafe needs an instruct model")
    bpw, types = _gguf_bits_per_weight(header.tensors)
    file_type = header.file_type or (max(types, key=lambda t: types[t]).lower() if types else None)
    if file_type is None:
        raise QuantsafeError(f"{path}: no general.file_type and no quantized block tensors; not a model GGUF")
    precision = spec.precision or _gguf_precision(file_type)
    if precision is None:
        raise QuantsafeError(f"{path}: cannot tell the precision of GGUF type '{file_type}'; declare it as "
                             "import.precision")
    sha = cached_file_sha256([path], cache_dir() / WEIGHT_HASH_CACHE)[path]
    bits = int(m.group(1)) if (m := re.match(r"^[it]?q(\d)_", file_type)) else None
    return ImportedCheckpoint(spec=spec, path=path, format="gguf", content_sha256=sha,
                              method=spec.method or f"import:gguf-{file_type}", precision=precision, bits=bits,
                              bits_per_weight=spec.bits_per_weight or bpw,
                              details={"file_type": file_type, "block_tensor_types": types,
                                       "bits_per_weight_measured": bpw})


def _gguf_precision(file_type: str) -> str | None:
    if m := re.match(r"^[it]?q(\d)_", file_type):
        return f"int{m.group(1)}"
    return {"f16": "fp16", "bf16": "bf16", "all_f32": "fp32", "mxfp4_moe": "fp4", "nvfp4": "fp4"}.get(file_type)


def _gguf_bits_per_weight(tensors: list[tuple[str, int, int, str]]) -> tuple[float | None, dict[str, int]]:
    """Stored bits per weight of the decoder blocks' matrices (what quantsafe's own artifacts count: the
    Linears inside the blocks, norms, embeddings and output head aside), and how many such tensors of each type."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    bits = weights = 0
    types: dict[str, int] = {}
    for name, n_dims, n, kind in tensors:
        if name.startswith("blk.") and name.endswith(".weight") and n_dims >= 2:
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
            bits += n // block * size * 8
            weights += n
            types[kind] = types.get(kind, 0) + 1
    return (bits / weights if weights else None), types


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def _read_gguf_header(path: Path) -> _GGUFHeader:
    """Metadata and tensor table only: gguf.GGUFReader parses every vocabulary entry into numpy views (12 s for a
    135M model's file); this reads the few keys we need and skips the rest by length."""
    from gguf import GGUF_MAGIC, GGMLQuantizationType, LlamaFileType

    try:
        with open(path, "rb") as f:
            magic, version = struct.unpack("<II", f.read(8))
            if magic != GGUF_MAGIC or version < 2:
                raise QuantsafeError(f"{path}: not a GGUF file (v2 or later)")
            n_tensors, n_kv = struct.unpack("<QQ", f.read(16))
            file_type: str | None = None
            has_template = False
            for _ in range(n_kv):
                key = _string(f)
                (vtype,) = struct.unpack("<I", f.read(4))
                if key == "general.file_type" and vtype in _SCALARS:
                    code = _scalar(f, vtype)
                    name = LlamaFileType(code).name if code in LlamaFileType._value2member_map_ else f"type{code}"
                    file_type = name.removeprefix("MOSTLY_").lower()
                elif key == "tokenizer.chat_template" and vtype == _STRING:
                    has_template = bool(_string(f).strip())
                else:
                    _skip(f, vtype)
            tensors = []
            for _ in range(n_tensors):
                name = _string(f)
                (n_dims,) = struct.unpack("<I", f.read(4))
                dims = struct.unpack(f"<{n_dims}Q", f.read(8 * n_dims))
                kind, _offset = struct.unpack("<IQ", f.read(12))
                n = 1
                for d in dims:
                    n *= d
                tensors.append((name, n_dims, n, GGMLQuantizationType(kind).name))
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise QuantsafeError(f"{path}: not a readable GGUF file ({_first_line(exc)})") from None
    except OSError as exc:
        raise QuantsafeError(f"{path}: cannot read ({exc.strerror})") from None
    return _GGUFHeader(file_type=file_type, has_chat_template=has_template, tensors=tensors)


def _string(f: BinaryIO) -> str:
    (n,) = struct.unpack("<Q", f.read(8))
    return f.read(n).decode("utf-8")


def _scalar(f: BinaryIO, vtype: int) -> Any:
    fmt = _SCALARS[vtype]
    return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def _skip(f: BinaryIO, vtype: int) -> None:
    if vtype == _STRING:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(n, 1)
    elif vtype == _ARRAY:
        etype, count = struct.unpack("<IQ", f.read(12))
        if etype in _SCALARS:
            f.seek(count * struct.calcsize(_SCALARS[etype]), 1)
        else:
            for _ in range(count):
                _skip(f, etype)
    elif vtype in _SCALARS:
        f.seek(struct.calcsize(_SCALARS[vtype]), 1)
    else:
        raise ValueError(f"unknown GGUF value type {vtype}")


def _dequantized(gguf: Path, sha: str) -> ResolvedModel:
    """The bf16 checkpoint of a GGUF file, converted once; a file already converted as a base model (same bytes,
    any name) is reused."""
    for done in sorted((cache_dir() / "models").glob(f"*-{sha[:12]}")):
        meta = done / SOURCE_FILE
        if meta.is_file() and json.loads(meta.read_text(encoding="utf-8")).get("source_sha256") == sha:
            return ResolvedModel(name=done.name, path=done, source=f"GGUF {gguf.name} (dequantized to bf16)",
                                 source_sha256=sha, dequantized_gguf=True)
    return _from_gguf(gguf, gguf.stem.lower(), sha, None, None)
