"""`/doppel ...`: consent, the opt-in panel, server setup, channels, backfill, upload, mydata, forget."""

from __future__ import annotations

import asyncio
import io
import json
import time
from typing import Any

import discord
from discord import app_commands

from bot.consent_views import CONFIRM_TEXT, NONE, ConsentPanel, forget_confirm, state_text
from bot.errorhook import reply_error
from bot.errors import BadUpload, NotAllowed, NotAvailable, RecordingOff
from bot.recording import Recorder
from bot.services import GuildConfig, Services, only_author
from bot.text import POLICY_NOTICE, UPLOAD_CONSENT, WHAT_IS_STORED, clip
from bot.uploads import PendingUploads, upload_choice
from consent.export import member_export

PANEL_TEXT = (
    "**Doppel: AI personas of members who opt in**\n"
    "Nothing you write is recorded unless you press **Opt in to training**. You can opt out or delete "
    "everything at any time.\n\n" + WHAT_IS_STORED
)


def require_guild(interaction: discord.Interaction) -> discord.Guild:
    """The interaction's server, or a clear error in DMs."""
    if interaction.guild is None:
        raise NotAllowed("this command only works in a server")
    return interaction.guild


def require_admin(interaction: discord.Interaction) -> discord.Guild:
    """The server, if the member may manage it (Manage Server)."""
    guild = require_guild(interaction)
    if not interaction.permissions.manage_guild:
        raise NotAllowed("you need the Manage Server permission for this")
    return guild


def config_text(config: GuildConfig) -> str:
    """A server's recording settings, readable."""
    ack = (
        f"acknowledged by <@{config.acknowledged_by}>"
        if config.acknowledged_by
        else "policy not acknowledged"
    )
    allowed = ", ".join(f"<#{c}>" for c in sorted(config.allowed_channels)) or "none"
    personas = ", ".join(f"<#{c}>" for c in sorted(config.persona_channels)) or "none"
    state = "**on**" if config.recording and config.acknowledged_by else "**off**"
    return f"Recording: {state} ({ack})\nRecorded channels: {allowed}\nPersona channels: {personas}"


SETUP_IDS = {"on": "doppel:setup:on", "off": "doppel:setup:off"}


class SetupView(discord.ui.View):
    """The admin's acknowledgement of Discord's Developer Policy, and the recording switch.

    Persistent (fixed custom ids, registered at start-up): a switch that turns recording off must work on any
    `/doppel setup` message, also after a restart. Any member with Manage Server may press it.
    """

    def __init__(self, services: Services) -> None:
        super().__init__(timeout=None)
        self.services = services

    async def on_error(self, interaction: discord.Interaction, error: Exception, item: Any) -> None:
        await reply_error(interaction, error)

    @discord.ui.button(
        label="I acknowledge: turn recording on", style=discord.ButtonStyle.danger, custom_id=SETUP_IDS["on"]
    )
    async def acknowledge(self, interaction: discord.Interaction, button: discord.ui.Button[Any]) -> None:
        guild = require_admin(interaction)
        await interaction.response.defer()
        config = await self.services.update_guild(
            str(guild.id),
            recording=True,
            acknowledged_by=str(interaction.user.id),
            acknowledged_at=time.time(),
        )
        await interaction.edit_original_response(
            content=POLICY_NOTICE + "\n\n" + config_text(config), view=self
        )

    @discord.ui.button(
        label="Turn recording off", style=discord.ButtonStyle.secondary, custom_id=SETUP_IDS["off"]
    )
    async def turn_off(self, interaction: discord.Interaction, button: discord.ui.Button[Any]) -> None:
        guild = require_admin(interaction)
        await interaction.response.defer()
        config = await self.services.update_guild(str(guild.id), recording=False)
        await interaction.edit_original_response(
            content=POLICY_NOTICE + "\n\n" + config_text(config), view=self
        )


