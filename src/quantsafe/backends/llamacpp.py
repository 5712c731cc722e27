"""Serve a local GGUF with llama-cpp-python's OpenAI-compatible server, for OpenAIBackend (tests, local runs)."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from quantsafe.backends.openai_compat import EndpointConfig
from quantsafe.datadir import cache_dir
from quantsafe.errors import QuantsafeError
from quantsafe.hashing import cached_file_sha256
from quantsafe.models.loading import WEIGHT_HASH_CACHE

LLAMA_CPP_SAMPLING: dict[str, Any] = {"repeat_penalty": 1.0, "top_k": 0, "min_p": 0.0}
"""llama-cpp-python's request defaults (repeat penalty 1.1, top-k 40, min-p 0.05) would change what a
DecodingConfig asks for; these switch them off, so greedy is plain argmax and sampling is temperature + top-p."""
STARTUP_TIMEOUT_S = 120.0
STOP_GRACE_S = 10.0
LOG_TAIL_LINES = 8

_NO_EXTRA_BUFFERS = """
import llama_cpp.llama_cpp as lib
from llama_cpp.server.__main__ import main

default = lib.llama_model_default_params


def params():
    p = default()
    p.use_extra_bufts = False
    return p


lib.llama_model_default_params = params
main()
"""
"""Runs the server with llama.cpp's extra weight buffers (AMX, repacking) off: see _has_amx."""


@dataclass(frozen=True)
class LlamaServer:
    """A running server: `endpoint` for OpenAIBackend; the process and its log for whoever needs them."""

    endpoint: EndpointConfig
    process: subprocess.Popen[bytes]
    log: Path


@contextmanager
def serve_gguf(
    gguf: Path | str, *, port: int | None = None, n_ctx: int = 4096, extra_args: Sequence[str] = (),
    tokenizer: str | None = None,
) -> Iterator[LlamaServer]:
    """Start `python -m llama_cpp.server` on 127.0.0.1 (a free port unless given), wait until it answers, yield,
    and stop it. `tokenizer` (a quantsafe model with the same chat template) enables log-probs; `extra_args` go to
    the server as they are (e.g. ["--n_threads", "4"]). Served under the file's stem, identified by its sha256."""
    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("uvicorn") is None:
        raise QuantsafeError("llama-cpp-python[server] is not installed; run scripts/llama_server.sh")
    gguf = Path(gguf)
    if not gguf.is_file():
        raise QuantsafeError(f"{gguf}: GGUF file does not exist")
    sha = cached_file_sha256([gguf], cache_dir() / WEIGHT_HASH_CACHE)[gguf]
    port = port or _free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    launch = ["-c", _NO_EXTRA_BUFFERS] if _has_amx() else ["-m", "llama_cpp.server"]
    cmd = [sys.executable, *launch, "--model", str(gguf), "--model_alias", gguf.stem, "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", str(n_ctx), *extra_args]
    # the server lets HOST, PORT and CONFIG_FILE from the environment override its arguments
    env = {k: v for k, v in os.environ.items() if k not in {"HOST", "PORT", "CONFIG_FILE"}}
    with tempfile.TemporaryDirectory(prefix="quantsafe-llama-") as tmp:
        log = Path(tmp) / "server.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            _wait_ready(proc, base_url, log)
            endpoint = EndpointConfig(base_url=base_url, model=gguf.stem, tokenizer=tokenizer, weights_sha256=sha,
                                      extra_body=LLAMA_CPP_SAMPLING)
            yield LlamaServer(endpoint, proc, log)
        finally:
            proc.terminate()
            try:
                proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _has_amx() -> bool:
    """llama-cpp-python 0.3.36 built for an AMX CPU crashes in its AMX matrix multiply (a general protection fault
    at ldtilecfg, seen on a Sapphire Rapids VM), so there the server runs without extra weight buffers."""
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").split()
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_ready(proc: subprocess.Popen[bytes], base_url: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise QuantsafeError(f"llama.cpp server exited with code {proc.returncode} while starting: "
                                 f"{_tail(log)}")
        try:
            if httpx.get(f"{base_url}/models", timeout=2.0).is_success:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise QuantsafeError(f"llama.cpp server did not answer {base_url}/models within "
                                 f"{STARTUP_TIMEOUT_S:.0f} s: {_tail(log)}")
        time.sleep(0.2)


def _tail(log: Path) -> str:
    """The log's last lines on one line (errors are one line)."""
    lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    return " | ".join(lines[-LOG_TAIL_LINES:]) or "(no output)"
