"""Serving through a separate server: llama.cpp's llama-server (adapters given at its start, chosen per request)
or vLLM / SGLang (adapters loaded at run time under a stable versioned name), with the in-process engine's interface.

The prompt is the project's own, rendered here exactly as in process (chat format, trained style, the retrieval
persona's examples) and sent as a raw completion, so the server never applies a chat template of its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.chatformat import Utterance
from core.settings import BACKENDS, SERVER_FLAVOURS, Settings
from inference.bases import BaseRef, resolve_base
from inference.cleaning import StreamCleaner
from inference.errors import RequestError, RetrievalError, ServerError, ServerUnreachableError
from inference.places import LetGo
from inference.prompting import RETRIEVAL_REPEAT_PENALTY, Prompt, build_prompt, trained_style
from inference.requests import GenParams, PersonaRequest
from inference.shape import Polish, fitted

if TYPE_CHECKING:
    import aiohttp

    from inference.engine import Engine, ExampleSource
    from inference.runtime import BaseModel

log = logging.getLogger(__name__)


def check_choices(settings: Settings) -> None:
    """Raise ServerError for a backend or flavour this version does not know, or a server backend without a URL."""
    cfg = settings.inference
    if cfg.backend not in BACKENDS:
        raise ServerError(f"[inference] backend must be one of {', '.join(BACKENDS)}, got {cfg.backend!r}")
    if cfg.backend == "server":
        if cfg.server_flavour not in SERVER_FLAVOURS:
            raise ServerError(
                f"[inference] server_flavour must be one of {', '.join(SERVER_FLAVOURS)}, got {cfg.server_flavour!r}"
            )
        if not cfg.server_url.startswith(("http://", "https://")):
            raise ServerError("[inference] backend = 'server' needs server_url (http://host:port)")


def make_engine(settings: Settings, *, retriever: ExampleSource | None = None) -> Engine | ServerEngine:
    """The engine `[inference] backend` names: llama.cpp in this process, or a client of a persona server."""
    check_choices(settings)
    if settings.inference.backend == "server":
        return ServerEngine(settings, retriever=retriever)
    from inference.engine import Engine

    return Engine(settings, retriever=retriever)


def adapter_name(path: str, digest: str) -> str:
    """A published adapter's name on a vLLM/SGLang server: member, version and content hash (a changed file is a
    new name, never new weights under an old one)."""
    parts = Path(path).parts
    member, version = (
        (parts[-3], parts[-2].split("-")[0]) if len(parts) >= 3 else ("adapter", Path(path).stem)
    )
    return f"doppel-{member}-v{version}-{digest[:12]}"


class ServerEngine:
    """Persona replies from a server: `await start()`, `reply(...)`, `forget(member)`, `await close()`."""

    def __init__(
        self,
        settings: Settings,
        *,
        retriever: ExampleSource | None = None,
        url: str | None = None,
        flavour: str | None = None,
    ) -> None:
        self.settings = settings
        self.cfg = settings.inference
        self.url = (url or self.cfg.server_url).rstrip("/")
        self.flavour = flavour or self.cfg.server_flavour
        self.retriever = retriever
        self.default = settings.base_gguf_path().expanduser().resolve()
        self._http: aiohttp.ClientSession | None = None
        self._vocabs: dict[Path, BaseModel] = {}
        # llama.cpp: adapter path -> id (its position in the server's --lora list), as the server listed it for
        # the request being made: relearned before every request, since a restart can change the list and order.
        self._lora_ids: dict[str, int] = {}
        self._loaded: dict[str, str] = {}  # vLLM/SGLang: adapter name -> member id
        self._paths: dict[str, str] = {}  # vLLM/SGLang: adapter name -> the file it was loaded from
        self._digests: dict[tuple[str, int, int], str] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._answered = False  # this client has reached the server: a refused connection now means a restart

    async def start(self) -> None:
        """Open the HTTP client (the server may come up later: each reply says so while it is down)."""
        import aiohttp

        if self._http is None:
            timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=self.cfg.server_timeout_s)
            # A fresh connection per request: llama-server drops idle keep-alive connections, and a reused one
            # fails its next write ("Can not write request body").
            key = self.settings.server_api_key
            self._http = aiohttp.ClientSession(
                timeout=timeout,
                connector=aiohttp.TCPConnector(force_close=True),
                headers={"Authorization": f"Bearer {key}"} if key else None,
            )

    async def close(self) -> None:
        for task in list(self._tasks):
            await asyncio.gather(task, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
            self._http = None
        for vocab in self._vocabs.values():
            vocab.close()
        self._vocabs.clear()

    async def __aenter__(self) -> ServerEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # -- the engine interface ---------------------------------------------------------------------------------
    def reply(
        self, persona: PersonaRequest, context: Sequence[Utterance], params: GenParams | None = None
    ) -> AsyncIterator[str]:
        """Stream the persona's next message; closing the iterator closes the request (the server stops)."""
        if params is None:
            params = GenParams(max_tokens=self.cfg.max_tokens, temperature=self.cfg.temperature)
        return self._stream(persona, tuple(context), params)

    def forget(self, member_id: str) -> None:
        """Drop the member's retrieval cache and unload their adapters from the server (vLLM/SGLang)."""
        if self.retriever is not None:
            self.retriever.forget(member_id)
        names = [name for name, member in self._loaded.items() if member == member_id]
        for name in names:
            del self._loaded[name]
        if names and self._http is not None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop, so no client either: nothing is running to unload from
                return
            task = loop.create_task(self._unload(names))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if self.flavour == "llama.cpp" and any(Path(p).parts[-3:-2] == (member_id,) for p in self._lora_ids):
            # llama-server cannot drop an adapter while running; the file is erased, the process still holds it.
            log.warning(
                "llama-server at %s still holds member %s's adapter in memory: restart it without that --lora",
                self.url,
                member_id,
            )

    async def let_go(self, member_id: str, doomed: Callable[[str], bool]) -> LetGo:
        """Erasure from any process: drop the member's cached words, unload their adapters from a vLLM/SGLang
        server, and for llama-server say whether it still holds one (it cannot unload; `doppel serve` restarts)."""
        held = bool(self.retriever.forget(member_id)) if self.retriever is not None else False
        names = [name for name, member in self._loaded.items() if member == member_id]
        names += [n for n in self._paths if n not in names and doomed(self._paths[n])]
        for name in names:
            self._loaded.pop(name, None)
        failed = await self._unload(names) if names and self._http is not None else []
        if failed:
            return LetGo(
                True, False, f"the {self.flavour} server at {self.url} did not unload {', '.join(failed)}"
            )
        if self.flavour != "llama.cpp" or self._http is None:
            return LetGo(held or bool(names), True)
        # A managed server restarts without the adapter within moments; a hand-started one never lets it go.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(1.0, self.cfg.erasure_wait_s - 2.0)
        while True:
            try:
                listed = [str(a["path"]) for a in await self._json("GET", "/lora-adapters")]
            except ServerUnreachableError:
                listed = []  # restarting, or stopped: either way it holds nothing it could serve
            still = [p for p in listed if doomed(p)]
            if not still:
                return LetGo(held or bool(names), True)
            if loop.time() >= deadline:
                return LetGo(
                    True,
                    False,
                    f"llama-server at {self.url} still holds {', '.join(still)}: it cannot unload an adapter; "
                    "restart it without that --lora (`doppel serve` does so by itself)",
                )
            await asyncio.sleep(0.25)

    async def check(self) -> str:
        """One line on the server's state (for `doppel doctor`); ServerError when it is down or not a server."""
        path = "/health" if self.flavour == "llama.cpp" else "/v1/models"
        await self._json("GET", path)
        if self.flavour == "llama.cpp":
            adapters = await self._json("GET", "/lora-adapters")
            return f"llama.cpp server at {self.url} is up with {len(adapters)} adapter(s)"
        return f"{self.flavour} server at {self.url} is up"

    # -- one reply --------------------------------------------------------------------------------------------
    async def _stream(
        self, persona: PersonaRequest, context: tuple[Utterance, ...], params: GenParams
    ) -> AsyncIterator[str]:
        persona.validate()
        params.validate()
        base = resolve_base(self.settings, self.default, persona.adapters if persona.uses_adapters else ())
        vocab = await self._vocab(base)
        if self.cfg.fit_shape:
            params = await fitted(self.retriever, persona, params, self.cfg.fit_habits)
        examples: list[str] = []
        if persona.uses_retrieval:
            if self.retriever is None:
                raise RetrievalError("the retrieval persona is not available (no embedding index configured)")
            examples = await self.retriever.examples(persona.member_id, context, self.cfg.retrieval_k)
            if examples and params.repeat_penalty == 1.0:
                params = dataclasses.replace(params, repeat_penalty=RETRIEVAL_REPEAT_PENALTY)
        adapters = persona.adapters if persona.uses_adapters else ()
        prompt = build_prompt(
            vocab.format,
            vocab.tokenize,
            persona_id=persona.member_id,
            persona_name=persona.name,
            channel_name=persona.channel_name,
            context=context,
            budget=min(self.cfg.prompt_token_budget, self.cfg.n_ctx - params.max_tokens - 1),
            examples=examples,
            style=trained_style(adapters),
        )
        stops = [s for s in (*vocab.format.stop, *params.stop) if s]
        if self.flavour == "llama.cpp":
            path, body, field = "/completion", {}, "content"
        else:
            path, body, field = (
                "/v1/completions",
                await self._openai_body(persona, prompt, params, stops, vocab.stop_ids),
                "text",
            )
        cleaner = StreamCleaner(persona.name, prompt.speakers, params.max_lines)
        polish = Polish(params, prompt.speakers, self.cfg.whole_sentences)
        ending: list[str] = []  # why the server stopped ("length" when the budget ran out)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, self.cfg.server_restart_wait_s)
        while True:
            started = False
            try:
                if self.flavour == "llama.cpp":
                    # Learned again for this request: the ids of a restarted server are not the old ones.
                    body = await self._llama_body(prompt, params, adapters, stops)
                async for text in self._sse(path, body, field, vocab.stop_ids, ending):
                    started = True
                    safe = polish.feed(cleaner.feed(text))
                    if safe:
                        yield safe
                    if cleaner.stopped:
                        return
                break
            except ServerUnreachableError as exc:
                # A server restarting (a persona published or erased) refuses connections for a moment: a reply
                # that has not started waits for it instead of failing; one cut mid-stream cannot be resumed. A
                # server this client never reached is down, not restarting: that is said at once.
                if started or loop.time() >= deadline or not (self._answered or exc.loading):
                    raise
                await asyncio.sleep(0.25)
        rest = polish.feed(cleaner.finish()) + polish.finish(cut="length" in ending)
        if rest:
            yield rest

    async def _llama_body(
        self, prompt: Prompt, params: GenParams, adapters: Sequence[tuple[str, float]], stops: list[str]
    ) -> dict[str, Any]:
        wanted = {str(Path(p).resolve()): float(w) for p, w in adapters}
        await self._refresh_loras()
        missing = [p for p in wanted if p not in self._lora_ids]
        if missing:
            raise ServerError(
                f"the llama.cpp server at {self.url} was not started with adapter {missing[0]}: it loads adapters "
                f"only at its start (add `--lora {missing[0]}` and restart it)"
            )
        body: dict[str, Any] = {
            # The project's tokens as they are: the server applies no template and adds no second BOS.
            "prompt": prompt.tokens,
            "n_predict": params.max_tokens,
            "stream": True,
            "stop": stops,
            # The ids come back with each chunk: a turn marker that is no end-of-generation token for llama.cpp
            # (ChatML's <|im_start|>) renders as no text, so only its id shows that the persona's turn is over.
            "return_tokens": True,
            # Every adapter the server holds is listed, also when the persona has none: llama-server applies an
            # empty list as every adapter at its start-up scale (1.0), and one left out keeps that scale.
            "lora": [{"id": i, "scale": wanted.get(p, 0.0)} for p, i in sorted(self._lora_ids.items())],
            **self._sampling(params),
            "repeat_penalty": params.repeat_penalty,
            "repeat_last_n": 64,
        }
        return body

    async def _openai_body(
        self,
        persona: PersonaRequest,
        prompt: Prompt,
        params: GenParams,
        stops: list[str],
        stop_ids: frozenset[int],
    ) -> dict[str, Any]:
        model = self.cfg.server_model or await self._first_model()
        if persona.uses_adapters:
            if len(persona.adapters) > 1:
                raise RequestError(f"a {self.flavour} server serves one adapter per request, not a blend")
            name = await self._ensure_loaded(persona.member_id, persona.adapters[0][0])
            model = name if self.flavour == "vllm" else f"{model}:{name}"
        return {
            "model": model,
            "prompt": prompt.text,
            "max_tokens": params.max_tokens,
            "stream": True,
            "stop": stops,
            "stop_token_ids": sorted(stop_ids),
            **self._sampling(params),
            "repetition_penalty": params.repeat_penalty,
        }

    @staticmethod
    def _sampling(params: GenParams) -> dict[str, Any]:
        body: dict[str, Any] = {"temperature": params.temperature}
        if params.temperature > 0:
            body.update(top_k=params.top_k, top_p=params.top_p, min_p=params.min_p)
            if params.seed is not None:
                body["seed"] = params.seed & 0xFFFFFFFF
        else:
            body.update(top_k=1)  # greedy: the same token the in-process engine picks
        return body

    # -- adapters on the server -------------------------------------------------------------------------------
    async def _refresh_loras(self) -> None:
        listed = await self._json("GET", "/lora-adapters")
        self._lora_ids = {str(Path(a["path"]).resolve()): int(a["id"]) for a in listed}

    async def _ensure_loaded(self, member_id: str, path: str) -> str:
        folder = Path(path).parent
        digest = await asyncio.to_thread(self._digest, path)
        name = adapter_name(path, digest)
        if name in self._loaded:
            return name
        endpoint = "/v1/load_lora_adapter" if self.flavour == "vllm" else "/load_lora_adapter"
        try:
            await self._json("POST", endpoint, {"lora_name": name, "lora_path": str(folder)})
        except ServerError as exc:
            if "already" not in str(exc).lower():
                raise ServerError(
                    f"the {self.flavour} server at {self.url} could not load {name}: {exc}"
                ) from None
        self._loaded[name] = member_id
        self._paths[name] = path
        return name

    async def _unload(self, names: list[str]) -> list[str]:
        """Unload adapters by name; returns the names the server did not unload."""
        endpoint = "/v1/unload_lora_adapter" if self.flavour == "vllm" else "/unload_lora_adapter"
        failed = []
        for name in names:
            try:
                await self._json("POST", endpoint, {"lora_name": name})
                self._paths.pop(name, None)
            except ServerError as exc:
                log.warning("could not unload %s from %s: %s", name, self.url, exc)
                failed.append(name)
        return failed

    def _digest(self, path: str) -> str:
        st = Path(path).stat()
        key = (path, st.st_size, st.st_mtime_ns)
        if key not in self._digests:
            digest = hashlib.sha256()
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
            self._digests[key] = digest.hexdigest()
        return self._digests[key]

    async def _first_model(self) -> str:
        listed = await self._json("GET", "/v1/models")
        data = listed.get("data") if isinstance(listed, dict) else None
        if not data:
            raise ServerError(f"the server at {self.url} lists no model; set [inference] server_model")
        return str(data[0]["id"])

    async def _vocab(self, base: BaseRef) -> BaseModel:
        """The base's tokenizer and chat format (its vocabulary only: the weights live on the server)."""
        vocab = self._vocabs.get(base.path)
        if vocab is None:
            from inference.runtime import BaseModel
            from models.catalog import template_for_path

            vocab = await asyncio.to_thread(
                BaseModel, base.path, *template_for_path(self.settings, base.path), vocab_only=True
            )
            self._vocabs[base.path] = vocab
        return vocab

    # -- HTTP -------------------------------------------------------------------------------------------------
    def _client(self) -> aiohttp.ClientSession:
        if self._http is None:
            raise ServerError("the persona engine is not running")
        return self._http

    async def _json(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        import aiohttp

        try:
            async with self._client().request(method, self.url + path, json=body) as resp:
                self._answered = True
                text = await resp.text()
                if resp.status >= 400:
                    raise self._refused(resp.status, text)
                return json.loads(text) if text.strip() else {}
        except aiohttp.ClientConnectionError as exc:
            raise ServerUnreachableError(self._down(exc)) from None
        except aiohttp.ClientError as exc:
            raise ServerError(self._down(exc)) from None
        except TimeoutError:
            raise ServerError(self._slow()) from None
        except ValueError:
            raise ServerError(
                f"the server at {self.url} answered {path} with something that is not JSON"
            ) from None

    async def _sse(
        self,
        path: str,
        body: dict[str, Any],
        field: str,
        stop_ids: frozenset[int] = frozenset(),
        ending: list[str] | None = None,
    ) -> AsyncIterator[str]:
        """The streamed text of one completion; leaving early closes the connection (the server stops on it)."""
        import aiohttp

        try:
            async with self._client().post(self.url + path, json=body) as resp:
                self._answered = True
                if resp.status >= 400:
                    raise self._refused(resp.status, await resp.text())
                try:
                    async for text in self._events(resp, field, stop_ids, ending):
                        yield text
                finally:
                    # Abandoned or done: the connection is dropped, never reused mid-stream; llama-server and
                    # vLLM stop generating when their client goes away.
                    resp.close()
        except aiohttp.ClientConnectionError as exc:
            raise ServerUnreachableError(self._down(exc)) from None
        except aiohttp.ClientError as exc:
            raise ServerError(self._down(exc)) from None
        except TimeoutError:
            raise ServerError(self._slow()) from None

    async def _events(
        self,
        resp: aiohttp.ClientResponse,
        field: str,
        stop_ids: frozenset[int],
        ending: list[str] | None = None,
    ) -> AsyncIterator[str]:
        """The text of each streamed event; why the server stopped goes to `ending` ("length": out of budget)."""
        async for raw in resp.content:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            event = json.loads(data)
            if "error" in event:
                raise ServerError(self._said(500, data))
            if field == "text":
                choices = event.get("choices") or [{}]
                text = choices[0].get("text") or ""
                reason = choices[0].get("finish_reason")
                done = reason is not None
            else:
                if stop_ids.intersection(event.get("tokens") or ()):
                    return  # the turn is over; leaving closes the stream and the server stops
                text, done = event.get("content") or "", bool(event.get("stop"))
                # llama-server says why it stopped: "limit" is n_predict reached ("eos", "word": the turn ended).
                reason = "length" if done and event.get("stop_type") == "limit" else None
            if reason is not None and ending is not None:
                ending.append(str(reason))
            if text:
                yield text
            if done:
                return

    def _down(self, exc: Exception) -> str:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"the persona server at {self.url} is not reachable ({reason}); start it or fix [inference] server_url"

    def _slow(self) -> str:
        return f"the persona server at {self.url} did not answer within {self.cfg.server_timeout_s:g} s"

    def _refused(self, status: int, text: str) -> ServerError:
        # 503 is a server still loading its model (just restarted): worth the same wait as a refused connection.
        if status == 503:
            return ServerUnreachableError(self._said(status, text), loading=True)
        return ServerError(self._said(status, text))

    def _said(self, status: int, text: str) -> str:
        try:
            err = json.loads(text).get("error")
            message = err.get("message") if isinstance(err, dict) else err
        except (ValueError, AttributeError):
            message = None
        detail = " ".join(str(message or text or "no detail").split())[:300]
        return f"the persona server at {self.url} refused the request (HTTP {status}): {detail}"
