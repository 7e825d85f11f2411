"""`/persona ...`: train, status, list, chat, guess, report."""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any, Literal

import discord
from discord import app_commands

from bot.chat import NONE, PersonaChat
from bot.doppel_commands import require_guild
from bot.errors import ConsentMissing, NotAllowed
from bot.guess import fidelity_text, post_guess
from bot.services import Services, active_jobs, remember_progress_message, submit_training, watched_jobs
from bot.text import clip, neutralise
from bot.training import progress_text, watch
from doppel.chatformat import Utterance

log = logging.getLogger("doppel.bot.persona")
Mode = Literal["sft", "sft+kto", "sft+dpo"]


def may_train(interaction: discord.Interaction, member: discord.abc.User) -> None:
    """Only the member themself or a server admin (Manage Server) may start training a persona."""
    if interaction.user.id != member.id and not interaction.permissions.manage_guild:
        raise NotAllowed("only the member themself or an admin (Manage Server) can train this persona")


class PersonaCommands(app_commands.Group):
    """The `/persona` command group."""

    def __init__(self, services: Services, chat: PersonaChat) -> None:
        super().__init__(name="persona", description="Train personas and talk to them")
        self.services = services
        self.chat = chat
        self._watchers: dict[str, asyncio.Task[None]] = {}  # job id -> the task editing its progress message

    @app_commands.command(name="train", description="Train a member's persona (the member themself or an admin)")
    @app_commands.describe(member="whose persona", mode="sft, or sft plus preference tuning from 👍/👎 feedback")
    async def train(self, interaction: discord.Interaction, member: discord.Member, mode: Mode = "sft") -> None:
        require_guild(interaction)
        may_train(interaction, member)
        await interaction.response.defer(thinking=True)
        if "train" not in await self.services.scopes(str(member.id)):
            raise ConsentMissing(f"{member.display_name} has not opted in to training (`/doppel consent`)")
        job_id = await submit_training(self.services, str(member.id), str(interaction.user.id), mode)
        job = await _job(self.services, job_id)
        view = discord.ui.View(timeout=None)
        from bot.persona_views import CancelJobButton

        view.add_item(CancelJobButton(job_id))
        body = progress_text(member.display_name, job) if job is not None else f"Training job `{job_id}` queued"
        message = await interaction.followup.send(body, view=view, wait=True, allowed_mentions=NONE)
        # Interaction tokens expire after 15 minutes; a long job's message is edited through the channel instead.
        channel_message = await _as_channel_message(interaction, message)
        await remember_progress_message(self.services, job_id, channel_message.channel.id, channel_message.id)
        self._start_watch(channel_message, job_id, member.display_name)

    async def resume_watchers(self, client: discord.Client) -> int:
        """After a restart: go on editing the progress messages of jobs that are still active; returns how many."""
        started = 0
        for job, channel_id, message_id in await watched_jobs(self.services):
            if job.id in self._watchers:
                continue  # on_ready fires again on every reconnect
            names = await self.services.member_names([job.member_id] if job.member_id else [])
            message = client.get_partial_messageable(channel_id).get_partial_message(message_id)
            self._start_watch(message, job.id, names.get(job.member_id or "", job.member_id or "multi-persona"))
            started += 1
        return started

    def _start_watch(self, message: Any, job_id: str, name: str) -> None:
        task = asyncio.create_task(watch(self.services, message, job_id, name))
        self._watchers[job_id] = task
        task.add_done_callback(lambda t: self._watch_done(t, job_id))

    def _watch_done(self, task: asyncio.Task[None], job_id: str) -> None:
        if self._watchers.get(job_id) is task:
            del self._watchers[job_id]
        if not task.cancelled() and task.exception() is not None:
            log.error("training watcher failed", exc_info=task.exception())

    @app_commands.command(name="status", description="Training jobs that are queued or running")
    async def status(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        jobs = await active_jobs(self.services)
        if not jobs:
            await interaction.followup.send("No training job is queued or running.", ephemeral=True)
            return
        names = await self.services.member_names([j.member_id for j in jobs if j.member_id])
        lines = [progress_text(names.get(j.member_id or "", j.member_id or "multi-persona"), j) for j in jobs[:8]]
        await interaction.followup.send(clip("\n\n".join(lines)), ephemeral=True, allowed_mentions=NONE)

    @app_commands.command(name="list", description="Trained personas, and members with enough messages to train one")
    async def list(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        personas = await self.services.personas()
        trainable = await self.services.trainable_members()
        names = await self.services.member_names([p["member_id"] for p in personas] + list(trainable))
        lines = ["**Trained personas**"]
        for p in personas:
            chat = "chat on" if "chat" in await self.services.scopes(p["member_id"]) else "chat not allowed"
            lines.append(f"• {names.get(p['member_id'], p['member_id'])}: v{p['version']} on {p['base_model']} ({chat})")
        if not personas:
            lines.append("none yet")
        trained = {p["member_id"] for p in personas}
        ready = [f"• {names.get(m, m)}: {n} messages" for m, n in trainable.items() if m not in trained]
        need = self.services.settings.training.min_examples
        lines += [f"\n**Ready to train** (opted in, at least {need} messages)", *(ready or ["none"])]
        await interaction.followup.send(clip("\n".join(lines)), ephemeral=True, allowed_mentions=NONE)

    @app_commands.command(name="chat", description="Say something to a member's persona")
    @app_commands.describe(member="whose persona", message="what you say")
    async def chat_command(
        self, interaction: discord.Interaction, member: discord.Member, message: app_commands.Range[str, 1, 1500]
    ) -> None:
        require_guild(interaction)
        self.chat.check_rate(interaction.user.id, interaction.channel_id or 0)
        await interaction.response.defer(thinking=True)
        channel = interaction.channel
        await self.chat.persona_request(member, channel)  # consent and adapter checks before anything is posted
        self.chat.count_use(interaction.user.id, interaction.channel_id or 0)
        context = await self.chat.context(channel)
        asker = interaction.user
        context.append(Utterance(author_id=str(asker.id), name=asker.display_name, text=message))
        await interaction.edit_original_response(
            content=clip(f"**{asker.display_name}** → **{member.display_name} (AI)**: {neutralise(message)}"),
            allowed_mentions=NONE,
        )
        await self.chat.speak(channel, member, context)


    @app_commands.command(name="guess", description="Blind test: spot the member's real message next to their persona's")
    @app_commands.describe(member="whose persona to test")
    async def guess(self, interaction: discord.Interaction, member: discord.Member) -> None:
        require_guild(interaction)
        self.chat.check_rate(interaction.user.id, interaction.channel_id or 0)
        await interaction.response.defer(thinking=True)
        await post_guess(self.services, self.chat, interaction, member, random.Random())

    @app_commands.command(name="report", description="A persona's fidelity report, with its blind-test votes")
    @app_commands.describe(member="whose persona")
    async def report(self, interaction: discord.Interaction, member: discord.Member) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        text = await fidelity_text(self.services, str(member.id), member.display_name)
        await interaction.followup.send(text, ephemeral=True, allowed_mentions=NONE)


async def _job(services: Services, job_id: str) -> Any:
    from bot.services import job_state

    return await job_state(services, job_id)


async def _as_channel_message(interaction: discord.Interaction, message: discord.Message) -> discord.Message:
    channel = interaction.channel
    if isinstance(channel, discord.abc.Messageable):
        return channel.get_partial_message(message.id) if hasattr(channel, "get_partial_message") else message  # type: ignore[return-value]
    return message
