"""A model behind an OpenAI-compatible HTTP server (vLLM, llama.cpp, hosted APIs) as a `Backend`.

generate: POST {base_url}/chat/completions, one request per conversation, `max_concurrency` at a time; the server
applies its chat template.

next_token_logprobs: the completions endpoint, because chat endpoints cannot pre-fill the assistant turn. The
conversation is rendered locally with the chat template of `EndpointConfig.tokenizer`, then, by `logprobs`:

top:  the prompt up to each candidate token (one request per distinct candidate head: a single request per
      conversation when every candidate is one token) with max_tokens=1 and logprobs=`top_logprobs`: the server's
      top log-probs of the next token (legacy completions format). Exact for every candidate among them; one
      outside gets the lowest value listed, an upper bound of its own. Works with llama-cpp-python and vLLM (whose
      list is capped by its --max-logprobs, 20 by default).
echo: the prompt plus each candidate with echo=true, logprobs=1 and max_tokens=1 (llama.cpp reads 0 as unlimited):
      the log-probs of the prompt's own tokens, exact for any candidate, one request per candidate. vLLM supports
      it; llama-cpp-python 0.3.36 does not in practice: on models without a BOS token its echoed log-probs are
      shifted by one token, its text offsets skip special tokens, and it sorts the whole vocabulary for every
      prompt token (15 s for a 24-token prompt).

Every request is retried on 429, 5xx, connection errors and timeouts with exponential backoff; another 4xx fails at
once. With a RequestCache, successful responses are stored as they arrive and never requested again.
"""

from __future__ import annotations

import email.utils
import functools
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from datetime import UTC, datetime
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from quantsafe.backends.base import DEFAULT_MAX_BATCH_TOKENS, DecodingConfig, Generation, Message
from quantsafe.backends.request_cache import RequestCache
from quantsafe.errors import QuantsafeError
from quantsafe.hashing import stable_hash

CHAT = "chat/completions"
COMPLETIONS = "completions"
REQUEST_KEYS = frozenset({"model", "messages", "prompt", "max_tokens", "temperature", "top_p", "seed", "echo",
                          "logprobs"})
"""Body fields the backend sets itself; `extra_body` may not override them."""
NO_LOGPROBS = ("fast mode needs a server whose completions endpoint returns logprobs (e.g. vLLM or llama.cpp); "
               "use the judge's full mode with this server")


