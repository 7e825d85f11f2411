"""Recording: turns Discord messages into store records, only for consenting members in allowed channels."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

import discord

from bot.services import GuildConfig, Services
from data.records import Member, Message

log = logging.getLogger("doppel.bot.recording")


def channel_key(channel: Any) -> str:
    """The id the allowlist is keyed on: a thread counts as its parent channel."""
    parent_id = getattr(channel, "parent_id", None)
    if isinstance(channel, discord.Thread) and parent_id:
        return str(parent_id)
    return str(channel.id)


def to_member(user: discord.abc.User) -> Member:
    """The store's view of a Discord user."""
    return Member(
        id=str(user.id),
        name=user.name,
        display_name=user.display_name,
        avatar_url=str(user.display_avatar.url),
        is_bot=user.bot,
    )


def to_record(message: discord.Message, source: str = "discord") -> Message:
    """The store record of a Discord message (mentions rendered as names, as exports do)."""
    ref = message.reference
    return Message(
        id=str(message.id),
        guild_id=str(message.guild.id) if message.guild else None,
        channel_id=str(message.channel.id),
        channel_name=getattr(message.channel, "name", None),
        author_id=str(message.author.id),
        author_name=message.author.display_name,
        created_at=message.created_at.timestamp(),
        content=message.clean_content,
        edited_at=message.edited_at.timestamp() if message.edited_at else None,
        reply_to=str(ref.message_id) if ref and ref.message_id else None,
        reactions={str(r.emoji): r.count for r in message.reactions},
        attachments=len(message.attachments),
        source=source,
    )


def is_person(message: discord.Message) -> bool:
    """False for bots, webhooks (personas included) and system messages: only people are ever recorded."""
    if message.author.bot or message.webhook_id is not None:
        return False
    return message.type in (discord.MessageType.default, discord.MessageType.reply)


class Recorder:
    """The recording gate and the mirror of edits and deletions."""

    def __init__(self, services: Services) -> None:
        self.services = services

    async def should_record(self, message: discord.Message, config: GuildConfig | None = None) -> bool:
        """True only for a person who opted in to recording (`train`, not via an upload) in an allowed, recorded channel."""
        if message.guild is None or not is_person(message):
            return False
        config = config or await self.services.guild_config(str(message.guild.id))
        if not config.records(channel_key(message.channel)):
            return False
        # An upload's consent does not count here (data.consents holds that rule).
        return await self.services.store.consents.records_live(str(message.author.id))

    async def on_message(self, message: discord.Message) -> bool:
        """Store `message` if the gate lets it through; returns whether it was stored."""
        if not await self.should_record(message):
            return False
        await self.services.store.members.upsert(to_member(message.author))
        await self.services.store.messages.add_many([to_record(message)])
        return True

    async def on_raw_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        """Mirror an edit (raw: also for messages no longer in the cache); unknown ids change nothing."""
        if "content" not in payload.data:  # embed unfurls also arrive as edits: nothing to mirror
            return
        message = payload.message
        edited = message.edited_at or discord.utils.utcnow()
        await self.services.store.messages.edit(
            str(payload.message_id), message.clean_content, edited.timestamp()
        )

    async def on_raw_delete(self, message_ids: Iterable[int]) -> None:
        """Mirror deletions (single and bulk)."""
        ids = [str(i) for i in message_ids]
        for message_id in ids:  # ids that are not stored are ignored
            await self.services.store.messages.delete(message_id)

    async def backfill(
        self,
        channel: discord.abc.Messageable,
        *,
        limit: int,
        batch: int = 100,
        pause_s: float = 1.0,
        on_progress: Any = None,
    ) -> dict[str, int]:
        """Read `channel`'s history and store consenting members' messages, one page at a time with a pause."""
        guild = getattr(channel, "guild", None)
        if guild is None:
            return {"read": 0, "stored": 0, "skipped": 0}
        config = await self.services.guild_config(str(guild.id))
        consenting: dict[str, bool] = {}
        pending: list[Message] = []
        members: dict[str, Member] = {}
        read = stored = 0
        async for message in channel.history(limit=limit, oldest_first=True):
            read += 1
            if not is_person(message) or not config.records(channel_key(message.channel)):
                continue
            author = str(message.author.id)
            if author not in consenting:  # one consent lookup per author, not per message
                consenting[author] = await self.services.store.consents.records_live(author)
            if not consenting[author]:
                continue
            members[author] = to_member(message.author)
            pending.append(to_record(message, source="backfill"))
            if len(pending) >= batch:
                stored += await self._flush(members, pending)
                if on_progress is not None:
                    await on_progress(read, stored)
                await asyncio.sleep(pause_s)  # history pages are rate limited: stay well below the bucket
        stored += await self._flush(members, pending)
        return {"read": read, "stored": stored, "skipped": read - stored}

    async def _flush(self, members: dict[str, Member], pending: list[Message]) -> int:
        if not pending:
            return 0
        for member in members.values():
            await self.services.store.members.upsert(member)
        added = await self.services.store.messages.add_many(pending)
        pending.clear()
        members.clear()
        return added
