"""The Discord client: intents, the command tree, persistent views and the gateway events, each a one-line hand-off."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import discord

from bot.components import answer_unrouted, is_routed
from bot.consent_views import ConsentPanel, ForgetButton
from bot.doppel_commands import DoppelCommands, SetupView
from bot.errorhook import ErrorTree
from bot.recording import Recorder
from bot.services import Services
from bot.uploads import PendingUploads, UploadButton

log = logging.getLogger("doppel.bot")


def intents() -> discord.Intents:
    """Guilds, guild messages, reactions and the privileged message content intent; no members or presences."""
    wanted = discord.Intents.none()
    wanted.guilds = True
    wanted.guild_messages = True
    wanted.guild_reactions = True
    wanted.dm_messages = True
    wanted.message_content = True  # privileged: enable it in the Developer Portal (docs/discord-setup.md)
    return wanted


class DoppelBot(discord.Client):
    """Doppel on Discord: a thin adapter over `Services`."""

    def __init__(self, services: Services, **options: Any) -> None:
        super().__init__(intents=options.pop("intents", None) or intents(), **options)
        self.services = services
        self.recorder = Recorder(services)
        self.draining = False  # set once shutdown begins: new commands are turned away
        self._gateway_reader: asyncio.Task[Any] | None = None
        self.uploads = PendingUploads()
        self.tree = ErrorTree(self)
        self.tree.add_command(DoppelCommands(services, self.recorder, self.uploads))
        self._extra_setup()

    def _extra_setup(self) -> None:
        from bot.chat import PersonaChat
        from bot.persona_commands import PersonaCommands

        self.chat = PersonaChat(self.services, self)
        self.persona = PersonaCommands(self.services, self.chat)
        self.tree.add_command(self.persona)
        self._join_setup()

    def _join_setup(self) -> None:
        from bot.join_commands import JoinCommands
        from bot.joining import JoinIn

        self.join = JoinIn(self.services, self.chat)
        self.services.forgetters.append(self.join.forget)  # erasure reaches the cached habits too
        self.tree.add_command(JoinCommands(self.services, self.join))

    async def setup_hook(self) -> None:
        """Register persistent views and dynamic buttons so old messages' buttons keep working; sync commands."""
        from bot.guess import GuessVoteButton
        from bot.join_commands import StopButton
        from bot.training import CancelJobButton

        # Every component the bot sends is one of these: a press on any message, however old, reaches a handler.
        self.add_view(ConsentPanel(self.services))
        self.add_view(SetupView(self.services))
        self.add_dynamic_items(CancelJobButton, GuessVoteButton, ForgetButton, UploadButton, StopButton)
        if self.services.settings.bot.sync_commands:
            await self.tree.sync()

    async def connect(self, *, reconnect: bool = True) -> None:
        """discord.py's gateway loop; its task is kept so that `close` can stop it reading first."""
        self._gateway_reader = asyncio.current_task()
        try:
            await super().connect(reconnect=reconnect)
        finally:
            self._gateway_reader = None

    async def close(self) -> None:
        """End the gateway session with close code 1000, so Discord shows the bot offline at once.

        discord.py's close asks for 1000, but aiohttp hands a close to the read that is waiting for the next
        frame, and discord.py's reader answers that by closing with 4000 (a resumable close: the bot stays
        listed online until the session times out). With the reader stopped first, the 1000 goes out.
        """
        reader = self._gateway_reader
        if reader is not None and reader is not asyncio.current_task() and not reader.done():
            reader.cancel()
            await asyncio.wait({reader})
        was_open = self.ws is not None and self.ws.open
        await super().close()
        if was_open:
            log.info("gateway session closed with code 1000 (the bot shows offline at once)")

    async def on_ready(self) -> None:
        log.info("connected as %s to %d server(s)", self.user, len(self.guilds))
        resumed = await self.persona.resume_watchers(self)
        if resumed:
            log.info("following %d training job(s) started before this restart", resumed)

    async def on_interaction(self, interaction: discord.Interaction) -> None:
        """A button press no handler claims (an expired or unknown custom id) still gets an ephemeral answer."""
        if interaction.type is discord.InteractionType.component and not is_routed(self, interaction):
            await answer_unrouted(interaction)

    async def on_message(self, message: discord.Message) -> None:
        await self.recorder.on_message(message)
        # The join gate sees every human message first, whatever a summoned reply then does (it streams for
        # seconds and may fail); the gate only decides here, a persona's turn runs as its own task.
        try:
            await self.join.on_message(message)
        except Exception:
            log.exception("the join gate failed on a message")
        await self.chat.on_message(message)

    async def on_raw_message_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        await self.recorder.on_raw_edit(payload)

    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        await self.recorder.on_raw_delete([payload.message_id])

    async def on_raw_bulk_message_delete(self, payload: discord.RawBulkMessageDeleteEvent) -> None:
        await self.recorder.on_raw_delete(payload.message_ids)

    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        await self.chat.on_reaction(payload)

    async def on_error(self, event_method: str, /, *args: Any, **kwargs: Any) -> None:
        log.exception("error in event handler %s", event_method)