class EndpointConfig(BaseModel):
    """Where the served model is and how to talk to it; `identity()` is what changes its outputs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = Field(description="the API root, e.g. http://127.0.0.1:8000/v1")
    model: str = Field(description="the served model name sent in every request")
    api_key_env: str | None = Field(None, description="name of the environment variable holding the API key")
    tokenizer: str | None = Field(
        None, description="quantsafe model (name, directory, hub id) whose chat template renders prompts for "
        "log-probs; only fast-mode judging needs it",
    )
    weights_sha256: str | None = Field(None, description="declared identity of the served weights; recorded")
    logprobs: Literal["top", "echo"] = Field("top", description="how candidate log-probs are read (module doc)")
    top_logprobs: int = Field(20, ge=1, description="log-probs listed per position in `top` mode")
    extra_body: dict[str, Any] = Field(
        default_factory=dict, description="server-specific request fields, e.g. llama.cpp's repeat_penalty",
    )
    max_concurrency: int = Field(4, ge=1)
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(5, ge=0)
    backoff_s: float = Field(1.0, ge=0)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, not {url!r}")
        return url.rstrip("/")

    @field_validator("extra_body")
    @classmethod
    def _no_overrides(cls, body: dict[str, Any]) -> dict[str, Any]:
        clash = sorted(REQUEST_KEYS & body.keys())
        if clash:
            raise ValueError(f"extra_body may not set {clash}: the backend sets them from its own settings")
        return body

    def identity(self) -> dict[str, object]:
        """The fields that change outputs. Address, concurrency, timeouts and retries do not, so a server
        restarted on another port keeps its cache and ids."""
        return self.model_dump(include={"model", "tokenizer", "weights_sha256", "logprobs", "top_logprobs",
                                        "extra_body"})


class OpenAIBackend:
    """`Backend` over HTTP; `name` = http:{model}@{hash of identity()}, the variant id results are keyed by."""

    def __init__(self, config: EndpointConfig, cache: RequestCache | None = None) -> None:
        self.config = config
        self.cache = cache
        self.name = f"http:{config.model}@{stable_hash(config.identity())}"
        self._headers: dict[str, str] = {}
        if config.api_key_env is not None:
            key = os.environ.get(config.api_key_env)
            if not key:
                raise QuantsafeError(f"environment variable {config.api_key_env} (the API key of "
                                     f"{config.base_url}) is not set")
            self._headers["Authorization"] = f"Bearer {key}"

    # -- generation ------------------------------------------------------------------------------------
    def generate(
        self, conversations: Sequence[list[Message]], decoding: DecodingConfig,
        on_batch: Callable[[int], None] | None = None,
    ) -> list[Generation]:
        """One chat completion per conversation, in input order; batch sizes are the server's business."""
        if decoding.max_prompt_tokens is not None:
            raise QuantsafeError("max_prompt_tokens is not supported over HTTP (the server tokenizes); leave it "
                                 "unset: prompts over the server's context fail with its error")
        system = [{"role": "system", "content": decoding.system_prompt}] if decoding.system_prompt else []
        bodies = [{**self.config.extra_body, "model": self.config.model, "messages": [*system, *conv],
                   "max_tokens": decoding.max_new_tokens, "temperature": decoding.temperature,
                   "top_p": decoding.top_p, "seed": decoding.seed} for conv in conversations]
        return [self._generation(r) for r in self._post_all(CHAT, bodies, on_batch)]

    def _generation(self, response: dict[str, Any]) -> Generation:
        try:
            choice = response["choices"][0]
            usage = response.get("usage") or {}
            return Generation(text=(choice["message"]["content"] or "").strip(),
                              n_prompt_tokens=usage.get("prompt_tokens", 0),
                              n_new_tokens=usage.get("completion_tokens", 0),
                              finished=choice.get("finish_reason") == "stop")
        except (KeyError, IndexError, TypeError) as exc:
            raise QuantsafeError(f"{self.config.base_url}/{CHAT}: unexpected response "
                                 f"(missing {exc}): {_one_line(str(response))}") from exc

    # -- log-probs -------------------------------------------------------------------------------------
    def next_token_logprobs(
        self, conversations: Sequence[list[Message]], candidates: Sequence[str], prefill: str = "",
        batch_size: int = 8, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        shared_chars: Sequence[int] | None = None,
    ) -> list[dict[str, float]]:
        """Log-prob of each candidate's whole token sequence right after the assistant turn opens with prefill
        (as HFBackend.next_token_logprobs). Batching and prefix reuse are the server's business: batch_size,
        max_batch_tokens and shared_chars are ignored."""
        tok = self._load_tokenizer()
        cand_ids = [tok(c, add_special_tokens=False)["input_ids"] for c in candidates]
        if not cand_ids or not all(cand_ids) or len(set(map(tuple, cand_ids))) != len(cand_ids):
            raise ValueError(f"candidates {list(candidates)} must be non-empty with distinct token sequences")
        prompts = [self._render(tok, conv, prefill) for conv in conversations]
        if self.config.logprobs == "echo":
            return self._echo_logprobs(prompts, candidates)
        return self._top_logprobs(tok, prompts, candidates, cand_ids)

    def _load_tokenizer(self) -> Any:
        if self.config.tokenizer is None:
            raise QuantsafeError(f"{self.name}: log-probs need EndpointConfig.tokenizer (the model whose chat "
                                 "template renders the prompt); or use the judge's full mode")
        return _tokenizer(self.config.tokenizer)

    @staticmethod
    def _render(tok: Any, conversation: list[Message], prefill: str) -> str:
        text: str = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        # the server adds the model's BOS to a completions prompt itself; a template that writes it would double it
        if tok.bos_token and text.startswith(tok.bos_token):
            text = text[len(tok.bos_token):]
        return text + prefill

    def _completion(self, prompt: str, **fields: object) -> dict[str, Any]:
        return {**self.config.extra_body, "model": self.config.model, "prompt": prompt, "max_tokens": 1,
                "temperature": 0.0, **fields}

    def _top_logprobs(
        self, tok: Any, prompts: list[str], candidates: Sequence[str], cand_ids: list[list[int]],
    ) -> list[dict[str, float]]:
        heads = sorted({tuple(ids[:k]) for ids in cand_ids for k in range(len(ids))})
        head_text = {h: tok.decode(list(h), clean_up_tokenization_spaces=False) for h in heads}
        bodies = [self._completion(p + head_text[h], logprobs=self.config.top_logprobs) for p in prompts
                  for h in heads]
        tops = [self._top(r) for r in self._post_all(COMPLETIONS, bodies)]
        out = []
        for i in range(len(prompts)):
            by_head = dict(zip(heads, tops[i * len(heads):(i + 1) * len(heads)], strict=True))
            out.append({c: sum(_lookup(by_head[tuple(ids[:k])],
                                       tok.decode([ids[k]], clean_up_tokenization_spaces=False))
                               for k in range(len(ids)))
                        for c, ids in zip(candidates, cand_ids, strict=True)})
        return out

    def _top(self, response: dict[str, Any]) -> dict[str, float]:
        try:
            top = response["choices"][0]["logprobs"]["top_logprobs"][0]
        except (KeyError, IndexError, TypeError) as exc:
            raise QuantsafeError(f"{self.config.base_url}: no top_logprobs in the completions response; "
                                 f"{NO_LOGPROBS}") from exc
        if not isinstance(top, dict) or not top:
            raise QuantsafeError(f"{self.config.base_url}: empty top_logprobs; {NO_LOGPROBS}")
        return {str(k): float(v) for k, v in top.items()}

    def _echo_logprobs(self, prompts: list[str], candidates: Sequence[str]) -> list[dict[str, float]]:
        bodies = [self._completion(p + c, echo=True, logprobs=1) for p in prompts for c in candidates]
        responses = iter(self._post_all(COMPLETIONS, bodies))
        return [{c: self._echoed(next(responses), c) for c in candidates} for _ in prompts]

    def _echoed(self, response: dict[str, Any], candidate: str) -> float:
        """Sum of the echoed log-probs of the prompt's last tokens, those that spell the candidate. Read from the
        end by token text, not by text offset: servers decode prompt tokens one by one, so a character split over
        two tokens shifts every later offset."""
        try:
            lp = response["choices"][0]["logprobs"]
            tokens, values = list(lp["tokens"]), list(lp["token_logprobs"])
            k = len(tokens) - int(response["usage"]["completion_tokens"])  # the prompt's tokens come first
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise QuantsafeError(f"{self.config.base_url}: no echoed logprobs (or usage) in the completions "
                                 f"response; {NO_LOGPROBS}") from exc
        text, total = "", 0.0
        while len(text) < len(candidate) and k > 0 and values[k - 1] is not None:
            k -= 1
            text = tokens[k] + text
            total += values[k]
        if text != candidate:
            raise QuantsafeError(f"{self.config.base_url}: the prompt's last tokens spell {text!r}, not the candidate "
                                 f"{candidate!r}: a token spans the prefill and the candidate (change either)")
        return total

    # -- HTTP ------------------------------------------------------------------------------------------
    def _post_all(
        self, path: str, bodies: list[dict[str, Any]], on_done: Callable[[int], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Responses in input order, `max_concurrency` requests at a time; `on_done(1)` after each. On the first
        failure the queued requests are dropped, the ones in flight finish (and are cached), and it raises."""
        out: list[dict[str, Any] | None] = [None] * len(bodies)
        with httpx.Client(timeout=self.config.timeout_s, headers=self._headers) as client, \
                ThreadPoolExecutor(self.config.max_concurrency, thread_name_prefix="quantsafe-http") as pool:
            futures: dict[Future[dict[str, Any]], int] = {
                pool.submit(self._post, client, path, body): i for i, body in enumerate(bodies)}
            try:
                for fut in as_completed(futures):
                    out[futures[fut]] = fut.result()
                    if on_done:
                        on_done(1)
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise
        return [r for r in out if r is not None]

    def _post(self, client: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if self.cache is not None and (hit := self.cache.get(path, body)) is not None:
            return hit
        url = f"{self.config.base_url}/{path}"
        attempts = self.config.max_retries + 1
        for attempt in range(attempts):
            wait = self.config.backoff_s * 2**attempt
            try:
                resp = client.post(url, json=body)
            except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as exc:
                problem = f"{type(exc).__name__}: {_one_line(str(exc))}"
            else:
                if resp.is_success:
                    data = _json(resp, url)
                    if self.cache is not None:
                        self.cache.put(path, body, data)
                    return data
                problem = f"HTTP {resp.status_code}: {_error_message(resp)}"
                if resp.status_code != 429 and resp.status_code < 500:
                    raise QuantsafeError(f"POST {url}: {problem}")
                wait = retry if (retry := _retry_after(resp)) is not None else wait
            if attempt + 1 < attempts:
                time.sleep(wait)
        raise QuantsafeError(f"POST {url}: failed {attempts} times, last: {problem}")


@functools.cache
def _tokenizer(ref: str) -> Any:
    """Loaded once per process: every backend of one served model renders with the same template."""
    from quantsafe.models.loading import _load_tokenizer, resolve_model

    return _load_tokenizer(resolve_model(ref).path)


def _lookup(top: dict[str, float], token: str) -> float:
    """A token's log-prob from a top list; absent, the lowest listed (its log-prob is at most that)."""
    return top.get(token, min(top.values()))


def _json(resp: httpx.Response, url: str) -> dict[str, Any]:
    try:
        data = resp.json()
    except ValueError as exc:
        raise QuantsafeError(f"POST {url}: the answer is not JSON: {_one_line(resp.text)}") from exc
    if not isinstance(data, dict):
        raise QuantsafeError(f"POST {url}: the answer is not a JSON object: {_one_line(resp.text)}")
    return data


def _error_message(resp: httpx.Response) -> str:
    """The server's own words: OpenAI and vLLM send {"error": {"message"}}, FastAPI {"detail"}."""
    try:
        data = resp.json()
    except ValueError:
        return _one_line(resp.text) or resp.reason_phrase
    if isinstance(data, dict):
        err = data.get("error")
        msg = err.get("message") if isinstance(err, dict) else err or data.get("detail") or data.get("message")
        if msg:
            return _one_line(str(msg))
    return _one_line(resp.text)


def _retry_after(resp: httpx.Response) -> float | None:
    """Retry-After in seconds (a number or an HTTP date); None when absent or unreadable."""
    value = resp.headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _one_line(text: str, limit: int = 300) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit] + "..."
