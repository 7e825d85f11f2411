"""Persona chat: a channel webhook speaks as "<name> (AI)", streams by throttled edits, never pings anyone."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import discord

from bot.errors import ConsentMissing, NotAllowed, NotAvailable, RateLimited
from bot.ratelimit import Cooldown, EditThrottle
from bot.services import Services
from bot.text import clip, neutralise
from core.chatformat import Utterance, build_messages
from core.errors import UserFacingError

log = logging.getLogger("doppel.bot.chat")
NONE = discord.AllowedMentions.none()
WEBHOOK_NAME = "Doppel personas"
FEEDBACK = {"👍": 1, "👎": -1}
CURSOR = " ▌"
MAX_REMEMBERED = 2000


class Withdrawn(NotAvailable):
    """A persona turn the rules allowed when it began no longer is (consent, a silence, the channel, the member)."""


@dataclass(frozen=True)
class PersonaReply:
    """What we remember about a persona message, for feedback and for follow-up replies."""

    persona_id: str
    persona_name: str
    adapter_id: str | None
    guild_id: str | None
    channel_id: str
    channel_name: str | None
    context: tuple[Utterance, ...]
    text: str
    mode: str | None = None  # the persona mode that made it (inference.requests.MODES); None for old rows


def reply_payload(reply: PersonaReply) -> dict[str, Any]:
    """What is kept (sealed) of a persona reply, for feedback after a restart."""
    return {
        "persona_name": reply.persona_name,
        "channel_name": reply.channel_name,
        "text": reply.text,
        "context": [[u.author_id, u.name, u.text] for u in reply.context],
    }


def reply_from_row(row: dict[str, Any]) -> PersonaReply:
    """A persona reply read back from the store."""
    payload = row["payload"]
    return PersonaReply(
        persona_id=row["persona_member_id"],
        persona_name=str(payload.get("persona_name") or row["persona_member_id"]),
        adapter_id=row.get("adapter_id"),
        guild_id=row.get("guild_id"),
        channel_id=str(row.get("channel_id") or ""),
        channel_name=payload.get("channel_name"),
        context=tuple(Utterance(str(a), str(n), str(t)) for a, n, t in payload.get("context") or []),
        text=str(payload.get("text") or ""),
        mode=row.get("mode"),
    )


def persona_name(member: discord.abc.User) -> str:
    """How a persona is shown: the member's display name plus " (AI)", within Discord's 80-character limit."""
    return f"{member.display_name[:75]} (AI)"


def utterance(message: discord.Message, replies: dict[int, PersonaReply]) -> Utterance | None:
    """A history message as chat context; a persona's own earlier replies count as that member speaking."""
    known = replies.get(message.id)
    if known is not None:
        return Utterance(author_id=known.persona_id, name=known.persona_name, text=known.text)
    text = message.clean_content.strip()
    if not text:
        return None
    return Utterance(author_id=str(message.author.id), name=message.author.display_name, text=text)


