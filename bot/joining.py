"""Personas that join in: after each human message in an opened channel the gate may let one persona speak, at its
member's own pace (their reply delay, the typing indicator for as long as they type, their bursts), through the
same webhook path as every persona reply (`PersonaChat.speak`: no pings).

Every rule reads durable state and is checked at the moment of acting: budgets and conversation cooldowns are spent
in SQLite when the turn is decided (atomically, so concurrent decisions cannot overspend; given back when nothing
was sent), who last wrote where is stored (a time, no text), so a restart neither refills budgets nor forgets that
a member is in the channel; consent, silences, the channel's opening and the member's absence are re-checked before
typing starts, at every typing renewal and right before each message is sent."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import discord

from bot.chat import PersonaChat, utterance
from bot.errors import ConsentMissing, NotAllowed, NotAvailable
from bot.services import Services
from core.chatformat import Utterance
from inference.joingate import LEVELS, RECENT_S, ChannelMemory, Moment, decide, probability, word_corpus
from inference.joinhabits import (
    REPLY_WINDOW_S,
    Habits,
    OwnMessage,
    build_habits,
    sample_burst,
    sample_delay,
    typing_s,
)

log = logging.getLogger("doppel.bot.join")
NEEDS = ("chat", "join")  # speaking unprompted needs the member's chat consent and their own join consent
# Persona conversations (`/join converse`): per channel and per requester an hour, and a pause between two in a
# channel; each turn also spends nothing else (the conversation was asked for), but passes every check.
CONVERSE_PER_HOUR = 3
CONVERSE_COOLDOWN_S = 300.0
TYPING_STEP_S = 8.0  # Discord shows the indicator about 10 s per trigger; renewed (and re-checked) this often


@dataclass
class Conversation:
    """Personas talking to each other on a topic, until the cap or a Stop."""

    id: str
    channel: Any
    members: list[discord.abc.User]
    topic: Utterance
    turns: int
    stopped: bool = False
    spoken: list[str] = field(default_factory=list)  # member ids, in turn order


async def type_for(channel: Any, seconds: float, still: Callable[[], Awaitable[bool]]) -> bool:
    """Show the typing indicator for `seconds`, renewed every TYPING_STEP_S; each renewal first asks `still`.

    Returns False (the indicator not renewed) as soon as `still` says the turn may no longer happen."""
    while True:
        if not await still():
            return False
        await channel.typing()
        step = min(seconds, TYPING_STEP_S)
        await asyncio.sleep(step)
        seconds -= step
        if seconds <= 0:
            return await still()


class JoinIn:
    """The gate's wiring: channel memories, pending turns, budgets, the members' habits (cached)."""

    def __init__(self, services: Services, chat: PersonaChat) -> None:
        self.services = services
        self.chat = chat
        self.settings = services.settings.join
        self.memories: dict[int, ChannelMemory] = {}
        self.pending: dict[int, asyncio.Task[None]] = {}
        self.conversations: dict[str, Conversation] = {}
        self._habits: dict[str, tuple[float, Habits]] = {}
        self._rng = random.Random()
        self._in_guild: dict[str, tuple[tuple[str, frozenset[str]], float, set[str]]] = {}

    # -- habits -----------------------------------------------------------------------------------------------
    async def habits(self, member_id: str) -> Habits:
        """The member's habits from their stored messages (cached for `profile_ttl_s`; built in a worker thread)."""
        cached = self._habits.get(member_id)
        if cached is not None and time.monotonic() - cached[0] < self.settings.profile_ttl_s:
            return cached[1]
        store = self.services.store
        msgs = await store.messages.recent_for_member(member_id, self.settings.profile_messages)
        before = await store.messages.others_before(member_id, self.settings.profile_messages, REPLY_WINDOW_S)
        profile = await store.members.get(member_id)
        names = [profile.name, profile.display_name] if profile else []
        own = [OwnMessage(m.channel_id, m.created_at, m.content, before.get(m.id)) for m in msgs]
        built = await asyncio.to_thread(build_habits, member_id, [n for n in names if n != member_id], own)
        self._habits[member_id] = (time.monotonic(), built)
        return built

    def forget(self, member_id: str) -> None:
        """Drop a member's cached habits (after erasure or a revoke)."""
        self._habits.pop(member_id, None)

    async def may_speak(self, member_id: str, channel: Any) -> bool:
        """Whether the persona may speak here now: consent, the channel's opening, no silence, its member away, a persona."""
        scopes = await self.services.consent.scopes(member_id)
        if not all(s in scopes for s in NEEDS):
            return False
        if await self.services.store.joins.level(str(channel.id)) is None:
            return False
        if await self.services.store.joins.silenced([member_id], str(channel.id)):
            return False
        # Their person is here (durable: a restart does not forget that they just wrote).
        seen = await self.services.store.joins.last_seen(str(channel.id), member_id)
        if seen is not None and time.time() - seen <= self.settings.member_quiet_s:
            return False
        return await self.services.registry.servable(member_id) is not None

    async def candidates(self, guild_id: str, channel_id: str) -> list[str]:
        """Members of this server whose persona may join in here: both consents, not silenced, a trained persona."""
        store = self.services.store
        ids = await store.with_scope("join")
        ids &= await store.with_scope("chat", ids)
        ids -= await store.joins.silenced(sorted(ids), channel_id)
        # Consent is per member, not per server: only members with stored messages here are this server's personas.
        # Cached (that changes rarely; consent and silences above are read afresh for every message).
        key = (guild_id, frozenset(ids))
        cached = self._in_guild.get(guild_id)
        if cached is None or cached[0] != key or time.monotonic() - cached[1] > self.settings.profile_ttl_s:
            cached = (key, time.monotonic(), await store.messages.authors_in_guild(guild_id, sorted(ids)))
            self._in_guild[guild_id] = cached
        ids = set(cached[2])
        return [m for m in sorted(ids) if await self.services.registry.servable(m) is not None]

    # -- gateway events ---------------------------------------------------------------------------------------
    async def memory(self, channel_id: int) -> ChannelMemory:
        """The channel's memory; after a restart, who wrote there lately comes back from the store."""
        memory = self.memories.get(channel_id)
        if memory is None:
            memory = ChannelMemory()
            memory.seen.update(await self.services.store.joins.seen(str(channel_id), time.time() - RECENT_S))
            self.memories[channel_id] = memory
        return memory

    async def on_message(self, message: discord.Message) -> None:
        """Remember who wrote; after a human's message in an opened channel, maybe let one persona answer."""
        if message.guild is None:
            return
        channel = message.channel
        memory = await self.memory(channel.id)
        human = not message.author.bot and message.webhook_id is None
        at = time.time()  # the gate's clock is the bot's (stored message times are UTC epoch seconds too)
        memory.note(str(message.author.id), at, human=human, addressed=await self._addressed(message))
        if not human:
            return  # no chains: a persona's or a webhook's message never triggers a persona
        waiting = self.pending.pop(channel.id, None)
        if waiting is not None:
            waiting.cancel()  # a human answered first: the conversation moved on (a half-sent message is deleted)
        joins = self.services.store.joins
        author = str(message.author.id)
        # Kept across restarts only for members whose persona may join in (the rule that it never talks over
        # them needs it): nothing is stored of anyone who did not opt in, not even when they wrote.
        if await self.services.store.with_scope("join", [author]):
            await joins.note_seen(str(channel.id), author, at)
        level = await joins.level(str(channel.id))
        if level is None or await self._answered_elsewhere(message):
            return
        rule = LEVELS[level]
        ids = await self.candidates(str(message.guild.id), str(channel.id))
        spent = await joins.spent("join", ids, at)
        ids = [m for m in ids if spent.get(m, 0) < rule.persona_per_hour]
        if not ids:
            return
        members = [await self.habits(m) for m in ids]
        moment = Moment(
            channel_id=str(channel.id),
            at=at,
            author_id=str(message.author.id),
            text=message.content,
            reply_to_author=memory.addressed.get(str(message.author.id)),
            pinged=frozenset(str(u.id) for u in message.mentions),
        )
        pick = await decide(
            members,
            moment,
            memory,
            level,
            quiet_s=self.settings.member_quiet_s,
            corpus=word_corpus(members),
        )
        if pick is None:
            return
        # Spent now, when the turn is decided (checked and spent at once in the store): three channels naming the
        # member at the same moment cannot all pass a budget that has one turn left.
        spend = await joins.spend(
            "join",
            str(channel.id),
            pick.member_id,
            at,
            channel_per_hour=rule.channel_per_hour,
            member_per_hour=rule.persona_per_hour,
        )
        if spend is None:
            return
        turn = asyncio.create_task(self._turn(message, pick.member_id, memory.humans, spend))
        self.pending[channel.id] = turn
        turn.add_done_callback(self._done)

    def _done(self, turn: asyncio.Task[None]) -> None:
        for channel_id, task in list(self.pending.items()):
            if task is turn:
                self.pending.pop(channel_id, None)

    async def _addressed(self, message: discord.Message) -> str | None:
        """The member a message replies to (a persona's reply counts as its member), if any."""
        ref = message.reference
        if ref is None or ref.message_id is None:
            return None
        known = await self.chat.known(ref.message_id)
        if known is not None:
            return known.persona_id
        resolved = ref.resolved
        return str(resolved.author.id) if isinstance(resolved, discord.Message) else None

    async def _answered_elsewhere(self, message: discord.Message) -> bool:
        """Whether the summoned path answers this message (a bot mention or a reply to a persona)."""
        me = self.chat.client.user
        if me is not None and any(m.id == me.id for m in message.mentions):
            return True
        ref = message.reference
        return bool(ref and ref.message_id and await self.chat.known(ref.message_id))

    # -- one unprompted turn ----------------------------------------------------------------------------------
    async def _turn(self, trigger: discord.Message, member_id: str, serial: int, spend: int) -> None:
        channel = trigger.channel
        memory = self.memories[channel.id]
        sent_any = False

        async def still() -> bool:
            return await self._still(member_id, channel, memory, serial)

        try:
            member = await self._member(trigger.guild, member_id)
            habits = await self.habits(member_id)
            wait = sample_delay(habits, self._rng, cap_s=self.settings.max_wait_s)
            pieces = sample_burst(habits, self._rng, cap=self.settings.max_burst)
            # The member's delay includes their typing: the indicator shows for the typing part only.
            typing = typing_s(habits, habits.median_chars, self.settings.max_typing_s)
            await asyncio.sleep(max(0.0, wait - typing))
            # The conversation up to the message that chose the persona (nobody human spoke since, or it was cancelled).
            context = await self.chat.context(channel, before=trigger)
            said = utterance(trigger, self.chat.replies)
            if said is not None:
                context.append(said)
            for _ in range(pieces):
                if not await type_for(channel, typing, still):
                    return
                sent = await self.chat.speak(channel, member, context, before_send=still)
                sent_any = True
                known = self.chat.replies.get(sent.id)
                if known is not None:
                    context.append(Utterance(member_id, known.persona_name, known.text))
        except asyncio.CancelledError:
            raise
        except (ConsentMissing, NotAvailable, NotAllowed) as exc:
            log.info("a persona could not join in: %s", exc)
        except Exception:
            log.exception("a persona's unprompted turn failed")
        finally:
            if not sent_any:  # nothing reached the channel: the budget is given back
                await asyncio.shield(self._refund(spend))

    async def _refund(self, spend: int) -> None:
        try:
            await self.services.store.joins.refund(spend)
        except Exception:
            log.exception("could not give a joining-in budget back")

    async def _still(self, member_id: str, channel: Any, memory: ChannelMemory, serial: int) -> bool:
        """Right before acting: nobody human spoke since, and everything still allows it (from the store)."""
        if memory.humans != serial:
            return False
        return await self.may_speak(member_id, channel)

    async def _member(self, guild: discord.Guild | None, member_id: str) -> discord.abc.User:
        if guild is None:
            raise NotAvailable("personas join in on servers only")
        member = guild.get_member(int(member_id))
        if member is None:
            try:
                member = await guild.fetch_member(int(member_id))
            except discord.HTTPException:
                raise NotAvailable("that member is not on this server") from None
        return member

    # -- personas in conversation -----------------------------------------------------------------------------
    async def start_conversation(self, channel_id: str, requester_id: str) -> int:
        """Spend one conversation of the channel's and the requester's hourly budget (and the channel's pause), or
        raise NotAllowed."""
        spend = await self.services.store.joins.spend(
            "converse",
            channel_id,
            requester_id,
            time.time(),
            channel_per_hour=CONVERSE_PER_HOUR,
            member_per_hour=CONVERSE_PER_HOUR,
            cooldown_s=CONVERSE_COOLDOWN_S,
        )
        if spend is None:
            raise NotAllowed(
                f"personas have talked enough here for now (at most {CONVERSE_PER_HOUR} conversations an hour, "
                f"{int(CONVERSE_COOLDOWN_S // 60)} minutes apart)"
            )
        return spend

    async def converse(self, conversation: Conversation, spend: int | None = None) -> int:
        """Run a persona conversation: each turn the gate's likeliest speaker (never the last one), until the cap;
        each turn passes the same checks as joining in (consent, silences, the channel's opening, member away)."""
        self.conversations[conversation.id] = conversation
        memory = ChannelMemory()
        context = [conversation.topic]
        channel = conversation.channel
        try:
            members = {str(m.id): m for m in conversation.members}
            habits = {m: await self.habits(m) for m in members}
            corpus = word_corpus(habits.values())
            for _ in range(conversation.turns):
                last = conversation.spoken[-1] if conversation.spoken else None
                moment = Moment(str(channel.id), time.time(), last or context[-1].author_id, context[-1].text)
                ranked = sorted(
                    (m for m in members if m != last),
                    key=lambda m: -probability(habits[m], moment, memory, corpus)[0],
                )
                speaker = ranked[0]

                async def still(speaker: str = speaker) -> bool:
                    return not conversation.stopped and await self.may_speak(speaker, channel)

                typing = typing_s(habits[speaker], habits[speaker].median_chars, self.settings.max_typing_s)
                if not await type_for(channel, typing, still):
                    break
                sent = await self.chat.speak(channel, members[speaker], list(context), before_send=still)
                conversation.spoken.append(speaker)
                known = self.chat.replies.get(sent.id)
                context.append(Utterance(speaker, members[speaker].display_name, known.text if known else ""))
                memory.note(speaker, time.time(), human=True)
        except (ConsentMissing, NotAvailable, NotAllowed) as exc:
            log.info("a persona conversation stopped: %s", exc)
        finally:
            self.conversations.pop(conversation.id, None)
            if spend is not None and not conversation.spoken:
                await asyncio.shield(self._refund(spend))
        return len(conversation.spoken)
