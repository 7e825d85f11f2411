"""`doppel consent` grants and withdraws the `join` scope on its own; the default grant never includes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from doppel.cli import main

MEMBER = "123456789012345678"


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict[str, object]:
    assert main(["--json", *argv]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_join_is_its_own_scope_on_the_cli(doppel_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _json(capsys, ["consent", "grant", MEMBER]) == {"granted": {MEMBER: ["chat", "train"]}}
    assert _json(capsys, ["consent", "grant", MEMBER, "--scope", "join"]) == {"granted": {MEMBER: ["join"]}}
    listed = _json(capsys, ["consent", "list"])
    assert listed["members"][0]["scopes"] == ["chat", "join", "train"]  # type: ignore[index]
    revoked = _json(capsys, ["consent", "revoke", MEMBER, "--scope", "join"])
    assert revoked["revoked"] == {MEMBER: ["join"]} and revoked["erased"] == {}
