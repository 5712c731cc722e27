"""Hugging Face transformers backend: chat template, left padding, length-sorted batches."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from quantsafe.backends.base import DecodingConfig, Generation, Message

MIN_SHARED_PREFIX = 32  # below this, re-encoding the prefix costs less than copying its KV cache


class HFBackend:
    """Wraps a loaded causal LM and its tokenizer; `name` is the variant id used for caching."""

    def __init__(self, model: Any, tokenizer: Any, name: str):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
        self.eos_ids: list[int] = sorted({*ids, tokenizer.eos_token_id} - {None})

    def _render(self, conversation: list[Message], system_prompt: str | None = None, prefill: str = "") -> str:
        msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + conversation
        text: str = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return text + prefill

    def _batches(self, texts: list[str], batch_size: int) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
        """Yield (original indices, encoded batch), longest first so padding stays small and OOM shows early."""
        lengths = [len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = self.tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True,
                                 add_special_tokens=False)
            yield idx, enc

    @torch.no_grad()
    def generate(
        self, conversations: Sequence[list[Message]], decoding: DecodingConfig,
        on_batch: Callable[[int], None] | None = None,
    ) -> list[Generation]:
        texts = [self._render(c, decoding.system_prompt) for c in conversations]
        out: list[Generation | None] = [None] * len(texts)
        for idx, enc in self._batches(texts, decoding.batch_size):
            torch.manual_seed(decoding.seed)
            kwargs: dict[str, Any] = {"max_new_tokens": decoding.max_new_tokens, "do_sample": not decoding.greedy,
                                      "pad_token_id": self.tokenizer.pad_token_id, "eos_token_id": self.eos_ids}
            if not decoding.greedy:
                kwargs.update(temperature=decoding.temperature, top_p=decoding.top_p)
            else:
                kwargs.update(temperature=None, top_p=None, top_k=None)
            seqs = self.model.generate(**enc, **kwargs)
            n_in = enc["input_ids"].shape[1]
            for row, i in enumerate(idx):
                new = seqs[row, n_in:].tolist()
                finished = any(t in self.eos_ids for t in new)
                if finished:
                    new = new[: next(k for k, t in enumerate(new) if t in self.eos_ids)]
                else:
                    while new and new[-1] == self.tokenizer.pad_token_id:
                        new.pop()
                out[i] = Generation(
                    text=self.tokenizer.decode(new, skip_special_tokens=True).strip(),
                    n_prompt_tokens=int(enc["attention_mask"][row].sum()), n_new_tokens=len(new), finished=finished,
                )
            if on_batch:
                on_batch(len(idx))
        return [g for g in out if g is not None]

    def candidate_token_ids(self, candidates: Sequence[str]) -> list[int]:
        """First token of each candidate; distinct candidates must not share it."""
        ids = [self.tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in candidates]
        if len(set(ids)) != len(ids):
            raise ValueError(f"candidates {list(candidates)} share a first token: {ids}")
        return ids

    @torch.no_grad()
    def next_token_logprobs(
        self, conversations: Sequence[list[Message]], candidates: Sequence[str], prefill: str = "",
        batch_size: int = 8,
    ) -> list[dict[str, float]]:
        """One forward pass per item; a prefix shared by every item (few-shot turns) is encoded once."""
        ids = self.candidate_token_ids(candidates)
        seqs = [self.tokenizer(self._render(c, None, prefill), add_special_tokens=False)["input_ids"]
                for c in conversations]
        if not seqs:
            return []
        shared = _common_prefix_len(seqs) if len(seqs) > 1 else 0
        shared = min(shared, min(map(len, seqs)) - 1)  # every item keeps at least one token of its own
        prefix_cache = None
        if shared >= MIN_SHARED_PREFIX:
            prefix_cache = self.model(input_ids=torch.tensor([seqs[0][:shared]]), use_cache=True).cache
        else:
            shared = 0
        pad = self.tokenizer.pad_token_id
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        out: list[dict[str, float]] = [{} for _ in seqs]
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            own = [seqs[i][shared:] for i in idx]
            width = max(map(len, own))
            # right padding: causal attention keeps real tokens blind to the pads after them
            input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in own])
            mask = torch.tensor([[1] * (shared + len(s)) + [0] * (width - len(s)) for s in own])
            kwargs: dict[str, Any] = {}
            if prefix_cache is not None:
                cache = copy.deepcopy(prefix_cache)
                cache.batch_repeat_interleave(len(idx))
                kwargs["cache"] = cache
            logits = self.model(input_ids=input_ids, attention_mask=mask, **kwargs).logits
            last = logits[torch.arange(len(idx)), torch.tensor([len(s) - 1 for s in own])].float()
            logp = torch.log_softmax(last, dim=-1)[:, ids]
            for row, i in enumerate(idx):
                out[i] = {c: float(v) for c, v in zip(candidates, logp[row].tolist(), strict=True)}
        return out


def _common_prefix_len(seqs: Sequence[list[int]]) -> int:
    first = seqs[0]
    n = min(map(len, seqs))
    for k in range(n):
        if any(s[k] != first[k] for s in seqs[1:]):
            return k
    return n
