"""The llama.cpp side: one base model shared by sessions, each session one context that serves requests in turn."""

from __future__ import annotations

import codecs
import ctypes
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.chatformat import ChatFormat
from inference.adapters import AdapterCache, AdapterKey, as_arrays
from inference.errors import InferenceError
from inference.requests import GenParams

# A saved KV state only pays off when it spares a real prefill; tiny prefixes are cheaper to recompute.
MIN_REUSE_TOKENS = 8


def default_threads(n_threads: int) -> int:
    """Threads for llama.cpp: the configured count, or the machine's cores (at most 8: decode is memory-bound)."""
    return n_threads if n_threads > 0 else max(1, min(8, os.cpu_count() or 1))


class BaseModel:
    """The base GGUF, loaded once; its chat format is the one training used (see `ChatFormat.from_gguf`)."""

    def __init__(
        self,
        path: Path,
        chat_template: str | None = None,
        template_source: str | None = None,
        *,
        vocab_only: bool = False,
    ) -> None:
        import llama_cpp
        from llama_cpp import _internals

        if not path.is_file():
            raise InferenceError(f"base model not found: {path}")
        from llama_cpp import _logger

        # llama.cpp logs every graph node at debug level through a process-wide callback; errors only.
        _logger.set_verbose(False)
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        # A client of a persona server needs the tokenizer and chat format only: the weights live on the server.
        params.vocab_only = vocab_only
        self.path = path
        self.model = _internals.LlamaModel(path_model=str(path), params=params, verbose=False)
        self.metadata: dict[str, str] = self.model.metadata()
        self.vocab = self.model.vocab
        # The same function the trainer renders its dataset with: a GGUF without a chat template gets the same
        # default (or the template chosen at add-base) here as there, so serving never disagrees on a token.
        try:
            self.format = ChatFormat.from_gguf(path, template=chat_template, source=template_source)
        except ValueError as exc:
            self.model.close()
            raise InferenceError(str(exc)) from None
        self.stop_ids = self._stop_ids(self.format.stop)

    def _stop_ids(self, stops: Sequence[str]) -> frozenset[int]:
        ids = set()
        for s in stops:
            toks = self.tokenize(s)
            if len(toks) == 1:
                ids.add(toks[0])
        return frozenset(ids)

    def tokenize(self, text: str) -> list[int]:
        """Tokens of `text`, special tokens parsed (the chat template's markers are single tokens)."""
        return list(self.model.tokenize(text.encode("utf-8"), add_bos=True, special=True))

    def piece(self, token: int) -> bytes:
        """The bytes of one token (special tokens render as nothing: they are never shown)."""
        import llama_cpp

        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def is_stop(self, token: int) -> bool:
        import llama_cpp

        return token in self.stop_ids or bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def close(self) -> None:
        self.model.close()


@dataclass
class _Saved:
    tokens: tuple[int, ...]
    data: Any
    size: int


class KVStates:
    """Saved KV states keyed by (adapter set, token prefix): a persona speaking again skips most of its prefill."""

    def __init__(self, kept: int) -> None:
        self.kept = kept
        self._lock = threading.Lock()
        self._states: OrderedDict[tuple[AdapterKey, tuple[int, ...]], _Saved] = OrderedDict()
        self.restores = 0

    def put(self, key: AdapterKey, tokens: Sequence[int], data: Any, size: int) -> None:
        if self.kept <= 0:
            return
        toks = tuple(tokens)
        with self._lock:
            # A saved prefix of the new state is now redundant: the longer one serves every request it served.
            for k in [k for k in self._states if k[0] == key and toks[: len(k[1])] == k[1]]:
                del self._states[k]
            self._states[(key, toks)] = _Saved(toks, data, size)
            while len(self._states) > self.kept:
                self._states.popitem(last=False)

    def best(self, key: AdapterKey, prompt: Sequence[int]) -> tuple[_Saved, int] | None:
        """The saved state of this adapter set sharing the longest prefix with `prompt`, and that length."""
        found: tuple[_Saved, int] | None = None
        with self._lock:
            for (k, _), saved in self._states.items():
                if k != key:
                    continue
                n = common_prefix(saved.tokens, prompt)
                if n >= MIN_REUSE_TOKENS and (found is None or n > found[1]):
                    found = (saved, n)
            if found is not None:
                self._states.move_to_end((key, found[0].tokens))
        return found

    def clear(self) -> None:
        with self._lock:
            self._states.clear()

    def __len__(self) -> int:
        return len(self._states)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class GenStats:
    """What one generation cost: tokens reused vs prefilled, time to first token, decode speed."""

    prompt_tokens: int = 0
    reused_tokens: int = 0
    restored: bool = False
    generated: int = 0
    started: float = 0.0
    first_token: float = 0.0
    finished: float = 0.0
    stop_reason: str = ""

    @property
    def decode_tokens_per_s(self) -> float:
        span = self.finished - self.first_token
        return (self.generated - 1) / span if self.generated > 1 and span > 0 else 0.0


