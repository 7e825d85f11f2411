"""The live training message: a bar with ETA and loss, edited at a throttled rate, and the results at the end."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import discord

from bot.components import services_of
from bot.errorhook import reports_errors
from bot.errors import NotAllowed, NotAvailable
from bot.services import Services
from bot.text import clip
from jobs.errors import JobNotFoundError
from jobs.table import Job
from models.errors import AdapterNotFoundError

log = logging.getLogger("doppel.bot.training")
NONE = discord.AllowedMentions.none()


def progress_text(name: str, job: Any) -> str:
    """The progress message body for a job (jobs.table.Job)."""
    from jobspec.progress import render_bar

    job.progress.status = (
        job.status.value
    )  # the row's status is authoritative; progress_json may lag behind it
    return f"**Training {name}'s persona** (job `{job.id}`, {job.mode})\n`{render_bar(job.progress)}`"


def results_text(name: str, job: Any, metrics: dict[str, Any]) -> str:
    """The final message: outcome, and the evaluation summary when the job succeeded."""
    if job.status.value != "succeeded":
        reason = job.error or job.exit_detail or job.status.value
        return clip(f"**Training {name}'s persona: {job.status.value}** (job `{job.id}`)\n{reason}")
    lines = [f"✅ **{name}'s persona is trained** (job `{job.id}`, adapter `{job.adapter_id}`)."]
    shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    for key, value in list(shown.items())[:10]:
        lines.append(
            f"• {key.replace('_', ' ')}: {value:.4g}" if isinstance(value, float) else f"• {key}: {value}"
        )
    attribution = (
        ((metrics.get("fidelity") or {}).get("attribution") or {}) if isinstance(metrics, dict) else {}
    )
    if attribution.get("available"):
        # The panel and chance behind the share: a 5-member panel has chance 20%, not 50%.
        share = (attribution.get("share") or {}).get("adapter")
        lines.append(
            f"• attributed to {name}: {share:.0%} of replies"
            if isinstance(share, (int, float))
            else f"• attributed to {name}: –"
        )
        lines[-1] += (
            f" (authorship panel of {attribution.get('members')} members, "
            f"chance {float(attribution.get('chance') or 0):.0%})"
        )
        told = (attribution.get("detectability") or {}).get("adapter") or {}
        if told.get("accuracy") is not None:
            # How close the persona is: 50% means a classifier cannot tell it from the member's real replies.
            low, high = told["ci"]
            lines.append(
                f"• told apart from {name}'s real replies: {told['accuracy']:.0%} "
                f"(95% CI {low:.0%}–{high:.0%}, {told['n']} replies; 50% = indistinguishable)"
            )
    lines.append("Talk to it with `/persona chat` once they allowed chat.")
    return clip("\n".join(lines))


async def _updates(services: Services, job_id: str, poll_s: float) -> AsyncIterator[Job | None]:
    """The job at each change until it is final (None once it is gone: erased with its member)."""
    supervisor = services.supervisor
    while True:
        if supervisor is not None:
            try:
                async for job in supervisor.watch(job_id):
                    yield job
            except JobNotFoundError:
                yield None
                return
        else:
            got = await services.jobs.get(job_id)
            yield got
            if got is None:
                return
        # Interrupted (its supervisor stopped): a resume by this bot continues it, so the message keeps watching.
        await asyncio.sleep(poll_s)


async def adapter_files(services: Services, adapter_id: str | None) -> tuple[dict[str, Any], Path | None]:
    """An adapter's metrics and its loss plot, if present."""
    if not adapter_id:
        return {}, None
    try:
        adapter = await services.registry.get(adapter_id)
    except AdapterNotFoundError:
        return {}, None
    plot = Path(adapter.path) / "loss.png" if adapter.path else None
    return adapter.metrics, plot if plot is not None and plot.exists() else None


async def watch(
    services: Services,
    message: discord.Message,
    job_id: str,
    name: str,
    poll_s: float = 1.0,
    shown: str | None = None,
) -> None:
    """Keep `message` up to date until the job ends, then replace it with the results (and the loss plot).

    `shown` is the text the message already carries, when known (None after a restart: the first edit goes out).
    The updates are the supervisor's own (`Supervisor.watch`, woken by each job event); a bot without one reads
    the table every `poll_s`.
    """
    from jobspec.progress import Throttle

    throttle = Throttle(services.settings.bot.progress_edit_interval_s)
    view = discord.ui.View(timeout=None)
    view.add_item(CancelJobButton(job_id))
    job: Job | None = None
    async for job in _updates(services, job_id, poll_s):
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
            except discord.HTTPException as exc:  # a failed edit must not stop the watch; the next one may
                log.warning("progress edit failed: %s", exc)
    if job is None:
        return
    metrics, plot = await adapter_files(services, job.adapter_id)
    attachments = [discord.File(plot, filename="loss.png")] if plot else []
    await message.edit(
        content=results_text(name, job, metrics), attachments=attachments, view=None, allowed_mentions=NONE
    )


class CancelJobButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]], template=r"doppel:job:cancel:(?P<job>[A-Za-z0-9_-]{1,64})"
):
    """Cancel a training job; allowed for whoever requested it, the member it trains, and server admins."""

    def __init__(self, job_id: str) -> None:
        super().__init__(
            discord.ui.Button(
                label="Cancel training",
                style=discord.ButtonStyle.danger,
                custom_id=f"doppel:job:cancel:{job_id}",
            )
        )
        self.job_id = job_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> CancelJobButton:
        return cls(match["job"])

    @reports_errors
    async def callback(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        services = services_of(interaction)
        job = await services.jobs.get(self.job_id)
        if job is None:
            raise NotAvailable("that training job no longer exists")
        who = str(interaction.user.id)
        if who not in (job.requested_by, job.member_id) and not interaction.permissions.manage_guild:
            raise NotAllowed("only the member, whoever started the job, or an admin can cancel it")
        if job.status.final:
            await interaction.followup.send(f"That job already ended ({job.status.value}).", ephemeral=True)
            return
        await services.trainer().cancel(self.job_id, actor=who)
        await interaction.followup.send("Cancelling the training job…", ephemeral=True)
