"""The persona engine: async API over llama.cpp worker threads (bases loaded per persona, adapters swapped per request)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from core.chatformat import Utterance
from core.errors import UserFacingError
from core.hostshare import ServingMarks
from core.settings import Settings
from inference.adapters import AdapterCache, AdapterKey
from inference.bases import BasePool, WorkerSlot
from inference.cleaning import StreamCleaner
from inference.errors import AdapterError, EngineClosedError, InferenceError, RetrievalError
from inference.places import LetGo
from inference.prompting import RETRIEVAL_REPEAT_PENALTY, build_prompt, trained_style
from inference.requests import GenParams, PersonaRequest
from inference.runtime import BaseModel, GenStats, KVStates, Session, default_threads
from inference.scheduler import QueuedReply, Scheduler
from inference.shape import MessageShape, Polish, fitted

log = logging.getLogger(__name__)


class ExampleSource(Protocol):
    """What the engine needs from the retrieval persona: the member's own messages most like the context."""

    async def examples(self, member_id: str, context: Sequence[Utterance], k: int) -> list[str]: ...

    async def shape(self, member_id: str) -> MessageShape | None: ...

    def forget(self, member_id: str) -> bool | None: ...


class ReplyStream:
    """Async iterator of a reply's text chunks; submits on first iteration, cancels the work when abandoned."""

    def __init__(
        self, engine: Engine, persona: PersonaRequest, context: Sequence[Utterance], params: GenParams
    ):
        self._engine = engine
        self._persona = persona
        self._context = tuple(context)
        self._params = params
        self._job: QueuedReply | None = None
        self._done = False
        self.stats: GenStats | None = None

    def __aiter__(self) -> ReplyStream:
        return self

    async def __anext__(self) -> str:
        if self._done:
            raise StopAsyncIteration
        try:
            if self._job is None:
                self._job = await self._engine._submit(self._persona, self._context, self._params)
            while True:
                kind, value = await self._job.out.get()
                if kind == "chunk":
                    return str(value)
                self._done = True
                if kind == "done":
                    self.stats = value
                    raise StopAsyncIteration
                raise value
        except BaseException:
            # Cancelled, errored or finished: either way the worker must not keep generating for nobody.
            self._cancel()
            raise

    async def aclose(self) -> None:
        """Stop the reply early (the worker stops at its next token)."""
        self._cancel()

    async def text(self) -> str:
        """The whole reply as one string."""
        return "".join([chunk async for chunk in self])

    def _cancel(self) -> None:
        self._done = True
        job = self._job
        if job is not None and not job.cancelled():
            job.cancel_event.set()
            self._engine._discard(job)

    def __del__(self) -> None:
        job = self._job
        if job is not None:
            job.cancel_event.set()


