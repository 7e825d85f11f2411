"""`doppel bench colocated`: a training job and persona replies on one host, alone and at once (JSON).

The bench process is the bot: one engine (llama.cpp, every core, the hybrid persona with its retriever) and one
supervisor whose trainer child trains SmolLM2 in a subprocess. Measured in one run: the job alone, replies alone
(time to first token, decode tokens/s), replies while the job trains, and the job while replies stream and after.
The same sequence runs twice, with the host share (`after`: the trainer at SCHED_IDLE, its threads adapted) and
without it (`before`: the trainer at normal priority on every core, as before issue 22).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from core.settings import Settings

TARGETS = {"ttft_ratio_max": 1.5, "decode_ratio_min": 0.7, "job_during_min": 0.5, "job_after_min": 0.9}
TRAINEE, SPEAKER = 0, 1  # member indexes in the generated community: one trains, another's persona talks


def colocated(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """Run the whole comparison in a temporary DOPPEL_HOME; the figures, ratios and targets as one dict."""
    quick = bool(getattr(args, "quick", False))
    window_s = 20.0 if quick else 60.0
    with tempfile.TemporaryDirectory(prefix="doppel-bench-colocated-") as tmp:
        home = Path(tmp)
        bench = dataclasses.replace(settings, home=home, master_key=None)
        bench = dataclasses.replace(
            bench, training=dataclasses.replace(bench.training, min_free_disk_mb=1, heartbeat_s=1.0)
        )
        return asyncio.run(_bench(bench, window_s, quick))


async def _bench(settings: Settings, window_s: float, quick: bool) -> dict[str, Any]:
    from core.hostshare import usable_cores
    from doppel.benchscale import cpu_model

    contexts, lora = await _seed(settings, 40 if quick else 200)
    spacing_s = 4.0  # one reply every few seconds: a busy channel (the bot's per-channel limit is 5 s)
    max_tokens = 64
    result: dict[str, Any] = {
        "cpu": cpu_model() or platform.machine(),
        "cores": usable_cores(),
        "model": settings.base_gguf_path().name,
        "window_s": window_s,
        "reply_spacing_s": spacing_s,
        "max_tokens": max_tokens,
        "persona_mode": "adapter+retrieval",
    }
    for label, priority, adapt in (("after", "idle", True), ("before", "normal", False)):
        training = dataclasses.replace(
            settings.training, trainer_priority=priority, adapt_threads=adapt, yield_to_serving=adapt
        )
        result[label] = await _policy(
            dataclasses.replace(settings, training=training),
            contexts,
            lora,
            window_s,
            spacing_s,
            max_tokens,
            replies_alone=label == "after",
        )
    after, before = result["after"], result["before"]
    alone = after["replies_alone"]
    for side in (after, before):
        during = side["replies_during_training"]
        side["ttft_ratio"] = _ratio(during["ttft_s_median"], alone["ttft_s_median"])
        side["decode_ratio"] = _ratio(
            during["decode_tokens_per_s_median"], alone["decode_tokens_per_s_median"]
        )
        job = side["job_tokens_per_s"]
        side["job_during_ratio"] = _ratio(job["during_replies"], job["alone"])
        if job.get("after_replies") is not None:
            side["job_after_ratio"] = _ratio(job["after_replies"], job["alone"])
    result["targets"] = TARGETS
    result["meets_targets"] = {
        "ttft": after["ttft_ratio"] <= TARGETS["ttft_ratio_max"],
        "decode": after["decode_ratio"] >= TARGETS["decode_ratio_min"],
        "job_during_replies": after["job_during_ratio"] >= TARGETS["job_during_min"],
        "job_after_replies": after.get("job_after_ratio", 0.0) >= TARGETS["job_after_min"],
    }
    return result


def _ratio(a: float | None, b: float | None) -> float:
    return round(a / b, 3) if a and b else 0.0


async def _seed(settings: Settings, per_member_contexts: int) -> tuple[list[list[Any]], Path]:
    """A generated community in the store; conversation windows to answer; a LoRA for the speaking persona."""
    from consent.service import ConsentService
    from core.chatformat import Utterance
    from data.records import Member
    from data.store import Store
    from doppel.benchtrain import _generate, _member_id
    from inference.retrieval import Retriever
    from inference.synthetic import write_random_loras

    members = 4
    messages = _generate(4000, members, seed=settings.dataset.seed)
    ids = [_member_id(i) for i in range(members)]
    async with Store.open(settings) as store:
        await ConsentService(store).grant(ids, "train,chat", "bench", "cli")
        for i, mid in enumerate(ids):
            await store.members.upsert(Member(mid, f"user{i}", f"User {i}"))
        for start in range(0, len(messages), 2000):
            await store.messages.add_many(messages[start : start + 2000])
        # The speaking persona's index is built at publish in the product: not part of any reply's cost here.
        await Retriever(store, settings).prepare(ids[SPEAKER])
    contexts = []
    for i in range(0, min(len(messages) - 6, per_member_contexts * 6), 6):
        window = messages[i : i + 6]
        contexts.append([Utterance(m.author_id, m.author_name, m.content) for m in window])
    lora = settings.cache_dir / "bench" / "colocated.gguf"
    lora.parent.mkdir(parents=True, exist_ok=True)
    write_random_loras(settings.base_gguf_path(), [(lora, 7)], strength=0.05)
    return contexts, lora


async def _policy(
    settings: Settings,
    contexts: list[list[Any]],
    lora: Path,
    window_s: float,
    spacing_s: float,
    max_tokens: int,
    *,
    replies_alone: bool,
) -> dict[str, Any]:
    from data.store import Store
    from doppel.benchtrain import _member_id
    from inference.engine import Engine
    from inference.requests import GenParams, PersonaRequest
    from inference.retrieval import Retriever
    from jobs.supervisor import Supervisor

    persona = PersonaRequest(
        member_id=_member_id(SPEAKER),
        name="User 1",
        channel_name="channel-1",
        mode="adapter+retrieval",
        adapters=((str(lora), 1.0),),
        guild_id="1",
    )
    params = GenParams(max_tokens=max_tokens, temperature=0.8, seed=11)
    out: dict[str, Any] = {"trainer_priority": settings.training.trainer_priority}
    async with Store.open(settings) as store:
        retriever = Retriever(store, settings)
        async with Engine(settings, retriever=retriever) as engine:

            async def stream(duration: float, first: int = 1) -> dict[str, Any]:
                # Every phase answers the same conversations in the same order: equal prompts, equal work.
                stats, t_end, turns = [], time.monotonic() + duration, iter(contexts[first:] * 4)
                stalled = 0
                while time.monotonic() < t_end:
                    t0 = time.monotonic()
                    reply = engine.reply(persona, next(turns), params)
                    seen = len(engine.recent)
                    try:
                        # A reply still running past the window (a stalled host) is cut there and counted.
                        await asyncio.wait_for(reply.text(), timeout=max(5.0, t_end - t0) + 5.0)
                    except TimeoutError:
                        stalled += 1
                        await reply.aclose()
                        await _settled(engine, seen)
                    if len(engine.recent) > seen:
                        stats.append(engine.recent[-1])
                    await asyncio.sleep(max(0.0, spacing_s - (time.monotonic() - t0)))
                return {**_reply_figures(stats), "cut_at_window_end": stalled}

            # Warm: the engine's model, the adapter, the retriever's encoder, off the clock (its own conversation).
            await stream(spacing_s, first=0)
            if replies_alone:
                out["replies_alone"] = await stream(window_s)
            sup = Supervisor(store, settings, serving=retriever)
            await sup.start()
            try:
                job = await sup.submit(
                    _member_id(TRAINEE),
                    requested_by="bench",
                    source="cli",
                    max_steps=100_000,
                    save_steps=100_000,
                )
                meter = _JobMeter(sup, job.id)
                await meter.wait_steps(2)  # past model loading and the first (slowest) steps
                out["job_threads_alone"] = (await sup.get(job.id)).progress.threads
                job_alone = await meter.window(window_s)
                during_task = asyncio.create_task(meter.window(window_s))
                out["replies_during_training"] = await stream(window_s)
                job_during = await during_task
                out["job_threads_during"] = (await sup.get(job.id)).progress.threads
                job_after = await meter.window(window_s) if replies_alone else None
                await sup.cancel(job.id, "bench")
            finally:
                await sup.close()
    out["job_tokens_per_s"] = {"alone": job_alone, "during_replies": job_during, "after_replies": job_after}
    return out


async def _settled(engine: Any, seen: int, timeout: float = 30.0) -> None:
    """Wait until a cancelled reply's worker stopped and recorded what it did."""
    deadline = time.monotonic() + timeout
    while len(engine.recent) <= seen and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def _reply_figures(stats: list[Any]) -> dict[str, Any]:
    # A reply cut before its first token counts with the time it had run (a lower bound of its wait).
    ttft = [(s.first_token or s.finished) - s.started for s in stats]
    decode = [s.decode_tokens_per_s for s in stats if s.decode_tokens_per_s > 0]
    return {
        "replies": len(stats),
        "ttft_s_median": round(statistics.median(ttft), 3) if ttft else None,
        "ttft_s_max": round(max(ttft), 3) if ttft else None,
        "decode_tokens_per_s_median": round(statistics.median(decode), 1) if decode else None,
        "generated_tokens": sum(s.generated for s in stats),
        "prompt_tokens_median": statistics.median(s.prompt_tokens for s in stats) if stats else None,
    }


