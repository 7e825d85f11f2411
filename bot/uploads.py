"""`/doppel upload`'s consent step: a checked export waits in memory until its member presses Import or Cancel."""

from __future__ import annotations

import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import discord

from bot.errorhook import reports_errors
from bot.errors import BadUpload
from bot.services import OwnExport, Services

NONE = discord.AllowedMentions.none()
EXPIRED = "This upload is no longer waiting (it expired, or the bot restarted): run `/doppel upload` again."


class PendingUploads:
    """Checked uploads awaiting consent: one per member, at most `max_bytes` in all, each for `ttl_s` seconds."""

    def __init__(
        self,
        ttl_s: float = 900.0,
        max_bytes: int = 64 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._clock = clock
        self._items: OrderedDict[str, tuple[OwnExport, float]] = OrderedDict()  # token -> (export, expiry)

    def __len__(self) -> int:
        self._prune()
        return len(self._items)

    def put(self, upload: OwnExport) -> str:
        """Keep `upload` (replacing that member's earlier one); returns the token its buttons carry."""
        self._prune()
        for token, (other, _) in list(self._items.items()):
            if other.member_id == upload.member_id:
                del self._items[token]
        if len(upload.data) > self.max_bytes:
            raise BadUpload(
                "that export is too large to hold for confirmation; ask an admin to run `doppel import`"
            )
        # Memory is bounded whatever the community does: the oldest waiting uploads give way.
        while self._items and self.held_bytes() + len(upload.data) > self.max_bytes:
            self._items.popitem(last=False)
        token = secrets.token_hex(8)
        self._items[token] = (upload, self._clock() + self.ttl_s)
        return token

    def take(self, token: str) -> OwnExport | None:
        """Remove and return a waiting upload, or None when it expired or never existed (e.g. before a restart)."""
        self._prune()
        item = self._items.pop(token, None)
        return None if item is None else item[0]

    def peek(self, token: str) -> OwnExport | None:
        """A waiting upload without removing it."""
        self._prune()
        item = self._items.get(token)
        return None if item is None else item[0]

    def held_bytes(self) -> int:
        """Bytes held by waiting uploads."""
        return sum(len(u.data) for u, _ in self._items.values())

    def clear(self) -> None:
        """Forget every waiting upload (at shutdown)."""
        self._items.clear()

    def _prune(self) -> None:
        now = self._clock()
        for token in [t for t, (_, expiry) in self._items.items() if expiry <= now]:
            del self._items[token]


ACTIONS = {
    "import": ("Import only", discord.ButtonStyle.success),
    "live": ("Import and record my messages here too", discord.ButtonStyle.primary),
    "cancel": ("Cancel", discord.ButtonStyle.secondary),
}


def upload_choice(token: str, offer_live: bool) -> discord.ui.View:
    """The consent buttons under a checked upload."""
    view = discord.ui.View(timeout=None)
    for action in ACTIONS:
        if action != "live" or offer_live:
            view.add_item(UploadButton(token, action))
    return view


class UploadButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]],
    template=r"doppel:upload:(?P<token>[0-9a-f]{16}):(?P<act>import|live|cancel)",
):
    """Import (consent for the export only), import and record live messages too, or cancel."""

    def __init__(self, token: str, action: str) -> None:
        label, style = ACTIONS[action]
        super().__init__(
            discord.ui.Button(label=label, style=style, custom_id=f"doppel:upload:{token}:{action}")
        )
        self.token = token
        self.action = action

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> UploadButton:
        return cls(match["token"], match["act"])

    @reports_errors
    async def callback(self, interaction: discord.Interaction) -> None:
        client: Any = interaction.client
        uploads: PendingUploads = client.uploads
        waiting = uploads.peek(self.token)
        if waiting is None:
            await interaction.response.send_message(EXPIRED, ephemeral=True)
            return
        if waiting.member_id != str(interaction.user.id):
            await interaction.response.send_message("This button is not for you.", ephemeral=True)
            return
        upload = uploads.take(self.token)  # taken before any await: a double press cannot import twice
        if upload is None:
            await interaction.response.send_message(EXPIRED, ephemeral=True)
            return
        if self.action == "cancel":
            await interaction.response.edit_message(
                content="Nothing was imported and nothing changed.", view=None
            )
            return
        await interaction.response.edit_message(content="Importing your export…", view=None)
        services: Services = client.services
        report = await services.import_upload(upload, live=self.action == "live")
        await interaction.edit_original_response(
            content=result_text(report, live=self.action == "live"), allowed_mentions=NONE
        )


def result_text(report: dict[str, Any], live: bool) -> str:
    """What the member reads after an import."""
    scope = (
        "Your `train` consent is on and covers your live messages in recorded channels too."
        if live
        else "Your `train` consent covers your uploaded exports; your live messages are not recorded."
    )
    return (
        f"Imported **{report['stored']}** of your {report['own']} messages ({report['duplicates']} already stored; "
        f"{report['others_ignored']} by other people ignored). {scope} `/doppel consent` to change it."
    )
