"""Consent buttons: the persistent panel and the erasure confirmation; both keep working after restarts."""

from __future__ import annotations

import re
from typing import Any

import discord

from bot.components import services_of
from bot.errorhook import reply_error, reports_errors
from bot.services import Services
from bot.text import WHAT_IS_STORED, clip, consent_summary
from inference.places import place_words

NONE = discord.AllowedMentions.none()
# Fixed custom ids: a panel posted months ago still routes here once `client.add_view` registered the view.
CUSTOM_IDS = {
    "train": "doppel:consent:train",
    "chat": "doppel:consent:chat",
    "join": "doppel:consent:join",
    "optout": "doppel:consent:optout",
    "forget": "doppel:consent:forget",
    "info": "doppel:consent:info",
}


async def state_text(services: Services, member_id: str) -> str:
    """The member's consent state as shown under the buttons."""
    scopes = await services.consent.scopes(member_id)
    upload_only = "train" in scopes and await services.store.consents.upload_only(member_id)
    return "**Your Doppel consent**\n" + consent_summary(scopes, upload_only=upload_only)


async def show(interaction: discord.Interaction, text: str, view: discord.ui.View | None = None) -> None:
    """Answer a deferred component interaction: edit our own ephemeral message in place, else reply ephemerally."""
    message = interaction.message
    if message is not None and message.flags.ephemeral:
        await interaction.edit_original_response(content=text, view=view, allowed_mentions=NONE)
    elif view is not None:
        await interaction.followup.send(text, view=view, ephemeral=True, allowed_mentions=NONE)
    else:
        await interaction.followup.send(text, ephemeral=True, allowed_mentions=NONE)


def format_report(report: dict[str, Any]) -> str:
    """An erasure report (consent.erasure.ErasureReport as a dict) as a short list."""
    lines = ["🗑️ **Your data was deleted.**"]
    for part, result in (report.get("parts") or {}).items():
        if isinstance(result, dict):
            result = ", ".join(f"{k} {v}" for k, v in result.items() if v) or "nothing"
        if result:
            lines.append(f"• {part.replace('_', ' ')}: {result}")
    retired = report.get("adapters_retired") or []
    if retired:
        lines.append(
            f"• personas retired: {len(retired)} (including any trained on your messages with others')"
        )
    if report.get("jobs_cancelled"):
        lines.append(f"• training jobs cancelled: {len(report['jobs_cancelled'])}")
    if report.get("files_deleted"):
        lines.append(f"• files deleted: {report['files_deleted']}")
    # Every process serving personas is named, also one that did not answer: the member can ask an admin to act.
    for place in report.get("serving") or []:
        lines.append(f"• {place['place']}: {place_words(place)}")
    if len(lines) == 1:
        lines.append("Nothing was stored about you.")
    return clip("\n".join(lines))


