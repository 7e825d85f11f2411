"""`/persona guess`: a blind test; a real held-out reply of the member and the persona's reply to the same context."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import re
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import discord

from bot.components import services_of
from bot.errorhook import reports_errors
from bot.errors import NotAllowed, NotAvailable
from bot.services import Services
from bot.text import clip, neutralise
from core.chatformat import Utterance
from models.errors import AdapterNotFoundError

NONE = discord.AllowedMentions.none()
QUOTE_CHARS = 300
MAX_GUESS_CHANNELS = 20  # channels a blind test samples from
MAX_GUESS_MESSAGES = 5000  # latest messages per channel held while sampling
ANSWER_CHARS = 600


@dataclass(frozen=True)
class Sample:
    """One real reply of the member (by id) and the channel context before it."""

    real_message_id: str
    channel_id: str
    channel_name: str | None
    context: tuple[Utterance, ...]
    real_text: str
    ts: float


def candidates(
    messages: Sequence[Any],
    member_id: str,
    settings: Any,
    context_messages: int,
    *,
    heldout_from: float | None,
) -> list[Sample]:
    """The member's replies that answer someone (with their preceding channel turns), limited to held-out ones."""
    from jobs.dataset import build_turns
    from jobspec.cleaning import Cleaner

    ds = settings.dataset
    names = {m.author_id: m.author_name for m in messages}
    cleaner = Cleaner(names, ds.min_chars, ds.max_chars)
    found: list[Sample] = []
    for channel in build_turns(messages, cleaner, ds.merge_gap_s).values():
        for i, turn in enumerate(channel):
            if turn.author_id != member_id or not cleaner.within_bounds(turn.text):
                continue
            context: list[Any] = []
            for prev in reversed(channel[max(0, i - context_messages) : i]):
                if turn.start - prev.end > ds.context_window_s:
                    break
                context.insert(0, prev)
            if not any(t.author_id != member_id for t in context):
                continue  # nothing to answer: a guess between two monologues tells little
            utterances = tuple(
                Utterance(t.author_id, names.get(t.author_id, t.author_name), cleaner.clip(t.text))
                for t in context
            )
            found.append(
                Sample(
                    turn.message_ids[0], turn.channel_id, turn.channel_name, utterances, turn.text, turn.start
                )
            )
    found.sort(key=lambda s: s.ts)
    if heldout_from is not None:
        held = [s for s in found if s.ts >= heldout_from]
        if held:
            return held
    # No adapter window known: the newest share, the same portion training holds out.
    keep = max(1, round(len(found) * ds.heldout_fraction))
    return found[-keep:]


async def pick_sample(
    services: Services,
    member_id: str,
    readable: Callable[[str], bool],
    rng: random.Random,
    adapter_id: str | None,
) -> Sample:
    """A random held-out reply of the member, only from channels every member of this server can read."""
    store = services.store
    channels = [c for c in await store.messages.channels_of(member_id) if readable(str(c))]
    if not channels:
        raise NotAvailable("there are no stored messages of this member in channels everyone here can read")
    allowed = await store.with_scope("train")
    # Held-out replies are the newest: keep the latest messages of each channel only, so memory stays bounded
    # however large the community and its history grow.
    messages: list[Any] = []
    for channel_id in sorted(channels)[:MAX_GUESS_CHANNELS]:
        window: deque[Any] = deque(maxlen=MAX_GUESS_MESSAGES)
        async for m in store.messages.iter_channels([channel_id]):
            if m.author_id in allowed:
                window.append(m)
        messages.extend(window)
    heldout_from = await _heldout_from(services, adapter_id)
    found = await asyncio.to_thread(
        candidates,
        messages,
        member_id,
        services.settings,
        services.settings.bot.guess_context_messages,
        heldout_from=heldout_from,
    )
    if not found:
        raise NotAvailable("none of this member's stored messages answers someone: nothing to compare")
    return rng.choice(found)


async def _heldout_from(services: Services, adapter_id: str | None) -> float | None:
    """When the adapter's held-out window starts (replies from then on were never trained on), if recorded."""
    if adapter_id is None:
        return None
    try:
        meta = (await services.registry.get(adapter_id)).meta
    except AdapterNotFoundError:
        return None
    for holder in (meta.get("data") or {}, meta):
        value = (holder.get("window") or {}).get("heldout_from")
        if isinstance(value, int | float):
            return float(value)
    return None


async def generate(services: Services, request: Any, sample: Sample) -> str:
    """The persona's reply to the sample's context (in the sample's channel)."""
    from inference.requests import GenParams

    request = dataclasses.replace(request, channel_name=sample.channel_name)
    cfg = services.settings.inference
    params = GenParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature)
    text = "".join([chunk async for chunk in services.reply(request, sample.context, params)]).strip()
    if not text:
        raise NotAvailable("the persona produced an empty reply; try `/persona guess` again")
    return text