class Session:
    """One llama context on the shared model; serves one request at a time (owned by one worker thread)."""

    def __init__(
        self, base: BaseModel, adapters: AdapterCache, states: KVStates, n_ctx: int, n_threads: int
    ) -> None:
        import llama_cpp
        from llama_cpp import _internals

        self.base = base
        self.adapters = adapters
        self.states = states
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = min(n_ctx, 512)
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = n_threads
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.no_perf = True
        self.ctx = _internals.LlamaContext(model=base.model, params=params, verbose=False)
        self.n_ctx = self.ctx.n_ctx()
        self.n_batch = int(params.n_batch)
        self.batch = _internals.LlamaBatch(n_tokens=self.n_batch, embd=0, n_seq_max=1, verbose=False)
        self.key: AdapterKey = ()
        self.tokens: list[int] = []
        self.flush_requested = False

    def use(self, key: AdapterKey) -> bool:
        """Apply adapter set `key` to this context; True when it changed (the KV content is then invalid)."""
        import llama_cpp

        if self.flush_requested:
            self.flush_requested = False
            self.tokens = []
            self.ctx.kv_cache_clear()
        if key == self.key:
            return False
        pairs = self.adapters.acquire(key) if key else []
        handles, scales, n = as_arrays(pairs)
        if llama_cpp.llama_set_adapters_lora(self.ctx.ctx, handles if n else None, n, scales if n else None):
            self.adapters.release(key)
            raise InferenceError("llama.cpp refused the adapter set")
        self._save_current()
        old, self.key = self.key, key
        if old:
            self.adapters.release(old)
        # The cached tokens were computed under other weights: keeping them would leak the old persona.
        self.tokens = []
        self.ctx.kv_cache_clear()
        return True

    def _save_current(self) -> None:
        import llama_cpp

        if len(self.tokens) < MIN_REUSE_TOKENS or self.states.kept <= 0:
            return
        size = llama_cpp.llama_state_seq_get_size(self.ctx.ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        n = llama_cpp.llama_state_seq_get_data(self.ctx.ctx, buf, size, 0)
        if n:
            self.states.put(self.key, self.tokens, buf, n)

    def _restore(self, prompt: Sequence[int]) -> bool:
        import llama_cpp

        found = self.states.best(self.key, prompt)
        if found is None or found[1] <= common_prefix(self.tokens, prompt):
            return False
        saved, _ = found
        self.ctx.kv_cache_clear()
        if not llama_cpp.llama_state_seq_set_data(self.ctx.ctx, saved.data, saved.size, 0):
            self.ctx.kv_cache_clear()
            self.tokens = []
            return False
        self.tokens = list(saved.tokens)
        self.states.restores += 1
        return True

    def _eval(self, tokens: Sequence[int]) -> None:
        for i in range(0, len(tokens), self.n_batch):
            chunk = tokens[i : i + self.n_batch]
            self.batch.set_batch(chunk, n_past=len(self.tokens), logits_all=False)
            self.ctx.decode(self.batch)
            self.tokens.extend(chunk)

    def generate(
        self,
        key: AdapterKey,
        prompt: Sequence[int],
        params: GenParams,
        on_text: Callable[[str], bool],
        cancelled: Callable[[], bool],
    ) -> GenStats:
        """Prefill what is not cached, then sample until a stop; `on_text` returning False stops early."""
        from llama_cpp import _internals

        stats = GenStats(prompt_tokens=len(prompt), started=time.perf_counter())
        if len(prompt) + 1 >= self.n_ctx:
            raise InferenceError(f"prompt of {len(prompt)} tokens does not fit the context of {self.n_ctx}")
        self.use(key)
        stats.restored = self._restore(prompt)
        # At least the last prompt token is evaluated again: its logits start the reply.
        keep = min(common_prefix(self.tokens, prompt), len(prompt) - 1)
        stats.reused_tokens = keep
        self.ctx.kv_cache_seq_rm(0, keep, -1)
        del self.tokens[keep:]
        try:
            self._eval(prompt[keep:])
        except BaseException:
            self.tokens = []
            self.ctx.kv_cache_clear()
            raise
        sampler = _internals.LlamaSampler()
        if params.repeat_penalty != 1.0:
            sampler.add_penalties(self.base.model.n_vocab(), 64, params.repeat_penalty, 0.0, 0.0)
        if params.temperature <= 0:
            sampler.add_greedy()
        else:
            sampler.add_top_k(params.top_k)
            sampler.add_top_p(params.top_p, 1)
            sampler.add_min_p(params.min_p, 1)
            sampler.add_temp(params.temperature)
            seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
            sampler.add_dist(seed & 0xFFFFFFFF)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text_stops = tuple(s for s in params.stop if s)
        tail = ""
        try:
            for _ in range(params.max_tokens):
                if cancelled():
                    stats.stop_reason = "cancelled"
                    break
                token = sampler.sample(self.ctx, -1)
                if not stats.first_token:
                    stats.first_token = time.perf_counter()
                stats.generated += 1
                if self.base.is_stop(token):
                    stats.stop_reason = "stop"
                    break
                text = decoder.decode(self.base.piece(token))
                if text_stops:
                    tail += text
                    hit = min((i for i in (tail.find(s) for s in text_stops) if i >= 0), default=-1)
                    if hit >= 0:
                        on_text(tail[:hit])
                        stats.stop_reason = "stop"
                        break
                    hold = max(len(s) for s in text_stops) - 1
                    text, tail = tail[: max(0, len(tail) - hold)], tail[max(0, len(tail) - hold) :]
                if text and not on_text(text):
                    stats.stop_reason = "stop"
                    break
                if len(self.tokens) + 1 >= self.n_ctx:
                    stats.stop_reason = "context"
                    break
                self._eval([token])
            else:
                stats.stop_reason = "length"
            if tail and stats.stop_reason != "stop":
                on_text(tail)
        except BaseException:
            self.tokens = []
            self.ctx.kv_cache_clear()
            raise
        finally:
            sampler.close()
        stats.finished = time.perf_counter()
        return stats

    def close(self) -> None:
        if self.key:
            self.adapters.release(self.key)
            self.key = ()
        self.batch.close()
        self.ctx.close()
