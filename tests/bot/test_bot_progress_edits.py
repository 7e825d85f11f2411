"""Issue 12 (5): the training progress message is edited when what it shows changes, not on every poll."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

ALICE = 111


def test_progress_message_is_edited_only_on_change(bot_world: Any) -> None:
    from bot.training import watch
    from jobs.supervisor import Supervisor

    async def scenario() -> None:
        async with bot_world() as (h, services):
            services.settings = dataclasses.replace(
                services.settings,
                bot=dataclasses.replace(services.settings.bot, progress_edit_interval_s=0.0),
            )
            services.supervisor = Supervisor(
                services.store, services.settings
            )  # not started: the test moves the job
            await services.consent.grant([str(ALICE)], ["train"], actor="t", channel="cli")
            job_id = (
                await services.trainer().submit(
                    str(ALICE), requested_by=str(ALICE), source="discord", mode="sft"
                )
            ).id
            message = h.bot.get_partial_messageable(h.TEXT).get_partial_message(4242)
            task = asyncio.create_task(watch(services, message, job_id, "Alice", poll_s=0.01))

            def edits() -> list[str]:
                return [
                    c.payload["content"]
                    for c in h.fake.calls
                    if c.method == "PATCH" and c.path.endswith("/4242")
                ]

            async def polls(n: int = 20) -> None:
                # What the job's runner does after each write: the supervisor's watchers wake at once.
                services.trainer().changed()
                for _ in range(n):
                    await asyncio.sleep(0.01)

            await polls()
            assert len(edits()) == 1, "the first poll shows the state; the polls after it have nothing new"
            progress = {"status": "running", "step": 3, "total": 10, "loss": 2.5}
            await services.jobs.update(job_id, status="running", progress_json=json.dumps(progress))
            await polls()
            assert len(edits()) == 2 and "step 3/10" in edits()[-1]
            await services.jobs.update(job_id, progress_json=json.dumps({**progress, "step": 4}))
            await polls()
            assert len(edits()) == 3 and "step 4/10" in edits()[-1]
            await services.jobs.update(job_id, status="cancelled")
            services.trainer().changed()
            await asyncio.wait_for(task, timeout=10)
            assert len(edits()) == 4 and "cancelled" in edits()[-1]

    asyncio.run(scenario())