def _short(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render(name: str, sample: Sample, answers: dict[str, str]) -> str:
    """The public test message: the context, then answers A and B (mentions neutralised)."""
    lines = [
        f"**Blind test: which reply did {name} really write?**",
        f"*in #{sample.channel_name or 'a channel'}:*",
    ]
    lines += [
        f"> **{neutralise(u.name)}**: {neutralise(_short(u.text, QUOTE_CHARS))}" for u in sample.context
    ]
    for label in ("A", "B"):
        lines.append(f"**{label}** → {neutralise(_short(answers[label], ANSWER_CHARS))}")
    lines.append("One vote each; the results go into this persona's fidelity report (`/persona report`).")
    return clip("\n".join(lines))


def results_line(results: dict[str, Any]) -> str:
    """'blind test: N votes, X% identified the real message (chance 50%)'."""
    from jobspec.verdict import blind_test_line

    return blind_test_line(results)


def everyone_reads(guild: discord.Guild, channel_id: str) -> bool:
    """Whether a channel of this server is readable by @everyone (a blind test never leaks a private channel)."""
    channel = guild.get_channel_or_thread(int(channel_id)) if channel_id.isdigit() else None
    if channel is None or (isinstance(channel, discord.Thread) and channel.is_private()):
        return False
    return bool(channel.permissions_for(guild.default_role).view_channel)


async def post_guess(
    services: Services,
    chat: Any,
    interaction: discord.Interaction,
    member: discord.Member,
    rng: random.Random,
) -> str:
    """Build, record and post a blind test for `member`'s persona (the interaction is already deferred)."""
    guild = interaction.guild
    assert guild is not None
    request, adapter_id = await chat.persona_request(
        member, interaction.channel
    )  # chat consent + a trained persona
    member_id = str(member.id)
    if not await services.store.messages.count(author_id=member_id):
        raise NotAvailable(f"{member.display_name} has no stored messages to compare the persona with")
    sample = await pick_sample(services, member_id, lambda cid: everyone_reads(guild, cid), rng, adapter_id)
    chat.count_use(interaction.user.id, interaction.channel_id or 0)
    generated = await generate(services, request, sample)
    if " ".join(generated.split()).casefold() == " ".join(sample.real_text.split()).casefold():
        raise NotAvailable("the persona repeated the real message word for word; try `/persona guess` again")
    real_label = rng.choice(("A", "B"))
    fake_label = "B" if real_label == "A" else "A"
    answers = {real_label: sample.real_text, fake_label: generated}
    test_id = await services.store.blind_tests.create(
        member_id,
        sample.real_message_id,
        real_label,
        adapter_id=adapter_id,
        guild_id=str(guild.id),
        channel_id=str(interaction.channel_id) if interaction.channel_id else None,
    )
    view = discord.ui.View(timeout=None)
    view.add_item(GuessVoteButton(test_id, "A"))
    view.add_item(GuessVoteButton(test_id, "B"))
    # The interaction was acknowledged ephemerally: its first followup stays private, the second is the public test.
    await interaction.followup.send("Blind test posted below: let the others vote.", ephemeral=True)
    await interaction.followup.send(
        render(member.display_name, sample, answers), view=view, allowed_mentions=NONE
    )
    return test_id


async def fidelity_text(services: Services, member_id: str, name: str, guild_id: str | None = None) -> str:
    """The active persona's fidelity report (the same table as `doppel eval`), blind-test votes, the mode served."""
    from jobspec.verdict import format_report

    persona = next(iter(await services.registry.active_personas(member_id)), None)
    if persona is None:
        raise NotAvailable(f"{name} has no trained persona yet (`/persona train`)")
    blind = await services.store.blind_tests.results(member_id, adapter_id=persona.id)
    report = format_report(persona.metrics, blind=blind)
    header = f"**{neutralise(name)}'s persona** v{persona.version} on {persona.base_model}"
    return clip(
        f"{header}\n{await served_text(services, member_id, guild_id)}\n```\n{report.replace('```', '')}\n```"
    )


async def served_text(services: Services, member_id: str, guild_id: str | None) -> str:
    """Which persona mode this server serves, and which modes the persona's kept replies were made with."""
    from inference.requests import AUTO, AUTO_MEANING

    setting = services.settings.bot.persona_mode
    meaning = f" ({AUTO_MEANING})" if setting == AUTO else ""
    modes = await services.store.persona_replies.modes(member_id, guild_id)
    made = ", ".join(f"{n} {mode}" for mode, n in modes.items()) or "none yet"
    return f"Served as `{setting}`{meaning}. Replies kept here, by mode: {made}."


class GuessVoteButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]],
    template=r"doppel:guess:(?P<test>[0-9a-f]{32}):(?P<label>[AB])",
):
    """'A is real' / 'B is real' on a blind test; one vote per member, the persona's own member excluded."""

    def __init__(self, test_id: str, label: str) -> None:
        super().__init__(
            discord.ui.Button(
                label=f"{label} is the real one",
                style=discord.ButtonStyle.primary,
                custom_id=f"doppel:guess:{test_id}:{label}",
            )
        )
        self.test_id = test_id
        self.label = label

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> GuessVoteButton:
        return cls(match["test"], match["label"])

    @reports_errors
    async def callback(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        services = services_of(interaction)
        test = await services.store.blind_tests.get(self.test_id)
        if test is None:
            raise NotAvailable("this blind test was deleted (its member erased their data)")
        if str(interaction.user.id) == test["member_id"]:
            raise NotAllowed("you wrote the real one: your own vote would not tell us anything")
        right = await services.store.blind_tests.vote(self.test_id, str(interaction.user.id), self.label)
        if right is None:
            await interaction.followup.send("You already voted on this test (one vote each).", ephemeral=True)
            return
        totals = await services.store.blind_tests.results(test["member_id"], adapter_id=test["adapter_id"])
        verdict = "right: that one is real" if right else f"fooled: {test['real_label']} was the real one"
        await interaction.followup.send(
            f"Vote recorded. You were {verdict}.\n{results_line(totals)}", ephemeral=True
        )
