"""The SQLite store: schema, migrations, repositories, DiscordChatExporter import, member data export."""

from __future__ import annotations