class ConsentPanel(discord.ui.View):
    """Opt in, allow chat, allow joining in, opt out, delete, what is stored; each button acts on whoever presses it."""

    def __init__(self, services: Services) -> None:
        super().__init__(timeout=None)
        self.services = services

    async def on_error(self, interaction: discord.Interaction, error: Exception, item: Any) -> None:
        await reply_error(interaction, error)

    async def _change(self, interaction: discord.Interaction, grant: list[str], revoke: list[str]) -> None:
        await interaction.response.defer(ephemeral=True, thinking=not _is_ephemeral(interaction))
        member_id = str(interaction.user.id)
        actor = str(interaction.user.id)
        if grant:
            await self.services.consent.grant([member_id], grant, actor=actor, channel="button")
        if revoke:
            await self.services.revoke(member_id, revoke, actor=actor, channel="button")
        await show(
            interaction,
            await state_text(self.services, member_id),
            self if _is_ephemeral(interaction) else None,
        )

    @discord.ui.button(
        label="Opt in to training", style=discord.ButtonStyle.success, custom_id=CUSTOM_IDS["train"]
    )
    async def opt_in(self, interaction: discord.Interaction, button: discord.ui.Button[Any]) -> None:
        await self._change(interaction, ["train"], [])

    @discord.ui.button(
        label="Allow chat with my persona", style=discord.ButtonStyle.primary, custom_id=CUSTOM_IDS["chat"]
    )
    async def allow_chat(self, interaction: discord.Interaction, button: discord.ui.Button[Any]) -> None:
        await self._change(interaction, ["chat"], [])

    @discord.ui.button(
        label="Let my persona join in (press again to stop)",
        style=discord.ButtonStyle.primary,
        custom_id=CUSTOM_IDS["join"],
    )
    async def allow_join(self, interaction: discord.Interaction, button: discord.ui.Button[Any]) -> None:
        # Its own opt-in: speaking unprompted is more than answering when asked, so `chat` never implies it. A toggle:
        # pressed again it withdraws `join` alone (the next unprompted message is checked against it and not sent).
        held = "join" in await self.services.consent.scopes(str(interaction.user.id))
        await self._change(interaction, [] if held else ["join"], ["join"] if held else [])

    @discord.ui.button(
        label="Opt out (deletes my stored messages)",
        style=discord.ButtonStyle.secondary,
        custom_id=CUSTOM_IDS["optout"],
    )
    async def opt_out(self, interaction: discord.Interaction, button: discord.ui.Button[Any]) -> None:
        await self._change(interaction, [], ["train", "chat", "join"])

    @discord.ui.button(
        label="Delete my data", style=discord.ButtonStyle.danger, custom_id=CUSTOM_IDS["forget"]
    )
    async def forget(self, interaction: discord.Interaction, button: discord.ui.Button[Any]) -> None:
        await interaction.response.send_message(
            CONFIRM_TEXT, view=forget_confirm(interaction.user.id), ephemeral=True
        )

    @discord.ui.button(
        label="What is stored?", style=discord.ButtonStyle.secondary, custom_id=CUSTOM_IDS["info"]
    )
    async def info(self, interaction: discord.Interaction, button: discord.ui.Button[Any]) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        member_id = str(interaction.user.id)
        count = await self.services.store.messages.count(author_id=member_id)
        text = f"{WHAT_IS_STORED}\n\n{await state_text(self.services, member_id)}\nStored messages of yours: **{count}**"
        await interaction.followup.send(clip(text), ephemeral=True, allowed_mentions=NONE)


CONFIRM_TEXT = (
    "Delete **everything** Doppel stores about you: your messages, your key, feedback, training data and every "
    "persona trained on your messages? Your consent is withdrawn too. This cannot be undone."
)


def forget_confirm(member_id: int) -> discord.ui.View:
    """The confirm/cancel pair for the erasure cascade; the buttons carry the member id, so they work at any time."""
    view = discord.ui.View(timeout=None)
    view.add_item(ForgetButton(member_id, confirm=True))
    view.add_item(ForgetButton(member_id, confirm=False))
    return view


class ForgetButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]],
    template=r"doppel:forget:(?P<act>yes|no):(?P<member>[0-9]{1,20})",
):
    """'Yes, delete everything' or 'Cancel'; only the member named in the id can press it, after restarts too."""

    def __init__(self, member_id: int, confirm: bool) -> None:
        label, style = (
            ("Yes, delete everything", discord.ButtonStyle.danger)
            if confirm
            else ("Cancel", discord.ButtonStyle.secondary)
        )
        act = "yes" if confirm else "no"
        super().__init__(
            discord.ui.Button(label=label, style=style, custom_id=f"doppel:forget:{act}:{member_id}")
        )
        self.member_id = member_id
        self.confirm = confirm

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> ForgetButton:
        return cls(int(match["member"]), match["act"] == "yes")

    @reports_errors
    async def callback(self, interaction: discord.Interaction) -> None:
        if interaction.user.id != self.member_id:
            await interaction.response.send_message("This button is not for you.", ephemeral=True)
            return
        if not self.confirm:
            await interaction.response.edit_message(content="Nothing was deleted.", view=None)
            return
        # Erasure deletes files and may cancel a training job: acknowledge first, report when done.
        await interaction.response.edit_message(content="Deleting your data…", view=None)
        services = services_of(interaction)
        report = await services.forget(str(self.member_id), actor=str(interaction.user.id))
        await interaction.edit_original_response(content=format_report(report), allowed_mentions=NONE)


def _is_ephemeral(interaction: discord.Interaction) -> bool:
    return bool(interaction.message is not None and interaction.message.flags.ephemeral)