class Engine:
    """Serves persona replies: `await start()`, then `reply(...)` from any coroutine, `await close()` at the end."""

    def __init__(
        self, settings: Settings, base_gguf: Path | None = None, *, retriever: ExampleSource | None = None
    ):
        self.settings = settings
        self.cfg = settings.inference
        self.base_path = Path(base_gguf) if base_gguf else None
        self.retriever = retriever
        # Every base this engine has loaded (each persona is served on the base its adapter was trained on).
        self.pool: BasePool | None = None
        self.slots: list[WorkerSlot] = []
        self._idle_states = KVStates(self.cfg.kv_states_kept)
        self._scheduler = Scheduler(self.cfg.queue_size)
        self._threads: list[threading.Thread] = []
        self._started = False
        self._running: set[QueuedReply] = set()
        # The last generations' costs, for the benchmark and for operators (bounded: never grows with traffic).
        self.recent: deque[GenStats] = deque(maxlen=256)
        # Each adapter set's trained prompt style, by its key (paths + mtimes: a retrained file is read again).
        self._styles: dict[tuple[tuple[str, int, float], ...], str] = {}
        # Tells trainers on this host when a reply is being made, so they leave the cores to it (hostshare).
        self.marks = ServingMarks(settings.share_dir, default_threads(self.cfg.n_threads))

    async def start(self) -> None:
        """Load the base model and start the worker threads (model loading runs off the event loop)."""
        if self._started:
            return
        path = self.base_path or self.settings.base_gguf_path()
        await asyncio.to_thread(self._load, path)
        self.marks.open()
        for i, slot in enumerate(self.slots):
            t = threading.Thread(target=self._work, args=(slot,), name=f"doppel-infer-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        self._started = True

    def _load(self, path: Path) -> None:
        self.pool = BasePool(self.settings, path)
        self.pool.preload()
        self.slots = [WorkerSlot(self.pool, i) for i in range(max(1, self.cfg.workers))]
        for slot in self.slots:
            slot.bind(None)  # each worker's context on the default base is made now, not at the first reply

    @property
    def base(self) -> BaseModel | None:
        """The default base model (loaded while the engine runs)."""
        held = self.pool.get(self.pool.default) if self.pool is not None else None
        return held.base if held is not None else None

    @property
    def adapters(self) -> AdapterCache | None:
        """The default base's loaded adapters."""
        held = self.pool.get(self.pool.default) if self.pool is not None else None
        return held.adapters if held is not None else None

    @property
    def states(self) -> KVStates:
        """The default base's saved KV states."""
        held = self.pool.get(self.pool.default) if self.pool is not None else None
        return held.states if held is not None else self._idle_states

    @property
    def sessions(self) -> list[Session]:
        """The workers' current sessions."""
        return [slot.session for slot in self.slots if slot.session is not None]

    async def close(self) -> None:
        """Fail what is still queued, stop the workers, free contexts, adapters and the model."""
        closing = EngineClosedError("the persona engine is shutting down")
        for job in self._scheduler.close():
            job.send("error", closing)
        for job in list(self._running):
            # A reply cut short by shutdown ends with an error, never as if it were complete.
            job.send("error", closing)
            job.cancel_event.set()
        for t in self._threads:
            await asyncio.to_thread(t.join)
        self._threads = []
        for slot in self.slots:
            slot.unbind()
        self.slots = []
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        self.marks.close()
        self._started = False

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def reply(
        self, persona: PersonaRequest, context: Sequence[Utterance], params: GenParams | None = None
    ) -> ReplyStream:
        """Stream the persona's next message as text chunks (raises BusyError on iteration when the queue is full)."""
        if params is None:
            params = GenParams(max_tokens=self.cfg.max_tokens, temperature=self.cfg.temperature)
        return ReplyStream(self, persona, context, params)

    def pending(self) -> int:
        """Requests waiting for a worker."""
        return self._scheduler.pending()

    def forget(self, member_id: str) -> None:
        """Drop everything held in memory that may carry the member's words: retrieval cache, saved KV states."""
        if self.retriever is not None:
            self.retriever.forget(member_id)
        # KV states encode whole channel contexts, which may quote the member: simplest correct thing is all of them.
        self._idle_states.clear()
        if self.pool is not None:
            self.pool.forget()

    async def let_go(self, member_id: str, doomed: Callable[[str], bool]) -> LetGo:
        """Erasure: stop replies using the doomed adapters, reset the contexts that have them set, free them."""
        held = bool(self.retriever.forget(member_id)) if self.retriever is not None else False
        self.forget(member_id)
        if self.pool is None:
            return LetGo(held, True)
        held = await asyncio.to_thread(self._let_go, doomed) or held
        still = [p for base in self.pool.held() for p in base.adapters.drop(doomed)]
        if still:
            return LetGo(True, False, f"still held after the replies using them stopped: {', '.join(still)}")
        return LetGo(held, True)

    def _let_go(self, doomed: Callable[[str], bool]) -> bool:
        def uses(key: AdapterKey) -> bool:
            return any(doomed(path) for path, _, _ in key)

        erased = AdapterError("this persona's adapter was erased")
        for job in list(self._running):
            if uses(job.key):
                job.send("error", erased)
                job.cancel_event.set()
        held = False
        for slot in self.slots:
            with slot.lock:  # the worker is between replies: its contexts are ours to reset
                for base in self.pool.held() if self.pool is not None else []:
                    session = base.sessions.get(slot.index)
                    if session is not None and uses(session.key):
                        held = True
                        session.use(())
        for base in self.pool.held() if self.pool is not None else []:
            held = held or any(doomed(p) for p in base.adapters.loaded())
        return held

    async def _submit(
        self, persona: PersonaRequest, context: Sequence[Utterance], params: GenParams
    ) -> QueuedReply:
        if not self._started or self.pool is None:
            raise EngineClosedError("the persona engine is not running")
        persona.validate()
        params.validate()
        base = self.pool.resolve(persona.adapters if persona.uses_adapters else ())
        if self.cfg.fit_shape:
            params = await fitted(self.retriever, persona, params, self.cfg.fit_habits)
        examples: list[str] = []
        if persona.uses_retrieval:
            if self.retriever is None:
                raise RetrievalError("the retrieval persona is not available (no embedding index configured)")
            with self.marks.generating():  # the query's encoding is part of the reply's time to first token
                examples = await self.retriever.examples(persona.member_id, context, self.cfg.retrieval_k)
            if examples and params.repeat_penalty == 1.0:
                # The member's examples sit in the prompt: without a penalty a small base copies or loops on them.
                params = dataclasses.replace(params, repeat_penalty=RETRIEVAL_REPEAT_PENALTY)
        job = QueuedReply(
            persona, context, params, examples, persona.adapter_key(), asyncio.get_running_loop()
        )
        job.base = base
        self._scheduler.submit(job)
        return job

    def _discard(self, job: QueuedReply) -> None:
        self._scheduler.discard(job)

    def _work(self, session: WorkerSlot) -> None:
        while True:
            job = self._scheduler.take(session.key)
            if job is None:
                return
            if job.cancelled():
                continue
            self._running.add(job)
            try:
                with session.lock, self.marks.generating():
                    stats = self._serve(session.bind(job.base), job)
                job.send("done", stats)
            except UserFacingError as exc:
                job.send("error", exc)
            except Exception as exc:
                log.exception("inference request %s failed", job.id)
                job.send("error", InferenceError(f"generation failed: {type(exc).__name__}: {exc}"))
            finally:
                self._running.discard(job)

    def _serve(self, session: Session, job: QueuedReply) -> GenStats:
        p = job.persona
        budget = min(self.cfg.prompt_token_budget, session.n_ctx - job.params.max_tokens - 1)
        style = self._styles.get(job.key)
        if style is None:
            style = trained_style(p.adapters if p.uses_adapters else ())
            if len(self._styles) > 256:  # bounded: retrained adapters get new keys
                self._styles.clear()
            self._styles[job.key] = style
        prompt = build_prompt(
            session.base.format,
            session.base.tokenize,
            persona_id=p.member_id,
            persona_name=p.name,
            channel_name=p.channel_name,
            context=job.context,
            budget=budget,
            examples=job.examples,
            style=style,
        )
        cleaner = StreamCleaner(p.name, prompt.speakers, job.params.max_lines)
        polish = Polish(job.params, prompt.speakers, self.cfg.whole_sentences)

        def on_text(text: str) -> bool:
            safe = polish.feed(cleaner.feed(text))
            if safe:
                job.send("chunk", safe)
            return not cleaner.stopped

        stats = session.generate(job.key, prompt.tokens, job.params, on_text, job.cancelled)
        self.recent.append(stats)
        rest = polish.feed(cleaner.finish()) + polish.finish(cut=stats.stop_reason == "length")
        if rest and not job.cancelled():
            job.send("chunk", rest)
        return stats
