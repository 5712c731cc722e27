"""Hugging Face transformers backend: chat template, left padding, continuous batching with a shared prefix, and
length-sorted token-budgeted scoring batches."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from quantsafe.backends.base import DEFAULT_MAX_BATCH_TOKENS, DecodingConfig, Generation, Message
from quantsafe.errors import QuantsafeError
from quantsafe.models.device import generation_rows

MIN_SHARED_PREFIX = 32  # below this, re-encoding the prefix costs less than copying its KV cache
REFILL_AT = 0.25  # share of free rows that calls in waiting prompts: one prefill reads every weight, however few rows
PREFILL_TOKENS = 2048  # padded prompt tokens per prefill forward: enough rows to amortise reading the weights
PREFIX_CACHE_SIZE = 8  # shared prefixes kept between calls (a judge uses two; SafetyBench one per category)

log = logging.getLogger("quantsafe.backends")


class _Row(NamedTuple):
    """One scoring sequence: an item plus the tokens its candidates `members` share before their last one."""

    item: int
    ids: list[int]
    members: list[int]


class HFBackend:
    """Wraps a loaded causal LM and its tokenizer; `name` is the variant id used for caching."""

    batching = "continuous-v1"  # in every generation key: a change to how rows share passes changes bf16 outputs

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
        self._prefixes: dict[tuple[int, ...], Any] = {}  # see _prefix_cache

    def _render(self, conversation: list[Message], system_prompt: str | None = None, prefill: str = "") -> str:
        msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + conversation
        text: str = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return text + prefill

    def _tokens(self, text: str) -> list[int]:
        ids: list[int] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids

    def _prompt_limit(self, reserve: int, cap: int | None = None) -> int | None:
        """Most prompt tokens that leave `reserve` positions of the model's context free, and at most `cap`."""
        context = getattr(self.model.config, "max_position_embeddings", None)
        limits = [context - reserve] if context else []
        if cap is not None:
            limits.append(cap)
        return min(limits, default=None)

    def encode(
        self, conversation: list[Message], system_prompt: str | None = None, prefill: str = "",
        limit: int | None = None,
    ) -> tuple[list[int], bool]:
        """Prompt token ids and whether they were cut to fit `limit`. Only the last user message loses its tail
        (its head states the request) and the conversation is re-rendered, so the chat template stays intact."""
        ids = self._tokens(self._render(conversation, system_prompt, prefill))
        if limit is None or len(ids) <= limit:
            return ids, False
        msgs = list(conversation)
        users = [k for k, m in enumerate(msgs) if m["role"] == "user"]
        content = msgs[users[-1]]["content"] if users else ""
        while len(ids) > limit and content:
            enc = self.tokenizer(content, add_special_tokens=False, return_offsets_mapping=True)
            keep = len(enc["input_ids"]) - (len(ids) - limit)
            # boundary tokens can merge differently once re-rendered, hence the loop; each pass cuts ≥ 1 char
            content = content[: min(enc["offset_mapping"][keep][0], len(content) - 1)] if keep > 0 else ""
            msgs[users[-1]] = {**msgs[users[-1]], "content": content}
            ids = self._tokens(self._render(msgs, system_prompt, prefill))
        if len(ids) > limit:
            raise QuantsafeError(f"a conversation needs {len(ids)} prompt tokens even with its last user message "
                                 f"emptied; at most {limit} fit")
        return ids, True

    @property
    def device(self) -> torch.device:
        """Where the model's weights are; every input tensor goes there."""
        device: torch.device = self.model.device
        return device

    @torch.no_grad()
    def generate(
        self, conversations: Sequence[list[Message]], decoding: DecodingConfig,
        on_batch: Callable[[int], None] | None = None,
    ) -> list[Generation]:
        """Continuous batching: rows leave the batch as they finish and waiting prompts (longest first) take their
        places, so the weights read per step always serve a full batch; a batch that waited for its longest answer
        spent most steps on finished rows. Outputs depend on the whole call (which rows share each step), never
        on timing."""
        limit = self._prompt_limit(decoding.max_new_tokens, decoding.max_prompt_tokens)
        encoded = [self.encode(c, decoding.system_prompt, "", limit) for c in conversations]
        longest = max((len(ids) for ids, _ in encoded), default=0)
        rows = generation_rows(self.model, decoding.batch_size, longest + decoding.max_new_tokens)
        prompts = [ids for ids, _ in encoded]
        prefix = _common_prefix(prompts)
        if prefix and not _plain_cache(self._prefix_cache(prefix)):
            prefix = []  # a sliding window counts cache columns: padding between prefix and prompt would shift it
        waiting = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
        new: list[list[int]] = [[] for _ in encoded]
        finished = [False] * len(encoded)
        torch.manual_seed(decoding.seed)
        live: _Live | None = None
        while waiting or live is not None:
            if waiting and (live is None or (live.mergeable and rows - len(live.items) >= rows * REFILL_AT)):
                joining = waiting[: _admit([len(prompts[i]) for i in waiting], live, rows, decoding)]
                del waiting[: len(joining)]
                # in groups of similar length (they are sorted): one padded group would mostly encode padding
                groups = _batches([len(prompts[i]) for i in joining], len(joining), PREFILL_TOKENS)
                for n, group in enumerate(groups):
                    if live is not None and not live.mergeable:  # its cache takes no rows in: the rest wait
                        waiting[:0] = [joining[k] for g in groups[n:] for k in g]
                        break
                    live = self._prefill([prompts[joining[k]] for k in group], [joining[k] for k in group], prefix,
                                         live)
            assert live is not None  # admission takes at least one row when none is live
            tokens = _pick(live.logits, decoding)
            done: list[int] = []
            for k, (item, tok) in enumerate(zip(live.items, tokens.tolist(), strict=True)):
                if tok in self.eos_ids:
                    finished[item] = True
                else:
                    new[item].append(tok)
                if finished[item] or len(new[item]) >= decoding.max_new_tokens:
                    done.append(k)
            if done:
                gone = set(done)
                keep = [k for k in range(len(live.items)) if k not in gone]
                live = live.keep(keep) if keep else None
                tokens = tokens[keep]
                if on_batch:
                    on_batch(len(done))
            if live is not None:
                live.step(self.model, tokens)
        return [Generation(text=self.tokenizer.decode(toks, skip_special_tokens=True).strip(),
                           n_prompt_tokens=len(ids), n_new_tokens=len(toks), finished=fin, truncated=cut)
                for (ids, cut), toks, fin in zip(encoded, new, finished, strict=True)]

    def _prefill(self, prompts: list[list[int]], items: list[int], prefix: list[int], live: _Live | None) -> _Live:
        """Encode prompts (those of `items`) as one batch and add them to the live rows. Their common `prefix`
        (the chat template's system turn) comes from the prefix cache; each row's own tokens follow it after left
        padding, so every row ends at the last column."""
        enc = self.tokenizer.pad({"input_ids": [ids[len(prefix):] for ids in prompts]}, return_tensors="pt")
        own = enc["attention_mask"].to(self.device)
        positions = len(prefix) + (own.cumsum(-1) - 1).clamp(min=0)
        cache = None
        if prefix:
            cache = copy.deepcopy(self._prefix_cache(prefix))
            cache.batch_repeat_interleave(len(prompts))
        mask = torch.cat([own.new_ones(len(prompts), len(prefix)), own], dim=1)
        out = self.model(input_ids=enc["input_ids"].to(self.device), attention_mask=mask, position_ids=positions,
                         cache=cache, use_cache=True, logits_to_keep=1)
        fresh = _Live(items, out.cache, mask, positions[:, -1] + 1, out.logits[:, -1])
        return fresh if live is None else live.merge(fresh)

    def candidate_tokens(self, candidates: Sequence[str]) -> list[list[int]]:
        """Each candidate's token ids; two candidates with the same ids could not be told apart."""
        ids = [self._tokens(c) for c in candidates]
        if not ids or not all(ids) or len(set(map(tuple, ids))) != len(ids):
            raise ValueError(f"candidates {list(candidates)} must be non-empty with distinct token sequences: {ids}")
        return ids

    @torch.no_grad()
    def next_token_logprobs(
        self, conversations: Sequence[list[Message]], candidates: Sequence[str], prefill: str = "",
        batch_size: int = 8, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        shared_chars: Sequence[int] | None = None,
    ) -> list[dict[str, float]]:
        """Sum of log-probs of each candidate's tokens after the prefill, so a label split into several tokens
        is read whole. Candidates sharing all but their last token share one row (item + those tokens); logits
        are computed only at the positions read. A row's shared part (its earlier turns, e.g. a judge's few-shot
        turns, and the first `shared_chars[i]` characters of its last message, e.g. SafetyBench's five examples)
        is encoded once per distinct text and its KV cache reused."""
        cand_ids = self.candidate_tokens(candidates)
        limit = self._prompt_limit(max(map(len, cand_ids)) - 1)
        encoded = [self.encode(c, None, prefill, limit) for c in conversations]
        if not encoded:
            return []
        n_cut = sum(cut for _, cut in encoded)
        if n_cut:
            log.warning("%s: cut the last user message of %d of %d inputs to fit the context (%s prompt tokens)",
                        self.name, n_cut, len(encoded), limit)
        groups: dict[tuple[int, ...], list[int]] = {}
        for j, ids in enumerate(cand_ids):
            groups.setdefault(tuple(ids[:-1]), []).append(j)
        rows = [_Row(i, ids + list(head), members) for i, (ids, _) in enumerate(encoded)
                for head, members in groups.items()]
        # each row's split point is a function of the row alone, so its scores never depend on which other rows
        # share its call; rows whose shared parts are the same token sequence share one KV cache
        chars = list(shared_chars) if shared_chars is not None else [0] * len(encoded)
        splits = [self._shared_len(c, ids, prefill, n) for c, (ids, _), n in zip(conversations, encoded, chars,
                                                                                 strict=True)]
        by_prefix: dict[tuple[int, ...], list[int]] = {}
        for r, row in enumerate(rows):
            n = splits[row.item]
            by_prefix.setdefault(tuple(row.ids[:n]) if n >= MIN_SHARED_PREFIX else (), []).append(r)
        scores = [[0.0] * len(candidates) for _ in encoded]
        for prefix, members in by_prefix.items():
            prefix_cache = self._prefix_cache(list(prefix)) if prefix else None
            for batch in _batches([len(rows[r].ids) - len(prefix) for r in members], batch_size, max_batch_tokens):
                self._score_rows([rows[members[k]] for k in batch], len(prefix), prefix_cache, cand_ids, scores)
        return [dict(zip(candidates, s, strict=True)) for s in scores]

    def _score_rows(self, rows: Sequence[_Row], shared: int, prefix_cache: Any, cand_ids: list[list[int]],
                    scores: list[list[float]]) -> None:
        """One forward pass over rows that share their first `shared` tokens (cached in prefix_cache)."""
        pad = self.tokenizer.pad_token_id
        own = [r.ids[shared:] for r in rows]
        n_read = [len(cand_ids[r.members[0]]) for r in rows]
        width, reads = max(map(len, own)), max(n_read)
        # right padding: causal attention keeps real tokens blind to the pads after them
        input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in own], device=self.device)
        mask = torch.tensor([[1] * (shared + len(s)) + [0] * (width - len(s)) for s in own], device=self.device)
        # each row reads its last n positions; shorter rows repeat their last one to fill the tensor
        keep = torch.tensor([[len(s) - n + min(m, n - 1) for m in range(reads)]
                             for s, n in zip(own, n_read, strict=True)], device=self.device)
        kwargs: dict[str, Any] = {}
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(len(rows))
            kwargs["cache"] = cache
        logits = self.model(input_ids=input_ids, attention_mask=mask, logits_to_keep=keep, **kwargs).logits
        if logits.shape[1] != reads:
            raise QuantsafeError(f"{type(self.model).__name__} ignores logits_to_keep; scoring needs a "
                                 "transformers causal LM whose forward takes it")
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        for k, row in enumerate(rows):
            for j in row.members:
                toks = cand_ids[j]
                scores[row.item][j] = float(logp[k, torch.arange(len(toks)), torch.tensor(toks)].sum())

    def _shared_len(self, conversation: list[Message], ids: list[int], prefill: str, chars: int) -> int:
        """How many leading tokens of a row are material other rows may share (a function of the row alone, so
        its scores never depend on its company); its last prompt token is always its own: logits are read there."""
        n = self._earlier_turns_len(conversation, ids)
        if chars > 0:
            n = max(n, self._context_len(conversation, ids, prefill, chars))
        return min(n, len(ids) - 1)

    def _context_len(self, conversation: list[Message], ids: list[int], prefill: str, chars: int) -> int:
        """Tokens before character `chars` of the last message, or 0 when no token boundary falls exactly there
        (a merge across it) or the message was cut to fit the context."""
        content = conversation[-1]["content"]
        text = self._render(conversation, None, prefill)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if enc["input_ids"] != ids or not 0 < chars < len(content):
            return 0
        start = text.rfind(content) + chars
        for k, (begin, _end) in enumerate(enc["offset_mapping"]):
            if begin >= start:
                return k if begin == start else 0
        return 0

    def _earlier_turns_len(self, conversation: list[Message], ids: list[int]) -> int:
        """Tokens before the last message (few-shot turns, system prompt), or 0 if they are not a token prefix."""
        if len(conversation) < 2:
            return 0
        head = self._tokens(self.tokenizer.apply_chat_template(conversation[:-1], tokenize=False))
        return len(head) if ids[: len(head)] == head else 0

    def _prefix_cache(self, prefix: list[int]) -> Any:
        """The KV cache of a prefix, computed once and kept for later calls (few-shot turns of a judge)."""
        key = tuple(prefix)
        if key not in self._prefixes:
            if len(self._prefixes) >= PREFIX_CACHE_SIZE:
                del self._prefixes[next(iter(self._prefixes))]
            self._prefixes[key] = self.model(input_ids=torch.tensor([prefix], device=self.device), use_cache=True,
                                             logits_to_keep=1).cache
        return self._prefixes[key]


