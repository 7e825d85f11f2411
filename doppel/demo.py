"""`doppel demo`: the whole product loop, offline, on a generated community and the bundled base model."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from core.settings import Settings
from doppel.samplecommunity import MEMBERS

# Who consents in the demo: everyone but Prof. Hale, whose messages must therefore never be stored.
CONSENTING = [m for m in MEMBERS if m.name != "prof_hale"]
PERSONA = next(m for m in MEMBERS if m.name == "captain_rook")
PROMPTS = [
    "anyone up for the raid tonight?",
    "what do you all think about pizza with pineapple",
    "i'm so tired of exams honestly",
]
# A short CPU run: about 5 minutes of training on 2 cores for the bundled 135M model.
DEMO_TRAINING = {
    "max_steps": 60,
    "micro_batch_size": 4,
    "grad_accum": 1,
    "eval_samples": 4,
    "eval_max_examples": 32,
}


def say(text: str = "") -> None:
    """Human progress goes to stderr so `--json` keeps stdout machine-readable."""
    print(text, file=sys.stderr, flush=True)


async def run_demo(
    settings: Settings, *, retrain: bool = False, max_steps: int | None = None
) -> dict[str, Any]:
    """Generate, consent, import, train, evaluate and chat; returns a JSON-able summary."""
    from consent.service import ConsentService
    from data.dce_import import import_exports
    from data.store import Store
    from doppel.samplecommunity import write_community

    # Library progress bars (weight loading, embeddings) would drown the demo's own story.
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    t0 = time.monotonic()
    summary: dict[str, Any] = {"home": str(settings.home)}
    async with Store.open(settings) as store:
        say(f"== Doppel demo (state in {settings.home}) ==")
        say("1. Consent: 4 of 5 members of the sample community opt in (Prof. Hale does not).")
        consent = ConsentService(store)
        await consent.grant([m.id for m in CONSENTING], ["train", "chat"], actor="demo", channel="cli")
        for m in CONSENTING:
            from data.records import Member

            await store.members.upsert(Member(id=m.id, name=m.name, display_name=m.nickname))

        with tempfile.TemporaryDirectory(prefix="doppel-demo-export-") as tmp:
            paths = write_community(Path(tmp))
            say(f"2. Import: {len(paths)} DiscordChatExporter files of a generated community.")
            report = await import_exports(store, paths, source="import")
        total = report["total"]
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(total["skipped"].items()) if v) or "none"
        say(
            f"   read {total['read']}, stored {total['stored']} (already stored {total['already_stored']}), "
            f"skipped: {skipped}"
        )
        summary["import"] = total

        say(f"3. Train: a LoRA persona of {PERSONA.nickname} on the bundled SmolLM2-135M, on this CPU.")
        adapter = await _train(store, settings, retrain=retrain, max_steps=max_steps)
        summary["adapter"] = adapter.summary()

        say("4. Evaluate: the trained persona against the base model (held-out replies).")
        from jobspec.verdict import format_report

        metrics = adapter.metrics or adapter.meta.get("metrics", {})
        say(format_report(metrics))
        summary["metrics"] = metrics

        say("5. Chat: the same prompts to the base model, the retrieval persona and the trained persona.")
        summary["replies"] = await _side_by_side(store, settings, adapter)

    say()
    say(f"Done in {time.monotonic() - t0:.0f} s.")
    say(f"  data:    {settings.db_path} (content encrypted; key {settings.key_path})")
    say(f"  adapter: {adapter.path}")
    say(f"  try:     doppel chat {PERSONA.id} --message 'hello there'")
    say("  Discord: create an application and bot (docs/discord-setup.md), then DISCORD_TOKEN=... doppel run")
    summary["elapsed_s"] = round(time.monotonic() - t0, 1)
    return summary


async def _train(store: Any, settings: Settings, *, retrain: bool, max_steps: int | None) -> Any:
    from doppel.commands.train import _follow
    from jobs.supervisor import Supervisor
    from models.registry import Registry

    registry = Registry(store, settings)
    versions = await registry.list(PERSONA.id)
    existing = await registry.active(PERSONA.id) or (versions[-1] if versions else None)
    if existing is not None and not retrain:
        say(
            f"   adapter version {existing.version} ({existing.status}) already exists; reusing it "
            "(--retrain to train again)"
        )
        return existing
    sup = Supervisor(store, settings)
    await sup.start()
    try:
        running = await sup.jobs.active_for_member(PERSONA.id)
        if running is not None:
            # A demo killed mid-training left this job: pick it up where it stopped rather than refuse.
            job = await sup.resume(running.id) if running.status.value == "interrupted" else running
        else:
            overrides: dict[str, Any] = dict(DEMO_TRAINING)
            if max_steps is not None:
                overrides["max_steps"] = max_steps
            job = await sup.submit(PERSONA.id, requested_by="demo", source="cli", mode="sft", **overrides)
        result = await _follow(sup, job.id, as_json=False)
    finally:
        await sup.close()
    return await registry.get(result["adapter_id"])


async def _side_by_side(store: Any, settings: Settings, adapter: Any) -> list[dict[str, str]]:
    from core.chatformat import Utterance
    from inference.engine import Engine
    from inference.requests import GenParams, Mode, PersonaRequest
    from inference.retrieval import Retriever

    def persona(mode: Mode) -> PersonaRequest:
        adapters = ((str(adapter.gguf_path), 1.0),) if mode.startswith("adapter") else ()
        return PersonaRequest(
            member_id=PERSONA.id,
            name=PERSONA.nickname,
            channel_name="general",
            mode=mode,
            adapters=adapters,
            guild_id="demo",
        )

    # Greedy, so the three columns differ only by persona; a mild penalty keeps the small base model out of loops.
    params = GenParams(max_tokens=40, temperature=0.0, seed=1, repeat_penalty=1.15)
    rows: list[dict[str, str]] = []
    async with Engine(settings, retriever=Retriever(store, settings)) as engine:
        for prompt in PROMPTS:
            context = [Utterance("100000000000000004", "Mara", prompt)]
            row = {"prompt": prompt}
            columns: tuple[tuple[str, Mode], ...] = (
                ("base", "base"),
                ("retrieval", "retrieval"),
                ("trained", "adapter"),
            )
            for label, mode in columns:
                row[label] = (await engine.reply(persona(mode), context, params).text()).strip()
            rows.append(row)
            say(f"\n   Mara: {prompt}")
            for label in ("base", "retrieval", "trained"):
                say(f"   {label:>9} {PERSONA.nickname}: {row[label]}")
    return rows
