"""`/persona ...`: train, status, list, chat, guess, report."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from typing import Any

import discord
from discord import app_commands

from bot.chat import NONE, PersonaChat
from bot.doppel_commands import require_guild
from bot.errors import ConsentMissing, NotAllowed
from bot.guess import fidelity_text, post_guess
from bot.services import Services
from bot.text import MESSAGE_LIMIT, clip, neutralise
from bot.training import progress_text, watch
from core.chatformat import Utterance
from jobspec.config import PRESET_TIMES, TrainConfig

log = logging.getLogger("doppel.bot.persona")
# The training modes are declared once, in TrainConfig's `mode` field; the slash command offers exactly those.
MODE_CHOICES = [app_commands.Choice(name=mode, value=mode) for mode in TrainConfig.choices("mode")]
# The presets likewise (TrainConfig's `preset` field), each shown with the time it states (Discord allows 100 chars).
PRESET_CHOICES = [
    app_commands.Choice(name=f"{preset}: {PRESET_TIMES[preset]}"[:100], value=preset)
    for preset in TrainConfig.choices("preset")
]


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

    @app_commands.command(
        name="train", description="Train a member's persona (the member themself or an admin)"
    )
    @app_commands.describe(
        member="whose persona",
        mode=TrainConfig.help_of("mode")[:100],
        preset="how long to train (default: the server's [training] preset, else good)",
    )
    @app_commands.choices(mode=MODE_CHOICES, preset=PRESET_CHOICES)
    async def train(
        self,
        interaction: discord.Interaction,
        member: discord.Member,
        mode: str = "sft",
        preset: str | None = None,
    ) -> None:
        require_guild(interaction)
        may_train(interaction, member)
        # Acknowledged ephemerally: the first followup of a public acknowledgement is public whatever its flag, and
        # whether a member consented (or has enough messages) is theirs to know, not the channel's.
        await interaction.response.defer(ephemeral=True, thinking=True)
        if "train" not in await self.services.consent.scopes(str(member.id)):
            raise ConsentMissing(f"{member.display_name} has not opted in to training (`/doppel consent`)")
        chosen: dict[str, Any] = {"preset": preset} if preset else {}
        submitted = await self.services.trainer().submit(
            str(member.id), requested_by=str(interaction.user.id), source="discord", mode=mode, **chosen
        )
        job_id = submitted.id
        job = await self.services.jobs.get(job_id)
        view = discord.ui.View(timeout=None)
        from bot.training import CancelJobButton

        view.add_item(CancelJobButton(job_id))
        await interaction.followup.send(
            f"Training job `{job_id}` queued; its progress is posted in this channel.", ephemeral=True
        )
        body = (
            progress_text(member.display_name, job) if job is not None else f"Training job `{job_id}` queued"
        )
        # The second followup is a message of its own, public: the channel follows the training.
        message = await interaction.followup.send(body, view=view, wait=True, allowed_mentions=NONE)
        # Interaction tokens expire after 15 minutes; a long job's message is edited through the channel instead.
        channel_message = await _as_channel_message(interaction, message)
        # Where the progress message is (ids only): a restarted bot goes on editing it.
        await self.services.jobs.update(
            job_id,
            progress_channel_id=str(channel_message.channel.id),
            progress_message_id=str(channel_message.id),
        )
        self._start_watch(channel_message, job_id, member.display_name, shown=body)

    async def resume_watchers(self, client: discord.Client) -> int:
        """After a restart: go on editing the progress messages of jobs that are still active; returns how many."""
        started = 0
        for job, channel_id, message_id in await self.services.jobs.with_progress_message():
            if job.id in self._watchers:
                continue  # on_ready fires again on every reconnect
            names = await self.services.store.members.display_names([job.member_id] if job.member_id else [])
            message = client.get_partial_messageable(channel_id).get_partial_message(message_id)
            self._start_watch(
                message, job.id, names.get(job.member_id or "", job.member_id or "multi-persona")
            )
            started += 1
        return started

    def _start_watch(self, message: Any, job_id: str, name: str, shown: str | None = None) -> None:
        task = asyncio.create_task(watch(self.services, message, job_id, name, shown=shown))
        self._watchers[job_id] = task
        task.add_done_callback(lambda t: self._watch_done(t, job_id))

    async def stop_watchers(self) -> None:
        """Stop editing progress messages (at shutdown; a restarted bot resumes them from the jobs table)."""
        tasks = list(self._watchers.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _watch_done(self, task: asyncio.Task[None], job_id: str) -> None:
        if self._watchers.get(job_id) is task:
            del self._watchers[job_id]
        if not task.cancelled() and task.exception() is not None:
            log.error("training watcher failed", exc_info=task.exception())

    @app_commands.command(name="status", description="Training jobs that are queued or running")
    async def status(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        jobs = await self.services.jobs.active()
        if not jobs:
            await interaction.followup.send("No training job is queued or running.", ephemeral=True)
            return
        names = await self.services.store.members.display_names([j.member_id for j in jobs if j.member_id])
        lines = [
            progress_text(names.get(j.member_id or "", j.member_id or "multi-persona"), j) for j in jobs[:8]
        ]
        await interaction.followup.send(clip("\n\n".join(lines)), ephemeral=True, allowed_mentions=NONE)

    @app_commands.command(
        name="list", description="Trained personas, and members with enough messages to train one"
    )
    async def list(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        await interaction.followup.send(
            await persona_list_text(self.services), ephemeral=True, allowed_mentions=NONE
        )

    @app_commands.command(name="chat", description="Say something to a member's persona")
    @app_commands.describe(member="whose persona", message="what you say")
    async def chat_command(
        self,
        interaction: discord.Interaction,
        member: discord.Member,
        message: app_commands.Range[str, 1, 1500],
    ) -> None:
        require_guild(interaction)
        self.chat.check_rate(interaction.user.id, interaction.channel_id or 0)
        channel = interaction.channel
        # Consent and adapter checks come before the public acknowledgement, so a refusal is answered ephemerally.
        await self.chat.persona_request(member, channel)
        await interaction.response.defer(thinking=True)
        self.chat.count_use(interaction.user.id, interaction.channel_id or 0)
        context = await self.chat.context(channel)
        asker = interaction.user
        context.append(Utterance(author_id=str(asker.id), name=asker.display_name, text=message))
        await interaction.edit_original_response(
            content=clip(f"**{asker.display_name}** → **{member.display_name} (AI)**: {neutralise(message)}"),
            allowed_mentions=NONE,
        )
        await self.chat.speak(channel, member, context)

    @app_commands.command(
        name="guess", description="Blind test: spot the member's real message next to their persona's"
    )
    @app_commands.describe(member="whose persona to test")
    async def guess(self, interaction: discord.Interaction, member: discord.Member) -> None:
        require_guild(interaction)
        self.chat.check_rate(interaction.user.id, interaction.channel_id or 0)
        await self.chat.persona_request(
            member, interaction.channel
        )  # refusals stay between the asker and the bot
        # Ephemeral: picking a sample can still refuse (e.g. no messages in public channels); the test goes public.
        await interaction.response.defer(ephemeral=True, thinking=True)
        await post_guess(self.services, self.chat, interaction, member, random.Random())

    @app_commands.command(name="report", description="A persona's fidelity report, with its blind-test votes")
    @app_commands.describe(member="whose persona")
    async def report(self, interaction: discord.Interaction, member: discord.Member) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        guild = str(interaction.guild_id) if interaction.guild_id else None
        text = await fidelity_text(self.services, str(member.id), member.display_name, guild)
        await interaction.followup.send(text, ephemeral=True, allowed_mentions=NONE)


LIST_LIMIT = 15  # per section of /persona list: the community can be thousands, a message is 2000 characters


async def persona_list_text(services: Services, limit: int = LIST_LIMIT) -> str:
    """`/persona list`: the newest personas and the members readiest to train, each capped, with how many more."""
    personas = await services.registry.active_personas(limit=limit)
    ready = await services.trainable_members(limit=limit, untrained=True)
    owners = [p.member_id for p in personas if p.member_id is not None]
    names = await services.store.members.display_names([*owners, *ready])
    chat = await services.store.consents.with_scope("chat", owners)

    def name(member_id: str) -> str:
        return neutralise(names.get(member_id, member_id)[:40])

    trained = [
        f"• {name(str(p.member_id))}: v{p.version} on {p.base_model} "
        f"({'chat on' if p.member_id in chat else 'chat not allowed'})"
        for p in personas
    ]
    waiting = [f"• {name(m)}: {n} messages" for m, n in ready.items()]
    need = services.settings.training.min_examples
    half = MESSAGE_LIMIT // 2 - 10  # each section fits its half, "…and N more" included
    return clip(
        _section("**Trained personas**", trained, await services.registry.count_personas(), half, "none yet")
        + "\n\n"
        + _section(
            f"**Ready to train** (opted in, at least {need} messages)",
            waiting,
            await services.trainable_count(untrained=True),
            half,
            "none",
        )
    )


def _section(title: str, lines: Sequence[str], total: int, budget: int, empty: str) -> str:
    """A titled list within `budget` characters; the lines that do not fit are counted in "…and N more"."""
    out = [title]
    room = budget - len(title) - 24  # keeps space for the "…and N more" line
    for line in lines:
        if room - len(line) - 1 < 0:
            break
        out.append(line)
        room -= len(line) + 1
    shown = len(out) - 1
    if not lines:
        out.append(empty)
    elif total > shown:
        out.append(f"…and {total - shown} more")
    return "\n".join(out)


async def _as_channel_message(interaction: discord.Interaction, message: discord.Message) -> discord.Message:
    channel = interaction.channel
    if isinstance(channel, discord.abc.Messageable):
        return channel.get_partial_message(message.id) if hasattr(channel, "get_partial_message") else message  # type: ignore[return-value]
    return message
