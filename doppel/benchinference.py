"""`doppel bench inference`: time to first token and decode speed, engine next to raw llama-cpp-python."""

from __future__ import annotations

import asyncio
import ctypes
import statistics
import time
from pathlib import Path
from typing import Any

from core.chatformat import Utterance
from core.settings import Settings

CHANNEL = [
    ("20", "Bob", "did anyone watch the launch yesterday?"),
    ("30", "Carol", "yes!! the booster landing was unreal"),
    ("20", "Bob", "i missed it, was at the gym. is there a replay?"),
    ("30", "Carol", "on their channel, starts around the 40 minute mark"),
    ("40", "Dan", "the second stage had some wobble though, anyone know why?"),
    ("20", "Bob", "probably the new engines, they changed a lot this time"),
    ("30", "Carol", "Alice you follow this stuff, what do you think happened?"),
]
TARGET_THROUGHPUT = 0.95
TARGET_ALTERNATING_TTFT = 1.3


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def _raw_run(llm: Any, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(ttft, decode tokens/s, tokens) of one streamed greedy completion through the high-level `Llama`."""
    t0 = time.perf_counter()
    first = 0.0
    n = 0
    for chunk in llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, stream=True):
        if chunk["choices"][0]["finish_reason"] is not None:
            break  # the closing chunk carries no token
        n += 1
        if not first:
            first = time.perf_counter()
    end = time.perf_counter()
    tps = (n - 1) / (end - first) if n > 1 and end > first else 0.0
    return first - t0, tps, n


def _raw_set(llm: Any, handle: Any) -> None:
    """The naive runtime swap on raw llama-cpp-python: set the adapter and throw the whole cache away."""
    import llama_cpp

    arr = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(handle)
    scales = (ctypes.c_float * 1)(1.0)
    llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, arr, 1, scales)
    llm.reset()
    llm._ctx.kv_cache_clear()


async def _engine_run(
    engine: Any, persona: Any, context: list[Utterance], params: Any
) -> tuple[float, float, float, int]:
    """(visible ttft, first-token ttft, decode tokens/s, tokens) of one engine reply."""
    t0 = time.perf_counter()
    first = 0.0
    stream = engine.reply(persona, context, params)
    async for _ in stream:
        if not first:
            first = time.perf_counter()
    s = stream.stats
    return (first or time.perf_counter()) - t0, s.first_token - s.started, s.decode_tokens_per_s, s.generated


async def _bench(settings: Settings, quick: bool) -> dict[str, Any]:
    from llama_cpp import Llama

    from inference.engine import Engine
    from inference.prompting import build_prompt
    from inference.requests import GenParams, PersonaRequest
    from inference.runtime import default_threads
    from inference.synthetic import write_random_loras

    runs = 3 if quick else 8
    max_tokens = 24 if quick else 64
    base_path = settings.base_gguf_path()
    folder = settings.cache_dir / "bench"
    loras = [folder / "bench_a.gguf", folder / "bench_b.gguf"]
    missing = [(p, 100 + i) for i, p in enumerate(loras) if not p.exists()]
    if missing:
        # Synthetic adapters: the benchmark measures serving cost, which does not depend on what was learned.
        write_random_loras(base_path, missing, strength=0.05)
    threads = default_threads(settings.inference.n_threads)
    n_ctx = settings.inference.n_ctx
    context = [Utterance(a, n, t) for a, n, t in CHANNEL]
    params = GenParams(max_tokens=max_tokens, temperature=0.0)

    def persona(path: Path | None) -> PersonaRequest:
        if path is None:
            return PersonaRequest("10", "Alice", "space", "base", (), "g")
        return PersonaRequest("10", "Alice", "space", "adapter", ((str(path), 1.0),), "g")

    result: dict[str, Any] = {
        "model": base_path.name,
        "threads": threads,
        "max_tokens": max_tokens,
        "runs": runs,
    }
    async with Engine(settings, base_path) as engine:
        assert engine.base is not None
        base = engine.base
        prompt = build_prompt(
            base.format,
            base.tokenize,
            persona_id="10",
            persona_name="Alice",
            channel_name="space",
            context=context,
            budget=n_ctx - max_tokens - 1,
        )
        prompt_text = prompt.text
        result["prompt_tokens"] = len(prompt.tokens)
        for label, lora in (("base", None), ("adapter", loras[0])):
            raw = Llama(
                str(base_path),
                n_ctx=n_ctx,
                n_threads=threads,
                n_threads_batch=threads,
                lora_path=str(lora) if lora else None,
                verbose=False,
            )
            raws, engs = [], []
            for _ in range(runs):
                # Interleaved so both see the same machine load.
                raws.append(_raw_run(raw, prompt_text, max_tokens))
                engs.append(await _engine_run(engine, persona(lora), context, params))
            raw.close()
            raw_tps, eng_tps = _median([r[1] for r in raws]), _median([e[2] for e in engs])
            result[label] = {
                "raw": {
                    "ttft_s": _median([r[0] for r in raws]),
                    "decode_tokens_per_s": raw_tps,
                    "tokens": raws[-1][2],
                },
                "engine": {
                    "ttft_s": _median([e[0] for e in engs]),
                    "first_token_s": _median([e[1] for e in engs]),
                    "decode_tokens_per_s": eng_tps,
                    "tokens": engs[-1][3],
                },
                "throughput_ratio": eng_tps / raw_tps if raw_tps else 0.0,
            }
        # One persona speaking repeatedly vs two personas taking turns, both on the engine, then the naive raw swap.
        same = [await _engine_run(engine, persona(loras[0]), context, params) for _ in range(runs)]
        alt = [await _engine_run(engine, persona(loras[i % 2]), context, params) for i in range(2 * runs)]
        raw = Llama(str(base_path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
        import llama_cpp

        handles = [llama_cpp.llama_adapter_lora_init(raw._model.model, str(p).encode()) for p in loras]
        raw_alt = []
        for i in range(2 * runs):
            _raw_set(raw, handles[i % 2])
            raw_alt.append(_raw_run(raw, prompt_text, max_tokens))
        raw.close()
        same_ttft, alt_ttft = _median([s[0] for s in same]), _median([a[0] for a in alt])
        result["alternating"] = {
            "engine_one_persona": {"ttft_s": same_ttft, "first_token_s": _median([s[1] for s in same])},
            "engine_alternating": {
                "ttft_s": alt_ttft,
                "first_token_s": _median([a[1] for a in alt]),
                "decode_tokens_per_s": _median([a[2] for a in alt]),
                "kv_restores": engine.states.restores,
            },
            "raw_alternating_full_prefill": {"ttft_s": _median([r[0] for r in raw_alt])},
            "ttft_ratio": alt_ttft / same_ttft if same_ttft else 0.0,
        }
        result["server"] = await _server_section(settings, engine, loras, persona, context, params, runs)
    worst = min(result["base"]["throughput_ratio"], result["adapter"]["throughput_ratio"])
    result["targets"] = {
        "engine_vs_raw_throughput": {
            "value": worst,
            "target": f">= {TARGET_THROUGHPUT}",
            "met": worst >= TARGET_THROUGHPUT,
        },
        "alternating_vs_one_persona_ttft": {
            "value": result["alternating"]["ttft_ratio"],
            "target": f"<= {TARGET_ALTERNATING_TTFT}",
            "met": result["alternating"]["ttft_ratio"] <= TARGET_ALTERNATING_TTFT,
        },
    }
    return result


async def _server_run(
    engine: Any, persona: Any, context: list[Utterance], params: Any
) -> tuple[float, float, int]:
    """(visible ttft, decode chunks/s, chunks) of one reply streamed from the persona server."""
    t0 = time.perf_counter()
    first, n = 0.0, 0
    async for _ in engine.reply(persona, context, params):
        n += 1
        if not first:
            first = time.perf_counter()
    end = time.perf_counter()
    return (first or end) - t0, (n - 1) / (end - first) if n > 1 and end > first else 0.0, n


async def _server_section(
    settings: Settings,
    engine: Any,
    loras: list[Path],
    persona: Any,
    context: list[Utterance],
    params: Any,
    runs: int,
) -> dict[str, Any]:
    """The same prompts through llama.cpp's llama-server (the server backend), interleaved with the engine."""
    from doppel.llamaserver import cached_binary, running_server
    from inference.runtime import default_threads
    from inference.server import ServerEngine

    binary = cached_binary()
    if binary is None:
        return {
            "skipped": "no llama-server built for this CPU: run `python doppel/llamaserver.py` (about 8 minutes)"
        }
    threads = default_threads(settings.inference.n_threads)
    out: dict[str, Any] = {"binary": str(binary)}
    base = settings.base_gguf_path()
    with running_server(
        binary, base, [str(p) for p in loras], n_ctx=settings.inference.n_ctx, threads=threads
    ) as url:
        async with ServerEngine(settings, url=url, flavour="llama.cpp") as server:
            for label, lora in (("base", None), ("adapter", loras[0])):
                srv, eng = [], []
                for _ in range(runs):
                    # Interleaved so both see the same machine load (the idle one only holds memory).
                    srv.append(await _server_run(server, persona(lora), context, params))
                    eng.append(await _engine_run(engine, persona(lora), context, params))
                srv_ttft, eng_ttft = _median([s[0] for s in srv]), _median([e[0] for e in eng])
                out[label] = {
                    "server": {"ttft_s": srv_ttft, "decode_chunks_per_s": _median([s[1] for s in srv])},
                    "engine": {"ttft_s": eng_ttft, "decode_tokens_per_s": _median([e[2] for e in eng])},
                    "ttft_ratio_server_vs_engine": srv_ttft / eng_ttft if eng_ttft else 0.0,
                }
            alt = [await _server_run(server, persona(loras[i % 2]), context, params) for i in range(2 * runs)]
            same = [await _server_run(server, persona(loras[0]), context, params) for _ in range(runs)]
            alt_ttft, same_ttft = _median([a[0] for a in alt]), _median([s[0] for s in same])
            out["alternating"] = {
                "server_one_persona_ttft_s": same_ttft,
                "server_alternating_ttft_s": alt_ttft,
                "ttft_ratio": alt_ttft / same_ttft if same_ttft else 0.0,
            }
    return out


def inference(settings: Settings, args: Any) -> dict[str, Any]:
    """Run the inference benchmark (`args.quick` for a smoke-sized run) and return its JSON-able result."""
    return asyncio.run(_bench(settings, bool(getattr(args, "quick", False))))
