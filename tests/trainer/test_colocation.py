"""One host: a real training job beside the real engine. The budget itself is checked, never timing."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import supervision as fx

pytestmark = pytest.mark.timeout(400)


def _settings(doppel_home: Path) -> Any:
    from core.settings import Settings

    return Settings.load(env=fx.control_env(doppel_home, cancel_grace_s=20))


@fx.run_async
async def test_the_trainer_yields_its_threads_while_the_engine_generates_and_takes_them_back(
    doppel_home: Path, tiny_model: Any
) -> None:
    from core.chatformat import Utterance
    from core.hostshare import serving_now, usable_cores
    from core.settings import bundled_base_gguf
    from data.store import Store
    from inference.engine import Engine
    from inference.requests import GenParams, PersonaRequest
    from jobs.supervisor import Supervisor

    cores = usable_cores()
    if cores < 2 or bundled_base_gguf() is None:
        pytest.skip("needs two cores and the bundled base model")
    settings = _settings(doppel_home)
    await fx.seed_member(settings)
    store = await Store.open(settings)
    sup = Supervisor(store, settings)
    await sup.start()
    # The engine as the bot runs it (every core), beside a job allowed every core (threads 0).
    serving = dataclasses.replace(settings.inference, n_ctx=512, n_threads=cores, max_tokens=48)
    engine = Engine(dataclasses.replace(settings, inference=serving))
    generating = asyncio.Event()
    try:
        job = await sup.submit(
            fx.PERSONA_ID,
            requested_by="admin",
            **fx.tiny_overrides(tiny_model, max_steps=100_000, threads=0, save_steps=100_000),
        )

        async def progress(pred: Any) -> Any:
            j = await sup.get(job.id)
            return j if j.pid and j.progress.step >= 1 and pred(j.progress) else None

        quiet = await fx.wait_for(lambda: progress(lambda p: p.threads == cores), timeout=180)
        assert quiet.progress.priority == "idle"
        assert os.sched_getscheduler(quiet.pid) == os.SCHED_IDLE, "the trainer runs as background work"
        await engine.start()
        assert serving_now(settings.share_dir).engines == 1
        assert serving_now(settings.share_dir).busy_threads == 0, "an idle engine reserves nothing"

        async def talk() -> None:
            persona = PersonaRequest(member_id=fx.PERSONA_ID, name="ada", mode="base")
            turn = [Utterance("2002", "bo", "tell me a long story about the server")]
            while generating.is_set():
                await engine.reply(persona, turn, GenParams(max_tokens=48, temperature=0.0)).text()

        generating.set()
        talker = asyncio.create_task(talk())
        # While replies stream, the trainer's next steps run on the cores the engine leaves (one of two).
        busy = await fx.wait_for(
            lambda: progress(lambda p: p.threads == max(1, cores - serving.n_threads)), timeout=180
        )
        assert busy.progress.step > quiet.progress.step
        # And inside its steps it slept between layers while a reply was being made.
        await fx.wait_for(lambda: progress(lambda p: p.paused_s > 0), timeout=120)
        generating.clear()
        await talker
        assert serving_now(settings.share_dir).busy_threads == 0
        # Serving idle again: the job takes the whole machine back.
        await fx.wait_for(lambda: progress(lambda p: p.threads == cores), timeout=180)
        await sup.cancel(job.id, "admin")
    finally:
        generating.clear()
        await engine.close()
        await sup.close()
        await store.close()
    assert serving_now(settings.share_dir).engines == 0, "a closed engine leaves no mark behind"


@fx.run_async
async def test_a_published_persona_is_ready_and_its_first_reply_embeds_nothing(
    doppel_home: Path, tiny_model: Any
) -> None:
    from core.chatformat import Utterance
    from data.store import Store
    from inference.engine import Engine
    from inference.requests import GenParams, PersonaRequest
    from inference.retrieval import Retriever
    from jobs.supervisor import Supervisor

    settings = _settings(doppel_home)
    await fx.seed_member(settings)
    store = await Store.open(settings)
    sup = Supervisor(store, settings)
    await sup.start()
    try:
        job = await sup.submit(fx.PERSONA_ID, requested_by="admin", **fx.tiny_overrides(tiny_model))
        done = await sup.wait(job.id)
        assert done.status.value == "succeeded", (done.error, done.exit_detail)
        stored = await store.messages.count(fx.PERSONA_ID)
        # Publishing built the retrieval index, and the job's result says what it cost.
        prepared = done.progress.serving
        assert prepared["messages"] == prepared["embedded"] == stored > 0 and prepared["seconds"] >= 0
        adapter = await sup.registry.get(done.adapter_id)
        # A bot started afterwards (a fresh retriever, nothing in memory) answers its first hybrid reply by embedding
        # only the conversation it answers, none of the member's messages.
        retriever = Retriever(store, settings)
        small = dataclasses.replace(settings.inference, n_ctx=512, n_threads=1, max_tokens=8)
        async with Engine(
            dataclasses.replace(settings, inference=small), tiny_model.gguf_path, retriever=retriever
        ) as engine:
            persona = PersonaRequest(
                member_id=fx.PERSONA_ID,
                name="ada",
                mode="adapter+retrieval",
                adapters=((str(adapter.gguf_path), 1.0),),
            )
            stream = engine.reply(persona, [Utterance("2002", "bo", "the build?")], GenParams(max_tokens=8))
            with contextlib.suppress(StopAsyncIteration):
                await stream.text()
        assert retriever.encoded == 1, "only the query was embedded"
    finally:
        await sup.close()
        await store.close()


def test_the_pause_hooks_leave_the_gradients_exactly_as_they_were(tiny_model: Any, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from core.hostshare import ServingMarks, ServingPause
    from trainer.callbacks import pause_between_layers

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model.hf_dir))
    ids = torch.randint(0, model.config.vocab_size, (2, 12))

    def grads() -> list[Any]:
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain = grads()
    marks = ServingMarks(tmp_path, threads=1)
    pause = ServingPause(tmp_path, check_every_s=0.0, max_wait_s=0.01)
    hooks = pause_between_layers(model, pause)
    assert len(hooks) == model.config.num_hidden_layers
    with marks.generating():  # every layer, forward and backward, waits its (short) bound
        hooked = grads()
    for h in hooks:
        h.remove()
    assert pause.pauses == 2 * model.config.num_hidden_layers
    assert all(torch.equal(a, b) for a, b in zip(plain, hooked, strict=True))


def test_a_cancelled_step_ends_at_the_next_block_and_leaves_the_weights_alone(
    tiny_model: Any, tmp_path: Path
) -> None:
    import threading

    import torch
    from transformers import AutoModelForCausalLM

    from core.hostshare import ServingMarks, ServingPause
    from jobspec.errors import StepAbandoned
    from trainer.callbacks import LayerGate, pause_between_layers

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model.hf_dir))
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # Paused for a persona reply that would last longer than any stop may wait.
    gate = LayerGate(ServingPause(tmp_path, check_every_s=0.0, max_wait_s=60.0))
    gate.cancel = threading.Event()
    pause_between_layers(model, gate)
    model(input_ids=ids, labels=ids).loss.backward()  # not armed, not cancelled: a plain step
    gate.armed = True
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    threading.Timer(0.3, gate.cancel.set).start()
    with ServingMarks(tmp_path, threads=1).generating(), pytest.raises(StepAbandoned):
        loss.backward()  # sleeps in the first backward hook until the cancel, then ends the step there
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    gate.armed = False  # outside trainer.train() (evaluation), a cancel never cuts a forward
    model(input_ids=ids)