class DoppelCommands(app_commands.Group):
    """The `/doppel` command group."""

    def __init__(self, services: Services, recorder: Recorder, uploads: PendingUploads) -> None:
        super().__init__(name="doppel", description="Consent, recording and your data")
        self.services = services
        self.recorder = recorder
        self.uploads = uploads

    @app_commands.command(name="consent", description="See and change what you agreed to")
    async def consent(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        text = await state_text(self.services, str(interaction.user.id))
        await interaction.followup.send(
            text, view=ConsentPanel(self.services), ephemeral=True, allowed_mentions=NONE
        )

    @app_commands.command(name="panel", description="Post the opt-in panel in this channel (admins)")
    async def panel(self, interaction: discord.Interaction) -> None:
        require_admin(interaction)
        await interaction.response.send_message(
            PANEL_TEXT, view=ConsentPanel(self.services), allowed_mentions=NONE
        )

    @app_commands.command(
        name="setup", description="Read the data policy and turn recording on or off (admins)"
    )
    async def setup(self, interaction: discord.Interaction) -> None:
        guild = require_admin(interaction)
        await interaction.response.defer(ephemeral=True, thinking=True)
        config = await self.services.guild_config(str(guild.id))
        await interaction.followup.send(
            POLICY_NOTICE + "\n\n" + config_text(config),
            view=SetupView(self.services),
            ephemeral=True,
            allowed_mentions=NONE,
        )

    @app_commands.command(
        name="channel", description="Choose whether a channel is recorded and hosts personas (admins)"
    )
    @app_commands.describe(
        channel="the channel", record="record consenting members here", personas="let personas reply here"
    )
    async def channel(
        self,
        interaction: discord.Interaction,
        channel: discord.TextChannel,
        record: bool | None = None,
        personas: bool | None = None,
    ) -> None:
        guild = require_admin(interaction)
        await interaction.response.defer(ephemeral=True, thinking=True)
        config = await self.services.guild_config(str(guild.id))
        allowed, persona = set(config.allowed_channels), set(config.persona_channels)
        key = str(channel.id)
        if record is not None:
            (allowed.add if record else allowed.discard)(key)
        if personas is not None:
            (persona.add if personas else persona.discard)(key)
        config = await self.services.update_guild(
            str(guild.id), allowed_channels=sorted(allowed), persona_channels=sorted(persona)
        )
        await interaction.followup.send(config_text(config), ephemeral=True, allowed_mentions=NONE)

    @app_commands.command(
        name="backfill", description="Record a channel's history for consenting members (admins)"
    )
    @app_commands.describe(channel="a recorded channel", limit="how many past messages to read")
    async def backfill(
        self,
        interaction: discord.Interaction,
        channel: discord.TextChannel,
        limit: app_commands.Range[int, 1, 100_000] = 5000,
    ) -> None:
        guild = require_admin(interaction)
        await interaction.response.defer(ephemeral=True, thinking=True)
        config = await self.services.guild_config(str(guild.id))
        if not config.records(str(channel.id)):
            raise RecordingOff(
                f"{channel.mention} is not recorded: run /doppel setup and /doppel channel first"
            )

        async def progress(read: int, stored: int) -> None:
            await interaction.edit_original_response(content=f"Reading history… {read} read, {stored} stored")

        result = await self.recorder.backfill(
            channel, limit=limit, pause_s=self.services.settings.bot.backfill_pause_s, on_progress=progress
        )
        await interaction.edit_original_response(
            content=f"Backfill of {channel.mention} done: {result['read']} read, {result['stored']} stored "
            f"(only members who opted in to training)."
        )

    @app_commands.command(name="upload", description="Import your own DiscordChatExporter JSON export")
    @app_commands.describe(
        export="a .json file exported with DiscordChatExporter; only your own messages are kept"
    )
    async def upload(self, interaction: discord.Interaction, export: discord.Attachment) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        limit_mb = self.services.settings.bot.upload_max_mb
        if not export.filename.lower().endswith(".json"):
            raise BadUpload("attach the .json file DiscordChatExporter wrote (JSON format)")
        if export.size > limit_mb * 1024 * 1024:
            raise BadUpload(
                f"that file is over {limit_mb} MB; split the export or ask an admin to run `doppel import`"
            )
        member_id = str(interaction.user.id)
        # The file is checked and cut to the member's own messages before anything is stored or consented to:
        # consent is asked next, with what it covers, and takes effect only if the import succeeds.
        raw = await export.read()
        own = await asyncio.to_thread(only_author, raw, member_id)
        token = self.uploads.put(own)
        live = await self.services.store.consents.records_live(member_id)
        lines = [
            f"Your export of **#{discord.utils.escape_markdown(own.channel)}** holds **{own.own}** messages of yours.",
            UPLOAD_CONSENT.format(own=own.own, others=own.read - own.own),
        ]
        if live:
            lines.append("You already opted in to recording, so importing changes nothing else.")
        lines.append(f"This choice stays open for {int(self.uploads.ttl_s // 60)} minutes.")
        await interaction.followup.send(
            clip("\n\n".join(lines)),
            view=upload_choice(token, offer_live=not live),
            ephemeral=True,
            allowed_mentions=NONE,
        )

    @app_commands.command(
        name="mydata", description="Get everything Doppel stores about you, as a file in a DM"
    )
    async def mydata(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        data = await member_export(self.services.store, str(interaction.user.id), self.services.erasure)
        raw = json.dumps(data, ensure_ascii=False, indent=2, default=str).encode("utf-8")
        file = discord.File(io.BytesIO(raw), filename=f"doppel-data-{interaction.user.id}.json")
        try:
            await interaction.user.send("Here is everything Doppel stores about you.", file=file)
        except discord.Forbidden:
            raise NotAvailable(
                "I cannot DM you: allow direct messages from this server's members and retry"
            ) from None
        await interaction.followup.send("Sent to your DMs.", ephemeral=True)

    @app_commands.command(name="forget", description="Delete everything Doppel stores about you")
    async def forget(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_message(
            CONFIRM_TEXT, view=forget_confirm(interaction.user.id), ephemeral=True
        )

    @app_commands.command(name="help", description="What Doppel stores and how to control it")
    async def help(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_message(clip(WHAT_IS_STORED), ephemeral=True)