class PersonaChat:
    """Who may talk to which persona, how often, and how the reply reaches the channel."""

    def __init__(self, services: Services, client: discord.Client) -> None:
        self.services = services
        self.client = client
        bot = services.settings.bot
        self.per_member = Cooldown(bot.persona_rate_per_member_s, "you")
        self.per_channel = Cooldown(bot.persona_rate_per_channel_s, "this channel")
        self.replies: OrderedDict[int, PersonaReply] = OrderedDict()
        self._webhooks: dict[int, discord.Webhook] = {}
        self._rated: OrderedDict[tuple[int, int], None] = (
            OrderedDict()
        )  # recent (message, rater); the store has all

    # -- the gate ---------------------------------------------------------------------------------------------
    async def persona_request(self, member: discord.abc.User, channel: Any) -> tuple[Any, str | None]:
        """The engine request for `member`'s persona, if they allowed chat and have a trained persona."""
        from inference.requests import PersonaRequest, resolve_mode, uses_adapters

        if member.bot:
            raise NotAvailable("bots have no persona")
        member_id = str(member.id)
        if "chat" not in await self.services.consent.scopes(member_id):
            raise ConsentMissing(f"{member.display_name} has not allowed chat with their persona")
        adapter = await self.services.registry.servable(member_id)
        if adapter is None:
            raise NotAvailable(f"{member.display_name} has no trained persona yet (`/persona train`)")
        adapter_id, gguf = adapter.id, adapter.gguf_path
        has_messages = await self.services.store.messages.count(member_id) > 0
        mode = resolve_mode(
            self.services.settings.bot.persona_mode, has_adapter=True, has_messages=has_messages
        )
        request = PersonaRequest(
            member_id=member_id,
            name=member.display_name,
            channel_name=getattr(channel, "name", None),
            mode=mode,
            adapters=((str(gguf), 1.0),) if uses_adapters(mode) else (),
            guild_id=str(channel.guild.id) if getattr(channel, "guild", None) else None,
        )
        return request, adapter_id

    def check_rate(self, requester_id: int, channel_id: int) -> None:
        """Raise `RateLimited` when the requester or the channel is cooling down."""
        self.per_member.check(str(requester_id))
        self.per_channel.check(str(channel_id))

    def count_use(self, requester_id: int, channel_id: int) -> None:
        """Start both cooldowns (only for requests that passed the consent and persona checks)."""
        self.per_member.hit(str(requester_id))
        self.per_channel.hit(str(channel_id))

    async def context(self, channel: Any, before: discord.abc.Snowflake | None = None) -> list[Utterance]:
        """Recent channel messages, oldest first, as chat context."""
        limit = self.services.settings.dataset.context_messages
        found: list[Utterance] = []
        async for message in channel.history(limit=limit, before=before):
            u = utterance(message, self.replies)
            if u is not None:
                found.append(u)
        found.reverse()
        return found

    # -- speaking ---------------------------------------------------------------------------------------------
    async def webhook(self, channel: Any) -> tuple[discord.Webhook, Any]:
        """The bot's webhook for the channel (created once), and the thread to post in, if any."""
        thread = channel if isinstance(channel, discord.Thread) else discord.utils.MISSING
        host = channel.parent if isinstance(channel, discord.Thread) else channel
        if not isinstance(host, discord.TextChannel):
            raise NotAvailable("personas can only speak in text channels and their threads")
        cached = self._webhooks.get(host.id)
        if cached is None:
            me = self.client.user
            try:
                hooks = await host.webhooks()
                cached = next(
                    (h for h in hooks if h.name == WEBHOOK_NAME and me and h.user and h.user.id == me.id),
                    None,
                )
                if cached is None:
                    cached = await host.create_webhook(name=WEBHOOK_NAME, reason="Doppel persona replies")
            except discord.Forbidden:
                raise NotAllowed("the bot needs the Manage Webhooks permission in this channel") from None
            self._webhooks[host.id] = cached
        return cached, thread

    async def speak(
        self,
        channel: Any,
        member: discord.abc.User,
        context: list[Utterance],
        before_send: Callable[[], Awaitable[bool]] | None = None,
    ) -> discord.WebhookMessage:
        """Generate `member`'s persona reply and stream it into `channel` through the webhook.

        `before_send` is asked right before the message first appears; when it says no, nothing is sent and
        `Withdrawn` is raised (a turn the rules allowed when it began, no longer allowed)."""
        from inference.requests import GenParams

        request, adapter_id = await self.persona_request(member, channel)
        inference = self.services.settings.inference
        params = GenParams(max_tokens=inference.max_tokens, temperature=inference.temperature)
        webhook, thread = await self.webhook(channel)
        name = persona_name(member)
        throttle = EditThrottle(self.services.settings.bot.stream_edit_interval_s)
        text, sent = "", None
        try:
            async for chunk in self.services.reply(request, context, params):
                text += chunk
                if sent is None and text.strip():
                    if before_send is not None and not await before_send():
                        raise Withdrawn("no longer allowed to speak here")
                    throttle.ready()  # the first chunk goes out at once; edits follow at the throttled rate
                    sent = await webhook.send(
                        clip(neutralise(text) + CURSOR),
                        username=name,
                        avatar_url=member.display_avatar.url,
                        allowed_mentions=NONE,
                        thread=thread,
                        wait=True,
                    )
                elif sent is not None and throttle.ready():
                    await sent.edit(content=clip(neutralise(text) + CURSOR), allowed_mentions=NONE)
        except BaseException:
            # Failed or cancelled mid-stream: a half reply ending in the cursor would stay in the channel, never
            # known as a persona message; it goes.
            if sent is not None:
                await _delete_quietly(sent)
            raise
        final = clip(neutralise(text.strip())) or "…"
        if sent is None:
            if before_send is not None and not await before_send():
                raise Withdrawn("no longer allowed to speak here")
            sent = await webhook.send(
                final,
                username=name,
                avatar_url=member.display_avatar.url,
                allowed_mentions=NONE,
                thread=thread,
                wait=True,
            )
        else:
            await sent.edit(content=final, allowed_mentions=NONE)
        await self.keep(
            sent.id,
            PersonaReply(
                persona_id=str(member.id),
                persona_name=member.display_name,
                adapter_id=adapter_id,
                guild_id=str(channel.guild.id) if getattr(channel, "guild", None) else None,
                channel_id=str(channel.id),
                channel_name=getattr(channel, "name", None),
                context=tuple(context),
                text=final,
                mode=request.mode,
            ),
        )
        return sent

    async def keep(self, message_id: int, reply: PersonaReply) -> None:
        """Remember a reply in memory and in the store, so reactions and replies to it work after a restart."""
        self.remember(message_id, reply)
        try:
            reply = await self.consented(reply)
            await self.services.store.persona_replies.add(
                str(message_id),
                reply.persona_id,
                adapter_id=reply.adapter_id,
                mode=reply.mode,
                guild_id=reply.guild_id,
                channel_id=reply.channel_id,
                context_members=[u.author_id for u in reply.context],
                payload=reply_payload(reply),
            )
        except Exception:
            log.exception("could not store a persona reply")

    async def known(self, message_id: int) -> PersonaReply | None:
        """A persona reply by message id: from memory, else from the store (replies sent before a restart)."""
        reply = self.replies.get(message_id)
        if reply is None:
            row = await self.services.store.persona_replies.get(str(message_id))
            if row is not None:
                reply = reply_from_row(row)
                self.remember(message_id, reply)
        return reply

    async def consented(self, reply: PersonaReply) -> PersonaReply:
        """The reply with its context cut to members holding `train`: nothing of anyone else is ever stored."""
        allowed = await self.services.store.with_scope("train", {u.author_id for u in reply.context})
        allowed.add(reply.persona_id)
        return replace(reply, context=tuple(u for u in reply.context if u.author_id in allowed))

    def remember(self, message_id: int, reply: PersonaReply) -> None:
        """Keep the latest persona replies (bounded) for reactions and reply chains."""
        self.replies[message_id] = reply
        while len(self.replies) > MAX_REMEMBERED:
            self.replies.popitem(last=False)

    # -- gateway events ---------------------------------------------------------------------------------------
    async def on_message(self, message: discord.Message) -> None:
        """A reply to a persona, or a mention of the bot plus a member, in a persona channel gets a persona reply."""
        if message.guild is None or message.author.bot or message.webhook_id is not None:
            return
        target = await self._addressed(message)
        if target is None:
            return
        config = await self.services.guild_config(str(message.guild.id))
        host = getattr(message.channel, "parent_id", None) or message.channel.id
        if (
            str(host) not in config.persona_channels
            and str(message.channel.id) not in config.persona_channels
        ):
            return
        try:
            self.check_rate(message.author.id, message.channel.id)
            await self.persona_request(target, message.channel)
            self.count_use(message.author.id, message.channel.id)
            context = await self.context(message.channel, before=message)
            u = utterance(message, self.replies)
            if u is not None:
                context.append(u)
            await self.speak(message.channel, target, context)
        except RateLimited:
            await _react(message, "⏳")
        except (ConsentMissing, NotAvailable, NotAllowed) as exc:
            # A message cannot be answered ephemerally, and whether a member consented is their business: the
            # reason goes to the asker privately, the channel only sees a neutral reaction.
            await _react(message, "🔒")
            try:
                await message.author.send(f"⚠️ {exc}", allowed_mentions=NONE)
            except discord.HTTPException:
                pass  # DMs closed: the reaction is the whole answer
        except UserFacingError as exc:  # the engine or its server: busy, down, slow, missing an adapter
            await _answer_failed(message, target, str(exc))
        except discord.HTTPException as exc:
            log.warning("a persona reply could not be posted: %s", exc)
            await _answer_failed(message, target, "Discord did not take the reply; try again in a moment")
        except Exception:
            log.exception("a summoned persona reply failed")
            await _answer_failed(message, target, "something went wrong; try again in a moment")

    async def _addressed(self, message: discord.Message) -> discord.abc.User | None:
        ref = message.reference
        known = await self.known(ref.message_id) if ref is not None and ref.message_id is not None else None
        if known is not None:
            persona_id = int(known.persona_id)
            guild = message.guild
            member = guild.get_member(persona_id) if guild else None
            if member is None and guild is not None:
                try:
                    member = await guild.fetch_member(persona_id)
                except discord.HTTPException:
                    return None
            return member
        me = self.client.user
        if me is None or not any(m.id == me.id for m in message.mentions):
            return None
        return next((m for m in message.mentions if m.id != me.id and not m.bot), None)

    async def on_reaction(self, payload: discord.RawReactionActionEvent) -> bool:
        """Record 👍/👎 on a persona reply as feedback (once per rater and message); returns whether recorded."""
        value = FEEDBACK.get(str(payload.emoji))
        me = self.client.user
        if value is None or (me is not None and payload.user_id == me.id):
            return False
        reply = await self.known(payload.message_id)
        if reply is None:
            return False
        key = (payload.message_id, payload.user_id)
        if key in self._rated:
            return False
        self._rated[key] = None  # before any await: two quick reactions must not both pass the stored check
        while len(self._rated) > MAX_REMEMBERED:  # bounded; older pairs are still caught by the stored check
            self._rated.popitem(last=False)
        if await self.services.store.feedback.rated(str(payload.message_id), str(payload.user_id)):
            return False
        reply = await self.consented(reply)
        await self.services.store.feedback.add(
            persona_member_id=reply.persona_id,
            rater_id=str(payload.user_id),
            value=value,
            adapter_id=reply.adapter_id,
            guild_id=reply.guild_id,
            channel_id=reply.channel_id,
            message_id=str(payload.message_id),
            prompt=json.dumps(
                build_messages(reply.persona_id, reply.persona_name, reply.channel_name, reply.context),
                ensure_ascii=False,
            ),
            reply=reply.text,
        )
        return True


async def _delete_quietly(sent: discord.WebhookMessage) -> None:
    """Delete a half-streamed persona message (best effort: it may be gone already)."""
    try:
        await asyncio.shield(sent.delete())
    except (discord.HTTPException, asyncio.CancelledError):
        pass


async def _answer_failed(message: discord.Message, target: discord.abc.User, reason: str) -> None:
    """The one-line answer to a summoned reply that failed: who could not answer and why; pings nobody."""
    line = " ".join(f"⚠️ {target.display_name}'s persona could not answer: {reason}".split())
    try:
        await message.reply(clip(neutralise(line)), mention_author=False, allowed_mentions=NONE)
    except discord.HTTPException:
        await _react(message, "⚠️")


async def _react(message: discord.Message, emoji: str) -> None:
    try:
        await message.add_reaction(emoji)
    except discord.HTTPException:
        pass
