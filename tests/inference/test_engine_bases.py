"""Many bases in one engine: each persona served on the base its adapter was trained on, checked by hash, LRU."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
from pathlib import Path

import pytest

from core.chatformat import Utterance
from core.settings import Settings
from inference.engine import Engine
from inference.errors import AdapterError
from inference.requests import GenParams, PersonaRequest
from models.catalog import file_sha256
from tests.helpers.adapters import adapter_on

CONTEXT = [Utterance("20", "Bob", "anyone up for pizza tonight?"), Utterance("30", "Carol", "yes! where?")]
GREEDY = GenParams(max_tokens=12, temperature=0.0)


def persona(member: str, name: str, adapter: str) -> PersonaRequest:
    return PersonaRequest(member, name, "general", "adapter", ((adapter, 1.0),), "g1")


async def say(engine: Engine, p: PersonaRequest) -> str:
    return await engine.reply(p, CONTEXT, GREEDY).text()


def test_two_bases_answer_in_one_engine_in_any_order(
    small_settings: Settings, base_gguf: Path, tiny_base: Path, tmp_path: Path
) -> None:
    smol = persona("10", "Alice", adapter_on(base_gguf, tmp_path / "alice" / "1", 1, name="smollm2-135m"))
    tiny = persona("11", "Tina", adapter_on(tiny_base, tmp_path / "tina" / "1", 2, name="tiny"))

    async def run(settings: Settings, plan: list[PersonaRequest]) -> tuple[list[str], list[str], int]:
        async with Engine(settings, base_gguf) as engine:
            got = [await say(engine, p) for p in plan]
            assert engine.pool is not None
            return got, engine.pool.loaded(), engine.pool.unloads

    async def alone(default: Path, p: PersonaRequest) -> str:
        async with Engine(small_settings, default) as engine:
            return await say(engine, p)

    expect = {"10": asyncio.run(alone(base_gguf, smol)), "11": asyncio.run(alone(tiny_base, tiny))}
    assert expect["10"] != expect["11"]
    plan = [smol, tiny, tiny, smol, tiny, smol]
    got, loaded, unloads = asyncio.run(run(small_settings, plan))
    assert got == [expect[p.member_id] for p in plan]
    assert sorted(loaded) == sorted([str(base_gguf.resolve()), str(tiny_base.resolve())]) and unloads == 0
    # A bound of one base: every switch unloads the idle one and loads the other, and the replies stay the same.
    one = dataclasses.replace(
        small_settings, inference=dataclasses.replace(small_settings.inference, base_budget_mb=1)
    )
    got, loaded, unloads = asyncio.run(run(one, plan))
    assert got == [expect[p.member_id] for p in plan]
    assert len(loaded) == 1 and unloads >= 3


def test_an_adapter_recorded_on_another_base_file_is_refused(
    small_settings: Settings, base_gguf: Path, tiny_base: Path, tmp_path: Path
) -> None:
    # Same path, different file: a base replaced under its name (the shapes match, llama.cpp would load it).
    swapped = tmp_path / "swapped.gguf"
    shutil.copy(base_gguf, swapped)
    wrong = adapter_on(swapped, tmp_path / "alice" / "1", 1, name="smollm2-135m", sha=file_sha256(tiny_base))
    good = adapter_on(tiny_base, tmp_path / "tina" / "1", 2, name="tiny")

    async def run() -> tuple[str, str]:
        async with Engine(small_settings, base_gguf) as engine:
            with pytest.raises(AdapterError) as refused:
                await say(engine, persona("10", "Alice", wrong))
            # The engine goes on serving the other personas.
            return str(refused.value), await say(engine, persona("11", "Tina", good))

    message, after = asyncio.run(run())
    assert "trained on base smollm2-135m" in message and "different file" in message and "\n" not in message
    assert isinstance(after, str)


def test_a_missing_recorded_base_is_a_clear_error(
    small_settings: Settings, base_gguf: Path, tmp_path: Path
) -> None:
    gone = tmp_path / "gone.gguf"
    shutil.copy(base_gguf, gone)
    adapter = adapter_on(gone, tmp_path / "alice" / "1", 1, name="qwen1.5b")
    gone.unlink()

    async def run() -> str:
        async with Engine(small_settings, base_gguf) as engine:
            with pytest.raises(AdapterError) as refused:
                await say(engine, persona("10", "Alice", adapter))
            return str(refused.value)

    assert "base model 'qwen1.5b' is not on this machine" in asyncio.run(run())
