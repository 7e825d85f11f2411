"""CLI: consent, import, forget, export-data; JSON output and one-line errors with non-zero exits."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from doppel.cli import main
from tests.helpers.dce_fixtures import GENERAL, MAREN, TEO


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    assert main(["--json", *argv]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("doppel: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_consent_import_export_forget_round_trip(
    doppel_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    granted = _json(capsys, ["consent", "grant", MAREN, TEO, "--scope", "train"])
    assert granted == {"granted": {MAREN: ["train"], TEO: ["train"]}}
    listed = _json(capsys, ["consent", "list"])
    assert [m["member_id"] for m in listed["members"]] == [MAREN, TEO]
    imported = _json(capsys, ["import", str(GENERAL)])
    # general.json: Maren's 6 and Teo's 4 messages with text; Juno's 3 and tallybot's 1 have no consent.
    assert imported["total"]["stored"] == 10 and imported["total"]["skipped"]["no_consent"] == 4
    assert _json(capsys, ["import", str(GENERAL)])["total"]["stored"] == 0

    out = tmp_path / "teo.json"
    summary = _json(capsys, ["export-data", TEO, "-o", str(out)])
    assert summary["messages"] == 4
    data = json.loads(out.read_text())
    assert data["member_id"] == TEO and data["profile"]["name"] == "teo"
    assert all(m["author_id"] == TEO and m["content"] for m in data["messages"])
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    assert [e["action"] for e in data["consent_audit"]] == ["grant"]

    report = _json(capsys, ["forget", TEO])
    assert report["parts"]["messages"] == 4 and report["parts"]["member_key"] == 1
    after = _json(capsys, ["export-data", TEO])
    assert after["messages"] == [] and after["profile"] is None
    assert [e["action"] for e in after["consent_audit"]] == ["grant", "forgotten"]

    revoked = _json(capsys, ["consent", "revoke", MAREN, "--scope", "train"])
    assert revoked["revoked"] == {MAREN: ["train"]} and revoked["erased"][MAREN]["parts"]["messages"] == 6


def test_human_output_of_import(doppel_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["consent", "grant", MAREN]) == 0
    assert main(["import", str(GENERAL)]) == 0
    out = capsys.readouterr().out
    assert "stored 6" in out and "total (1 files)" in out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["import", "/definitely/not/here.json"], "no such file"),
        (["forget", "not-an-id"], "not a Discord user id"),
        (["export-data", "12x"], "not a Discord user id"),
        (["consent", "grant", "123", "--scope", "everything"], "unknown consent scope"),
        (["consent", "grant", "@someone"], "not a Discord user id"),
        (["consent"], "required"),
        (["export-data", "123", "-o", "/no/such/folder/x.json"], "no such folder"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(
    doppel_home: Path, capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    assert needle in _error(capsys, argv)


def test_failed_file_exits_nonzero_but_imports_the_others(
    doppel_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "broken.json"
    bad.write_bytes(GENERAL.read_bytes()[:5000])
    assert main(["consent", "grant", MAREN]) == 0
    capsys.readouterr()
    code = main(["--json", "import", str(bad), str(GENERAL)])
    captured = capsys.readouterr()
    assert code == 2
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["total"]["failed"] == 1 and result["total"]["stored"] == 6
    assert (
        "broken.json" in captured.err and "truncated" in captured.err and len(captured.err.splitlines()) == 1
    )


def test_console_entry_point_in_a_subprocess(doppel_home: Path) -> None:
    env = {**os.environ, "DOPPEL_HOME": str(doppel_home)}
    proc = subprocess.run(
        [sys.executable, "-m", "doppel", "forget", "nope"],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        timeout=60,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == "doppel: error: not a Discord user id: 'nope' (expected digits, e.g. 123456789012345678)"
    )
