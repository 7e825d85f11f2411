"""`/join ...`: open a channel to personas joining in (admins), silence your own persona, let personas converse."""

from __future__ import annotations

import re
import secrets
from typing import Any

import discord
from discord import app_commands

from bot.chat import NONE
from bot.doppel_commands import require_admin, require_guild
from bot.errorhook import reports_errors
from bot.errors import ConsentMissing, NotAllowed, NotAvailable
from bot.joining import NEEDS, Conversation, JoinIn
from bot.services import Services
from bot.text import clip, neutralise
from core.chatformat import Utterance
from core.settings import JOIN_LEVELS, JoinSettings
from data.joins import EVERYWHERE

# The levels are declared once (JOIN_LEVELS, the [join] settings' choices); "off" closes the channel.
LEVEL_CHOICES = [app_commands.Choice(name=level, value=level) for level in (*JOIN_LEVELS, "off")]
WHERE_CHOICES = [
    app_commands.Choice(name="this channel", value="here"),
    app_commands.Choice(name="everywhere", value="all"),
]
_LEVEL_HELP = str(
    next(f for f in JoinSettings.__dataclass_fields__.values() if f.name == "default_level").metadata["help"]
)


class StopButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]], template=r"doppel:join:stop:(?P<conv>[0-9a-f]{1,32})"
):
    """Stop a persona conversation; anyone may press it, after restarts too (an ended one says so)."""

    def __init__(self, conversation_id: str) -> None:
        super().__init__(
            discord.ui.Button(
                label="Stop",
                style=discord.ButtonStyle.danger,
                custom_id=f"doppel:join:stop:{conversation_id}",
            )
        )
        self.conversation_id = conversation_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> StopButton:
        return cls(match["conv"])

    @reports_errors
    async def callback(self, interaction: discord.Interaction) -> None:
        join: JoinIn | None = getattr(interaction.client, "join", None)
        running = join.conversations.get(self.conversation_id) if join else None
        if running is None:
            await interaction.response.send_message("That conversation has already ended.", ephemeral=True)
            return
        running.stopped = True
        await interaction.response.send_message(
            f"Stopped by {interaction.user.display_name}.", allowed_mentions=NONE
        )


class JoinCommands(app_commands.Group):
    """The `/join` command group."""

    def __init__(self, services: Services, join: JoinIn) -> None:
        super().__init__(
            name="join", description="Personas joining the conversation, at their member's own pace"
        )
        self.services = services
        self.join = join

    @app_commands.command(name="channel", description="Let personas join in here, and how often (admins)")
    @app_commands.describe(channel="the channel", level=_LEVEL_HELP[:100])
    @app_commands.choices(level=LEVEL_CHOICES)
    async def channel(
        self, interaction: discord.Interaction, channel: discord.TextChannel, level: str | None = None
    ) -> None:
        guild = require_admin(interaction)
        chosen = level or self.services.settings.join.default_level
        await self.services.store.joins.set_level(
            str(guild.id),
            str(channel.id),
            None if chosen == "off" else chosen,
            set_by=str(interaction.user.id),
        )
        text = (
            f"Personas no longer join conversations in {channel.mention}."
            if chosen == "off"
            else f"Personas of members who allowed it (`join` consent) may join conversations in {channel.mention}: "
            f"**{chosen}**."
        )
        await interaction.response.send_message(text, ephemeral=True, allowed_mentions=NONE)

    @app_commands.command(
        name="silence", description="Keep your own persona from joining in (or let it again)"
    )
    @app_commands.describe(
        where="this channel or everywhere", silent="silence it (default) or let it join in again"
    )
    @app_commands.choices(where=WHERE_CHOICES)
    async def silence(
        self, interaction: discord.Interaction, where: str = "here", silent: bool = True
    ) -> None:
        require_guild(interaction)
        channel_id = EVERYWHERE if where == "all" else str(interaction.channel_id)
        await self.services.store.joins.silence(str(interaction.user.id), channel_id, silent)
        place = "anywhere" if where == "all" else "in this channel"
        text = (
            f"Your persona will not join in {place}."
            if silent
            else f"Your persona may join in {place} again."
        )
        await interaction.response.send_message(text, ephemeral=True)

    @app_commands.command(
        name="converse", description="Two or more personas talk about a topic (turns capped)"
    )
    @app_commands.describe(
        first="a persona",
        second="another persona",
        third="a third (optional)",
        topic="what they talk about",
        turns="how many messages in all (capped by the server's [join] converse_max_turns)",
    )
    async def converse(
        self,
        interaction: discord.Interaction,
        first: discord.Member,
        second: discord.Member,
        topic: app_commands.Range[str, 1, 300],
        third: discord.Member | None = None,
        turns: app_commands.Range[int, 1, 100] | None = None,
    ) -> None:
        guild = require_guild(interaction)
        channel = interaction.channel
        members = list({m.id: m for m in (first, second, third) if m is not None}.values())
        if len(members) < 2:
            raise NotAllowed("a conversation needs two different personas")
        # Only where an admin opened the channel to personas joining in (a persona channel is not enough).
        if await self.services.store.joins.level(str(interaction.channel_id)) is None:
            raise NotAllowed("personas cannot talk here: an admin opens a channel with `/join channel` first")
        here = set(
            await self.services.store.messages.authors_in_guild(str(guild.id), [str(m.id) for m in members])
        )
        for m in members:
            scopes = await self.services.consent.scopes(str(m.id))
            if not all(s in scopes for s in NEEDS):
                raise ConsentMissing(f"{m.display_name} has not allowed their persona to join conversations")
            if await self.services.store.joins.silenced([str(m.id)], str(interaction.channel_id)):
                raise NotAllowed(f"{m.display_name} has silenced their persona here")
            if await self.services.registry.servable(str(m.id)) is None:
                raise NotAvailable(f"{m.display_name} has no trained persona yet (`/persona train`)")
            if str(m.id) not in here:
                raise NotAvailable(f"{m.display_name}'s persona has no messages on this server")
        spend = await self.join.start_conversation(str(interaction.channel_id), str(interaction.user.id))
        settings = self.services.settings.join
        cap = min(turns or settings.converse_turns, settings.converse_max_turns)
        conversation = Conversation(
            id=secrets.token_hex(8),
            channel=channel,
            members=list(members),
            topic=Utterance(str(interaction.user.id), interaction.user.display_name, topic),
            turns=cap,
        )
        view = discord.ui.View(timeout=None)
        view.add_item(StopButton(conversation.id))
        names = " and ".join(f"**{m.display_name} (AI)**" for m in members)
        await interaction.response.send_message(
            clip(f"{names} talk about: {neutralise(topic)} ({cap} messages at most; anyone can stop them)"),
            view=view,
            allowed_mentions=NONE,
        )
        spoken = await self.join.converse(conversation, spend)
        ending = "stopped" if conversation.stopped else "ended"
        await interaction.edit_original_response(
            content=clip(f"{names} talked about: {neutralise(topic)} ({ending} after {spoken} messages)"),
            view=None,
            allowed_mentions=NONE,
        )