def _batches(lengths: Sequence[int], batch_size: int, max_tokens: int) -> list[list[int]]:
    """Indices longest first (padding stays small, OOM shows early), cut so a batch holds at most batch_size rows
    and rows x its longest ≤ max_tokens; a row over the budget runs alone."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        cur = batches[-1] if batches else []
        if cur and len(cur) < batch_size and (len(cur) + 1) * lengths[cur[0]] <= max_tokens:
            cur.append(i)
        else:
            batches.append([i])
    return batches



def _plain_cache(cache: Any) -> bool:
    """Whether every layer of a KV cache holds all its columns (full attention): only such a cache can take in
    new rows padded to its width or share a prefix across a gap; sliding-window or linear-attention layers keep
    other state."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None]))


def _common_prefix(prompts: Sequence[list[int]]) -> list[int]:
    """The tokens all prompts start with (none for a lone prompt), leaving each at least one of its own: its
    logits start the answer."""
    if len(prompts) < 2:
        return []
    n = min(len(p) for p in prompts) - 1
    first = prompts[0]
    for other in prompts[1:]:
        n = next((k for k in range(n) if other[k] != first[k]), n)
    return first[:n]


def _admit(waiting: Sequence[int], live: _Live | None, rows: int, decoding: DecodingConfig) -> int:
    """How many of the waiting prompts (lengths, longest first) join now: free rows, and at most
    decoding.max_batch_tokens cache positions once every row has its answer; a prompt over that budget runs alone."""
    n_live, width = (len(live.items), live.mask.shape[1]) if live is not None else (0, 0)
    admit = 0
    while admit < len(waiting) and n_live + admit < rows:
        need = (n_live + admit + 1) * (max(width, waiting[0]) + decoding.max_new_tokens)
        if need > decoding.max_batch_tokens and n_live + admit > 0:
            break
        admit += 1
    return admit