class _JobMeter:
    """Trained tokens per second of a running job over a window, from its progress (trained tokens so far)."""

    def __init__(self, sup: Any, job_id: str) -> None:
        self.sup = sup
        self.job_id = job_id

    async def _reading(self) -> tuple[float, int, int]:
        job = await self.sup.get(self.job_id)
        if job.status.value not in ("queued", "running"):
            raise RuntimeError(f"the benchmark's job ended early: {job.status.value}: {job.error}")
        return job.progress.updated_at, job.progress.tokens_seen, job.progress.step

    async def wait_steps(self, steps: int, timeout: float = 900.0) -> None:
        deadline = time.monotonic() + timeout
        while (await self._reading())[2] < steps:
            if time.monotonic() > deadline:
                raise RuntimeError("the benchmark's job made no progress")
            await asyncio.sleep(0.5)

    async def window(self, seconds: float) -> float | None:
        """Tokens/s between the first and the last progress event seen within `seconds` from now."""
        first = await self._reading()
        last = first
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end:
            await asyncio.sleep(0.5)
            last = await self._reading()
        # Wait for the step in flight at the end, so a window that saw few steps still spans whole steps.
        while last[1] == first[1]:
            await asyncio.sleep(0.5)
            last = await self._reading()
        span = last[0] - first[0]
        return round((last[1] - first[1]) / span, 1) if span > 0 else None
