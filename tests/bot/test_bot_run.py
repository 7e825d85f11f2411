"""`doppel run` without a token fails with one line; the bot's pieces need no network to be built."""

from __future__ import annotations

from typing import Any

import pytest


def test_run_without_token_is_a_one_line_error(
    doppel_home: Any, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from doppel.cli import main

    monkeypatch.delenv("DISCORD_TOKEN", raising=False)
    assert main(["run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "DISCORD_TOKEN is not set" in err


def test_intents_ask_for_message_content_but_not_members() -> None:
    from bot.client import intents

    wanted = intents()
    assert wanted.message_content and wanted.guild_messages and wanted.guild_reactions
    assert not wanted.members and not wanted.presences


def test_neutralise_breaks_every_ping_form() -> None:
    from bot.text import neutralise

    out = neutralise("@everyone @HERE <@1> <@!2> <@&3> <#4>")
    for ping in ("@everyone", "@HERE", "<@1>", "<@!2>", "<@&3>"):
        assert ping not in out
    assert out.replace("\u200b", "") == "@everyone @HERE <@1> <@!2> <@&3> <#4>"
