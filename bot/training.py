"""The live training message: a bar with ETA and loss, edited at a throttled rate, and the results at the end."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import discord

from bot.persona_views import CancelJobButton
from bot.services import Services, job_state
from bot.text import clip

log = logging.getLogger("doppel.bot.training")
NONE = discord.AllowedMentions.none()


def progress_text(name: str, job: Any) -> str:
    """The progress message body for a job (trainer.jobs.Job)."""
    from trainer.progress import render_bar

    job.progress.status = job.status.value  # the row's status is authoritative; progress_json may lag behind it
    return f"**Training {name}'s persona** (job `{job.id}`, {job.mode})\n`{render_bar(job.progress)}`"


def results_text(name: str, job: Any, metrics: dict[str, Any]) -> str:
    """The final message: outcome, and the evaluation summary when the job succeeded."""
    if job.status.value != "succeeded":
        reason = job.error or job.exit_detail or job.status.value
        return clip(f"**Training {name}'s persona: {job.status.value}** (job `{job.id}`)\n{reason}")
    lines = [f"✅ **{name}'s persona is trained** (job `{job.id}`, adapter `{job.adapter_id}`)."]
    shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    for key, value in list(shown.items())[:10]:
        lines.append(f"• {key.replace('_', ' ')}: {value:.4g}" if isinstance(value, float) else f"• {key}: {value}")
    attribution = ((metrics.get("fidelity") or {}).get("attribution") or {}) if isinstance(metrics, dict) else {}
    if attribution.get("available"):
        # The panel and chance behind the share: a 5-member panel has chance 20%, not 50%.
        share = (attribution.get("share") or {}).get("adapter")
        lines.append(f"• attributed to {name}: {share:.0%} of replies" if isinstance(share, (int, float))
                     else f"• attributed to {name}: –")
        lines[-1] += (f" (authorship panel of {attribution.get('members')} members, "
                      f"chance {float(attribution.get('chance') or 0):.0%})")
    lines.append("Talk to it with `/persona chat` once they allowed chat.")
    return clip("\n".join(lines))


async def adapter_files(services: Services, adapter_id: str | None) -> tuple[dict[str, Any], Path | None]:
    """An adapter's metrics and its loss plot, if present."""
    if not adapter_id:
        return {}, None
    row = await services.store.adapters.get(adapter_id)
    if row is None:
        return {}, None
    metrics = json.loads(row.get("metrics_json") or "{}")
    plot = Path(row["path"]) / "loss.png" if row.get("path") else None
    return metrics, plot if plot is not None and plot.exists() else None


async def watch(services: Services, message: discord.Message, job_id: str, name: str, poll_s: float = 1.0,
                shown: str | None = None) -> None:  # fmt: skip
    """Keep `message` up to date until the job ends, then replace it with the results (and the loss plot).

    `shown` is the text the message already carries, when known (None after a restart: the first edit goes out).
    """
    from trainer.progress import Throttle

    throttle = Throttle(services.settings.bot.progress_edit_interval_s)
    view = discord.ui.View(timeout=None)
    view.add_item(CancelJobButton(job_id))
    while True:
        job = await job_state(services, job_id)
        if job is None:
            await message.edit(content=f"Training job `{job_id}` was removed.", view=None)
            return
        if job.status.final:
            break
        text = progress_text(name, job)
        # Edit only on change: an identical edit spends the channel's rate limit and shows nothing new.
        if text != shown and throttle.ready(job.progress):
            try:
                await message.edit(content=text, view=view, allowed_mentions=NONE)
                shown = text
            except discord.HTTPException as exc:  # a failed edit must not stop the watch; the next one may work
                log.warning("progress edit failed: %s", exc)
        await asyncio.sleep(poll_s)
    metrics, plot = await adapter_files(services, job.adapter_id)
    attachments = [discord.File(plot, filename="loss.png")] if plot else []
    await message.edit(
        content=results_text(name, job, metrics), attachments=attachments, view=None, allowed_mentions=NONE
    )
