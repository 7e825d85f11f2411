"""The end of /persona train: the progress message becomes the results, with the adapter's real loss plot attached.

The job is driven through its real rows (the registry publishes a real adapter folder; the job row turns running,
then succeeded) instead of a training run: training itself is tested in tests/trainer, and here it would only cost
minutes. Only Discord's HTTP is faked.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

ALICE, ADMIN = 111, 333


def _adapter_folder(root: Path, member: str) -> Path:
    from trainer.plot import loss_png

    folder = root / "staged"
    folder.mkdir(parents=True)
    (folder / "adapter.gguf").write_bytes(b"GGUF-test-adapter")
    (folder / "adapter_config.json").write_text("{}", encoding="utf-8")
    loss_png(folder / "loss.png", [(1, 3.2), (2, 2.6), (3, 2.1), (4, 1.9)], title="User111 (sft)")
    metrics = {
        "ppl_base": 35.4,
        "ppl_adapter": 3.26,
        "active": True,
        "gate_reason": "beats base",
        "fidelity": {
            "attribution": {
                "available": True,
                "members": 5,
                "chance": 0.2,
                "accuracy": 0.8,
                "share": {"base": 0.1, "adapter": 0.45},
                "detectability": {"adapter": {"accuracy": 0.625, "ci": [0.386, 0.815], "n": 16}},
            }
        },
    }
    meta = {"member": member, "lineage": [member], "metrics": metrics, "base_model": {"name": "smollm2-135m"}}
    (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return folder


def _patches(h: Any, mid: str) -> list[Any]:
    return [c for c in h.fake.calls if c.method == "PATCH" and c.path.endswith(f"/messages/{mid}")]


def test_finished_job_posts_results_and_loss_plot(bot_world: Any, tmp_path: Path) -> None:
    from bot.persona_commands import PersonaCommands
    from jobs.supervisor import Supervisor
    from models.registry import Registry

    async def scenario() -> None:
        async with bot_world() as (h, services):
            services.supervisor = Supervisor(
                services.store, services.settings
            )  # not started: the test moves the job
            await h.click("doppel:consent:train", ALICE)
            await h.command(
                "persona train", ADMIN, perms=h.ADMIN, member=(6, str(ALICE)), resolved=h.resolved(ALICE)
            )
            (job,) = await services.jobs.recent(member_id=str(ALICE))
            group = h.bot.tree.get_command("persona")
            assert isinstance(group, PersonaCommands) and len(group._watchers) == 1
            progress = [c for c in h.fake.calls if c.response and "Training User111" in c.response["content"]]
            mid = progress[-1].response["id"]

            await services.jobs.update(job.id, status="running", started_at=time.time())
            adapter = await Registry(services.store, services.settings).publish(
                _adapter_folder(tmp_path, str(ALICE)), job_id=job.id, member_id=str(ALICE)
            )
            await services.jobs.update(
                job.id, status="succeeded", adapter_id=adapter.id, finished_at=time.time()
            )
            await asyncio.wait_for(asyncio.gather(*group._watchers.values()), timeout=15)

            final = _patches(h, mid)[-1]
            text = final.payload["content"]
            assert "User111's persona is trained" in text and adapter.id in text
            assert "ppl adapter: 3.26" in text and "ppl base: 35.4" in text
            assert "attributed to User111: 45% of replies (authorship panel of 5 members, chance 20%)" in text
            assert "told apart from User111's real replies: 62% (95% CI 39%–82%, 16 replies" in text, text
            assert final.files == 1, "the loss plot is attached"
            assert final.payload.get("components") == [], "the cancel button is gone"
            assert final.payload["allowed_mentions"]["parse"] == []

    asyncio.run(scenario())


def test_failed_job_posts_the_reason_without_a_plot(bot_world: Any) -> None:
    from bot.persona_commands import PersonaCommands
    from jobs.supervisor import Supervisor

    async def scenario() -> None:
        async with bot_world() as (h, services):
            services.supervisor = Supervisor(services.store, services.settings)
            await h.click("doppel:consent:train", ALICE)
            await h.command("persona train", ALICE, member=(6, str(ALICE)), resolved=h.resolved(ALICE))
            (job,) = await services.jobs.recent(member_id=str(ALICE))
            group = h.bot.tree.get_command("persona")
            assert isinstance(group, PersonaCommands)
            progress = [c for c in h.fake.calls if c.response and "Training User111" in c.response["content"]]
            mid = progress[-1].response["id"]
            await services.jobs.update(
                job.id,
                status="failed",
                finished_at=time.time(),
                error="no training example fits max_length=512 tokens",
            )
            await asyncio.wait_for(asyncio.gather(*group._watchers.values()), timeout=15)
            final = _patches(h, mid)[-1]
            assert "failed" in final.payload["content"] and "max_length=512" in final.payload["content"]
            assert final.files == 0

    asyncio.run(scenario())


def test_a_restarted_bot_goes_on_editing_the_progress_message(bot_world: Any) -> None:
    from data.records import Member
    from jobs.supervisor import Supervisor

    async def scenario() -> None:
        async with bot_world() as (h, services):
            services.supervisor = Supervisor(services.store, services.settings)
            await h.click("doppel:consent:train", ALICE)
            # A member being trained has recorded messages, so the store knows their display name.
            await services.store.members.upsert(Member(str(ALICE), "user111", "User111"))
            await h.command("persona train", ALICE, member=(6, str(ALICE)), resolved=h.resolved(ALICE))
            ((job, channel_id, message_id),) = await services.jobs.with_progress_message()
            progress = [c for c in h.fake.calls if c.response and "Training User111" in c.response["content"]]
            mid = progress[-1].response["id"]
            assert str(message_id) == str(mid) and channel_id == int(h.TEXT)
        # The bot process stops (its watcher with it) while the job runs on; a new one connects.
        async with bot_world() as (h, services):
            await services.jobs.update(job.id, status="running", started_at=time.time())
            await h.bot.on_ready()
            await h.bot.on_ready()  # the gateway reconnects: still one watcher for the job
            assert len(h.bot.persona._watchers) == 1
            await services.jobs.update(
                job.id, status="cancelled", finished_at=time.time(), error=f"cancelled by {ALICE}"
            )
            await asyncio.wait_for(asyncio.gather(*h.bot.persona._watchers.values()), timeout=15)
            final = _patches(h, mid)[-1]
            assert final.path == f"/channels/{h.TEXT}/messages/{mid}"
            assert "cancelled" in final.payload["content"] and "User111" in final.payload["content"]
            # A finished job is not followed again by the next start.
            assert await h.bot.persona.resume_watchers(h.bot) == 0

    asyncio.run(scenario())
