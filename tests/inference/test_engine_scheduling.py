"""Real llama.cpp engine under concurrency: event-loop lag, load, busy errors, cancellation, fairness."""

from __future__ import annotations

import asyncio
import statistics
import time

import pytest

from core.chatformat import Utterance
from inference.engine import Engine
from inference.errors import BusyError
from inference.requests import GenParams, PersonaRequest

CONTEXT = [Utterance("20", "Bob", "anyone up for pizza tonight?"), Utterance("30", "Carol", "yes! where?")]
OTHER = [Utterance("30", "Carol", "what are you reading these days?")]
LONG = [Utterance("20", "Bob", "Tell me a very long story about a dragon and a knight, with many details.")]


def persona(
    adapters: tuple[tuple[str, float], ...] = (), guild: str = "g1", member: str = "10"
) -> PersonaRequest:
    return PersonaRequest(member, "Alice", "general", "adapter" if adapters else "base", adapters, guild)


def test_event_loop_stays_responsive_while_generating(small_settings, base_gguf) -> None:
    async def run() -> list[float]:
        async with Engine(small_settings, base_gguf) as engine:
            lags: list[float] = []
            done = asyncio.Event()

            async def probe() -> None:
                while not done.is_set():
                    t = time.perf_counter()
                    await asyncio.sleep(0.005)
                    lags.append(time.perf_counter() - t - 0.005)

            task = asyncio.create_task(probe())
            params = GenParams(max_tokens=24, temperature=0.7, seed=1)
            await asyncio.gather(
                *(engine.reply(persona(), ctx, params).text() for ctx in (CONTEXT, OTHER, LONG))
            )
            done.set()
            await task
            return lags

    lags = asyncio.run(run())
    assert len(lags) > 20
    p99 = statistics.quantiles(lags, n=100)[98]
    assert p99 < 0.020, f"event loop lag p99 {p99 * 1000:.1f} ms"


@pytest.mark.slow
def test_load_200_concurrent_requests_over_5_personas(tune, base_gguf, lora_paths) -> None:
    settings = tune(queue_size=40, max_tokens=6)
    params = GenParams(max_tokens=6, temperature=0.0)
    personas = [persona(((p, 1.0),), guild=f"g{i % 3}", member=str(10 + i)) for i, p in enumerate(lora_paths)]
    contexts = [CONTEXT, OTHER]

    async def run() -> tuple[dict, list]:
        async with Engine(settings, base_gguf) as engine:
            refs = {
                (i, j): await engine.reply(p, c, params).text()
                for i, p in enumerate(personas)
                for j, c in enumerate(contexts)
            }

            async def one(n: int) -> tuple[int, int, str | BaseException]:
                i, j = n % 5, (n // 5) % 2
                try:
                    return i, j, await engine.reply(personas[i], contexts[j], params).text()
                except BusyError as exc:
                    return i, j, exc

            results = await asyncio.gather(*(one(n) for n in range(200)))
            assert engine.pending() == 0
            return refs, results

    refs, results = asyncio.run(run())
    # The reference replies tell the personas apart, so a reply from the wrong adapter would be caught.
    assert len(set(refs.values())) == len(refs)
    assert len(results) == 200
    replies = [r for r in results if isinstance(r[2], str)]
    busy = [r for r in results if isinstance(r[2], BusyError)]
    assert len(replies) + len(busy) == 200
    assert len(replies) >= 40 and busy
    wrong = [(i, j, text) for i, j, text in replies if text != refs[(i, j)]]
    assert wrong == []


def test_cancelled_caller_stops_generation_and_frees_the_worker(small_settings, base_gguf) -> None:
    params = GenParams(max_tokens=300, temperature=0.9, seed=7)

    async def run() -> tuple[object, int, str]:
        async with Engine(small_settings, base_gguf) as engine:
            first = asyncio.Event()
            chunks = 0

            async def consume() -> None:
                nonlocal chunks
                async for _ in engine.reply(persona(), LONG, params):
                    chunks += 1
                    first.set()

            task = asyncio.create_task(consume())
            queued = asyncio.create_task(engine.reply(persona(member="11"), OTHER, params).text())
            await first.wait()
            queued.cancel()
            task.cancel()
            t = time.perf_counter()
            after = await engine.reply(persona(), OTHER, GenParams(max_tokens=4, temperature=0.0)).text()
            waited = time.perf_counter() - t
            assert waited < 5.0
            return engine.recent, chunks, after

    recent, chunks, after = asyncio.run(run())
    cancelled = [s for s in recent if s.stop_reason == "cancelled"]
    assert len(cancelled) == 1 and cancelled[0].generated < 300
    # The request cancelled while still queued never reached a worker.
    assert len(recent) == 2
    assert after.strip()


def test_full_queue_answers_busy_not_silence(tune, base_gguf) -> None:
    settings = tune(queue_size=2)

    async def run() -> list:
        async with Engine(settings, base_gguf) as engine:
            params = GenParams(max_tokens=8, temperature=0.0)
            return await asyncio.gather(
                *(engine.reply(persona(), CONTEXT, params).text() for _ in range(8)), return_exceptions=True
            )

    results = asyncio.run(run())
    assert any(isinstance(r, BusyError) for r in results)
    assert all(isinstance(r, str | BusyError) for r in results)
    assert str(next(r for r in results if isinstance(r, BusyError))).startswith("too many replies")


def test_two_workers_share_the_model_and_adapters_without_mixing(tune, base_gguf, lora_paths) -> None:
    settings = tune(workers=2, max_adapters=2)
    params = GenParams(max_tokens=8, temperature=0.0)
    ps = [persona(((p, 1.0),), guild=f"g{i}") for i, p in enumerate(lora_paths[:3])]

    async def run() -> tuple[list[str], list[str]]:
        async with Engine(settings, base_gguf) as engine:
            assert len(engine.sessions) == 2
            refs = [await engine.reply(p, CONTEXT, params).text() for p in ps]
            got = await asyncio.gather(*(engine.reply(ps[n % 3], CONTEXT, params).text() for n in range(12)))
            return refs, list(got)

    refs, got = asyncio.run(run())
    assert len(set(refs)) == 3
    assert got == [refs[n % 3] for n in range(12)]


def test_close_during_generation_ends_replies_with_an_error(small_settings, base_gguf) -> None:
    from inference.errors import EngineClosedError

    async def run() -> list:
        engine = Engine(small_settings, base_gguf)
        await engine.start()
        params = GenParams(max_tokens=300, temperature=0.9, seed=3)
        started = asyncio.Event()

        async def consume(ctx: list[Utterance]) -> str:
            out = []
            async for chunk in engine.reply(persona(), ctx, params):
                out.append(chunk)
                started.set()
            return "".join(out)

        tasks = [asyncio.create_task(consume(LONG)), asyncio.create_task(consume(OTHER))]
        await started.wait()
        t = time.perf_counter()
        await engine.close()
        assert time.perf_counter() - t < 5.0
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(run())
    assert all(isinstance(r, EngineClosedError) for r in results)
