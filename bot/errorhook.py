"""The one place errors become replies: known errors as short ephemeral text, unknown ones logged with an id."""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import discord
from discord import app_commands

from core.errors import UserFacingError

log = logging.getLogger("doppel.bot")
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


class ShuttingDown(UserFacingError, app_commands.CheckFailure):
    """A command arrived after shutdown began."""


def unwrap(error: BaseException) -> BaseException:
    """The original exception inside discord.py's invoke wrappers."""
    while (
        isinstance(error, (app_commands.CommandInvokeError, app_commands.TransformerError))
        and error.__cause__
    ):
        error = error.__cause__
    original = getattr(error, "original", None)
    return original if isinstance(original, BaseException) and original is not error else error


def describe(error: BaseException) -> str:
    """The text a member sees for `error`; unknown errors are logged with an id the member can quote."""
    error = unwrap(error)
    if isinstance(error, UserFacingError):
        return f"⚠️ {error}"
    if isinstance(error, app_commands.MissingPermissions):
        return "⚠️ you need the Manage Server permission for this"
    if isinstance(error, app_commands.NoPrivateMessage):
        return "⚠️ this command only works in a server"
    if isinstance(error, app_commands.CheckFailure):
        return "⚠️ you are not allowed to do that here"
    if isinstance(error, discord.Forbidden):
        return "⚠️ Discord refused: the bot lacks a permission here (see the setup guide)"
    error_id = uuid.uuid4().hex[:8]
    log.error("internal error %s", error_id, exc_info=(type(error), error, error.__traceback__))
    return (
        f"❌ something went wrong on our side (error id `{error_id}`); an admin can find it in the bot's log"
    )


async def reply_error(interaction: discord.Interaction, error: BaseException) -> None:
    """Tell the member what went wrong, ephemerally, whether or not the interaction was answered yet."""
    text = describe(error)
    try:
        if interaction.response.is_done():
            await interaction.followup.send(
                text, ephemeral=True, allowed_mentions=discord.AllowedMentions.none()
            )
        else:
            await interaction.response.send_message(
                text, ephemeral=True, allowed_mentions=discord.AllowedMentions.none()
            )
    except (
        discord.HTTPException
    ):  # the interaction token expired or Discord is down: the log keeps the details
        log.warning("could not report an error to the member: %s", text)


def reports_errors(func: F) -> F:
    """Wrap a component callback `(self, interaction, ...)` so its errors reach the member via `reply_error`."""

    @functools.wraps(func)
    async def wrapper(self: Any, interaction: discord.Interaction, *args: Any, **kwargs: Any) -> Any:
        try:
            return await func(self, interaction, *args, **kwargs)
        except Exception as exc:
            await reply_error(interaction, exc)
            return None

    return wrapper  # type: ignore[return-value]


class ErrorTree(app_commands.CommandTree):
    """The command tree whose one error hook maps every command error to an ephemeral reply."""

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        """Turn new commands away once shutdown began (the reply is ephemeral, like every refusal)."""
        if getattr(self.client, "draining", False):
            raise ShuttingDown("Doppel is restarting: try again in a minute")
        return True

    async def on_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        await reply_error(interaction, error)
