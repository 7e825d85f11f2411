"""Real llama.cpp engine: personas swapped per request never contaminate each other; adapters, blends, LRU."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from core.chatformat import Utterance
from inference.engine import Engine
from inference.errors import AdapterError, RequestError
from inference.requests import GenParams, PersonaRequest

CONTEXT = [
    Utterance("20", "Bob", "anyone up for pizza tonight?"),
    Utterance("30", "Carol", "yes! where?"),
]
GREEDY = GenParams(max_tokens=12, temperature=0.0)


def persona(adapters: tuple[tuple[str, float], ...] = (), guild: str = "g1") -> PersonaRequest:
    return PersonaRequest("10", "Alice", "general", "adapter" if adapters else "base", adapters, guild)


async def say(engine: Engine, p: PersonaRequest, context: list[Utterance] = CONTEXT) -> str:
    return await engine.reply(p, context, GREEDY).text()


def test_sequence_matches_fresh_engines_and_adapters_change_output(
    small_settings, base_gguf, lora_paths
) -> None:
    a, b = persona(((lora_paths[0], 1.0),)), persona(((lora_paths[1], 1.0),))
    base = persona()
    later = [*CONTEXT, Utterance("20", "Bob", "the new place on 5th?")]
    plan = [(a, CONTEXT), (b, CONTEXT), (a, later), (base, CONTEXT), (b, later)]

    async def mixed() -> list[str]:
        async with Engine(small_settings, base_gguf) as engine:
            return [await say(engine, p, ctx) for p, ctx in plan]

    async def fresh(p: PersonaRequest) -> list[str]:
        async with Engine(small_settings, base_gguf) as engine:
            return [await say(engine, q, ctx) for q, ctx in plan if q == p]

    got = asyncio.run(mixed())
    alone = {key: asyncio.run(fresh(p)) for key, p in (("a", a), ("b", b), ("base", base))}
    assert got[0] == alone["a"][0] and got[2] == alone["a"][1]
    assert got[1] == alone["b"][0] and got[4] == alone["b"][1]
    assert got[3] == alone["base"][0]
    # Adapters must matter, or the test above would pass with adapters ignored.
    assert got[0] != got[3] and got[1] != got[3] and got[0] != got[1]
    assert all(s.strip() for s in got)


def test_saved_kv_state_is_reused_when_personas_alternate(small_settings, base_gguf, lora_paths) -> None:
    a, b = persona(((lora_paths[0], 1.0),)), persona(((lora_paths[1], 1.0),))

    async def run() -> list:
        async with Engine(small_settings, base_gguf) as engine:
            stats = []
            for p in (a, b, a, b):
                stream = engine.reply(p, CONTEXT, GREEDY)
                await stream.text()
                stats.append(stream.stats)
            return stats

    s = asyncio.run(run())
    assert not s[0].restored and not s[1].restored
    assert s[2].restored and s[3].restored
    assert s[2].reused_tokens >= s[2].prompt_tokens - 1


def test_blend_applies_several_adapters_together(small_settings, base_gguf, lora_paths) -> None:
    x, y = lora_paths[0], lora_paths[1]

    async def run() -> list[str]:
        async with Engine(small_settings, base_gguf) as engine:
            return [
                await say(engine, persona(((x, 1.0),))),
                await say(engine, persona(((y, 1.0),))),
                await say(engine, persona(((x, 0.6), (y, 0.6)))),
                await say(engine, persona(((x, 1.0), (y, 0.0)))),
            ]

    only_x, only_y, blend, x_with_zero_y = asyncio.run(run())
    assert blend not in (only_x, only_y)
    assert x_with_zero_y == only_x


def test_lru_evicts_and_frees_adapters_by_count_and_budget(tune, base_gguf, lora_paths) -> None:
    settings = tune(max_adapters=2)
    refs: dict[str, str] = {}

    async def run(s) -> tuple[list[str], object, list[str]]:
        async with Engine(s, base_gguf) as engine:
            out = []
            for path in (lora_paths[0], lora_paths[1], lora_paths[2], lora_paths[0]):
                out.append(await say(engine, persona(((path, 1.0),))))
            assert engine.adapters is not None
            return out, engine.adapters.stats, engine.adapters.loaded()

    out, stats, loaded = asyncio.run(run(settings))
    refs["first"] = out[0]
    assert stats.freed[:2] == [lora_paths[0], lora_paths[1]]
    assert stats.loads == 4
    assert loaded == [lora_paths[2], lora_paths[0]]
    assert out[3] == out[0]

    size_mb = Path(lora_paths[0]).stat().st_size / 2**20
    budget = tune(max_adapters=16, adapter_budget_mb=int(size_mb * 1.5) + 1)
    out, stats, loaded = asyncio.run(run(budget))
    assert len(loaded) == 1 and loaded == [lora_paths[0]]
    assert stats.evictions == 3 and out[0] == refs["first"]


def test_bad_requests_fail_with_clear_errors(small_settings, base_gguf, tmp_path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")

    async def run() -> None:
        async with Engine(small_settings, base_gguf) as engine:
            with pytest.raises(AdapterError, match="not found"):
                await say(engine, persona(((str(tmp_path / "missing.gguf"), 1.0),)))
            with pytest.raises(AdapterError, match="cannot load adapter"):
                await say(engine, persona(((str(junk), 1.0),)))
            with pytest.raises(RequestError, match="needs at least one adapter"):
                await say(engine, PersonaRequest("10", "Alice", None, "adapter"))
            with pytest.raises(RequestError, match="max_tokens"):
                await engine.reply(persona(), CONTEXT, GenParams(max_tokens=0)).text()
            # The engine keeps serving after bad requests.
            assert (await say(engine, persona())).strip()

    asyncio.run(run())


def test_blend_naming_one_adapter_twice_is_refused(small_settings, base_gguf, lora_paths) -> None:
    async def run() -> None:
        async with Engine(small_settings, base_gguf) as engine:
            with pytest.raises(RequestError, match="only once"):
                await say(engine, persona(((lora_paths[0], 0.5), (lora_paths[0], 0.5))))

    asyncio.run(run())


def test_an_adapter_is_served_in_the_prompt_style_it_was_trained_with(
    small_settings, base_gguf, lora_paths, tmp_path
) -> None:
    import json
    import shutil

    from core.chatformat import DEFAULT_STYLE
    from inference.prompting import build_prompt, trained_style

    metas = {
        "plain": {"training_config": {"prompt_style": "plain"}},
        "legacy": {"training_config": {"lora_r": 16}},  # trained before the style was recorded
        "bare": None,  # a GGUF without its adapter folder
        "unknown": {"training_config": {"prompt_style": "fancy"}},
    }
    files = {}
    for name, meta in metas.items():
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(lora_paths[0], folder / "adapter.gguf")
        if meta is not None:
            (folder / "meta.json").write_text(json.dumps(meta))
        files[name] = str(folder / "adapter.gguf")
    assert trained_style([(files["plain"], 1.0)]) == "plain"
    assert trained_style([(files["legacy"], 1.0)]) == "persona"
    assert trained_style([(files["bare"], 1.0)]) == DEFAULT_STYLE == trained_style([])
    assert trained_style([(files["bare"], 0.3), (files["plain"], 1.0)]) == "plain", "the heaviest decides"
    with pytest.raises(AdapterError, match="fancy"):
        trained_style([(files["unknown"], 1.0)])

    async def run() -> tuple[dict[str, int], dict[str, int]]:
        async with Engine(small_settings, base_gguf) as engine:
            assert engine.base is not None
            seen, expected = {}, {}
            for name, style in (("plain", "plain"), ("legacy", "persona")):
                await say(engine, persona(((files[name], 1.0),)))
                seen[name] = engine.recent[-1].prompt_tokens
                prompt = build_prompt(
                    engine.base.format,
                    engine.base.tokenize,
                    persona_id="10",
                    persona_name="Alice",
                    channel_name="general",
                    context=CONTEXT,
                    budget=400,
                    style=style,
                )
                expected[name] = len(prompt.tokens)
            with pytest.raises(AdapterError, match="fancy"):
                await say(engine, persona(((files["unknown"], 1.0),)))
            return seen, expected

    seen, expected = asyncio.run(run())
    assert seen == expected and seen["plain"] < seen["legacy"]