def _pick(logits: torch.Tensor, decoding: DecodingConfig) -> torch.Tensor:
    """Next token per row: argmax (in the logits' own dtype: widening is exact, so the same token, without
    copying rows × vocabulary), or a draw from the temperature-scaled nucleus (top_p) of the distribution."""
    if decoding.greedy:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / decoding.temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs > decoding.top_p  # the most likely token is always inside
    sorted_probs[outside] = 0.0
    return order.gather(-1, torch.multinomial(sorted_probs, 1)).squeeze(-1)


class _Live:
    """Rows being decoded together: which item each is, their shared KV cache, attention mask (left padding, plus
    the gaps where a row joined a wider cache), next positions and last logits."""

    def __init__(self, items: list[int], cache: Any, mask: torch.Tensor, positions: torch.Tensor,
                 logits: torch.Tensor):
        self.items, self.cache, self.mask, self.positions, self.logits = items, cache, mask, positions, logits
        self.mergeable = _plain_cache(cache)  # else such models decode batch after batch

    def step(self, model: Any, tokens: torch.Tensor) -> None:
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.items), 1)], dim=1)
        self.logits = model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.positions[:, None],
                            cache=self.cache, use_cache=True).logits[:, -1]
        self.positions = self.positions + 1

    def keep(self, rows: list[int]) -> _Live:
        """Only `rows`; leading cache columns no remaining row attends to are cut off."""
        index = torch.tensor(rows, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.items = [self.items[k] for k in rows]
        self.mask, self.positions, self.logits = self.mask[index], self.positions[index], self.logits[index]
        unused = int(self.mask.any(0).int().argmax())
        if unused and self.mergeable:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., unused:, :], layer.values[..., unused:, :]
            self.mask = self.mask[:, unused:]
        return self

    def merge(self, other: _Live) -> _Live:
        """Both sets of rows in one cache, the narrower left-padded (masked) to the wider's width."""
        width = max(self.mask.shape[1], other.mask.shape[1])

        def pad(t: torch.Tensor, dim_from_end: int) -> torch.Tensor:
            short = width - t.shape[-dim_from_end]
            return torch.nn.functional.pad(t, (0, 0) * (dim_from_end - 1) + (short, 0)) if short else t

        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([pad(mine.keys, 2), pad(theirs.keys, 2)])
            mine.values = torch.cat([pad(mine.values, 2), pad(theirs.values, 2)])
        self.mask = torch.cat([pad(self.mask, 1), pad(other.mask, 1)])
        self.items = self.items + other.items
        self.positions = torch.cat([self.positions, other.positions])
        self.logits = torch.cat([self.logits, other.logits])
        return self
