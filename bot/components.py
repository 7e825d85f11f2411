"""The catch-all for component presses no view or dynamic item claims: each gets an ephemeral "expired" answer."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol, cast

import discord

if TYPE_CHECKING:
    from bot.services import Services


class ServicesHost(Protocol):
    """The Doppel client as the components see it: it carries the bot's services."""

    services: Services


log = logging.getLogger("doppel.bot")

# Which command brings back a fresh control, by custom id prefix (ids the bot never sent fall back to the last).
RERUN = (
    ("doppel:setup:", "/doppel setup"),
    ("doppel:forget:", "/doppel forget"),
    ("doppel:upload:", "/doppel upload"),
    ("doppel:job:", "/persona status"),
    ("doppel:guess:", "/persona guess"),
    ("", "/doppel consent"),
)


def expired_text(custom_id: str) -> str:
    """The answer to a press on a control nothing handles any more."""
    command = next(cmd for prefix, cmd in RERUN if custom_id.startswith(prefix))
    return f"This button has expired: run `{command}` for a fresh one."


def is_routed(client: discord.Client, interaction: discord.Interaction) -> bool:
    """Whether discord.py's view store sent this component interaction to a view or dynamic item.

    This reads the store's tables (private to discord.py 2.x, the same lookup `ViewStore.dispatch_view` does) so the
    answer matches the dispatch exactly; if their shape changes, presses are treated as routed (no double answer).
    """
    data: Any = interaction.data or {}
    custom_id, component_type = str(data.get("custom_id", "")), data.get("component_type")
    try:
        store = client._connection._view_store
        if any(pattern.fullmatch(custom_id) for pattern in store._dynamic_items):
            return True
        key = (component_type, custom_id)
        message_id = interaction.message.id if interaction.message is not None else None
        views = store._views
        return key in views.get(message_id, {}) or key in views.get(None, {})
    except (AttributeError, TypeError):  # pragma: no cover - a discord.py without these tables
        log.warning("cannot tell whether a component press was handled; leaving it to the views")
        return True


async def answer_unrouted(interaction: discord.Interaction) -> None:
    """Answer an unclaimed press ephemerally, so Discord never shows "This interaction failed"."""
    data: Any = interaction.data or {}
    custom_id = str(data.get("custom_id", ""))
    if interaction.response.is_done():
        return
    try:
        await interaction.response.send_message(expired_text(custom_id), ephemeral=True)
    except discord.HTTPException as exc:  # the token expired meanwhile: nothing left to answer
        log.info("could not answer an expired component %r: %s", custom_id, exc)


def services_of(interaction: discord.Interaction[Any]) -> Services:
    """The services of the Doppel client that received the interaction."""
    return cast("ServicesHost", interaction.client).services
