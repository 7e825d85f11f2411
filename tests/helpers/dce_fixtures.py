"""The DiscordChatExporter fixtures in the checkout (tests/fixtures/dce): where they are and who is in them.

Two kinds (tests/fixtures/dce/README.md): real captures written by DCE itself (MIT, every message by a bot, so
they test the format), and hand-made exports in DCE's shape whose human authors test consent and import rules.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "dce"

# Real DCE 2.47.1 and 2.48 captures of nordscope-fi/Discord-stoat-ferry's own test server.
REAL = FIXTURES / "stoat-ferry"
REAL_2_47_1 = REAL / "dce-2.47.1"
REAL_2_48 = REAL / "dce-2.48"
FERRY_BOT = "1505990747130953738"  # "D-Ferry Test app", the author of every real message

# Hand-made exports, in this project's own words.
HANDMADE = FIXTURES / "handmade"
GENERAL = HANDMADE / "general.json"
CHILL = HANDMADE / "chill-talk.json"
CHILL_LATER = HANDMADE / "chill-talk.without-deleted-message.json"
DM = HANDMADE / "dm.json"
GROUP_DM = HANDMADE / "group-dm.json"
SERVER_DELETED_USER = HANDMADE / "server-deleted-user.json"
THREAD = HANDMADE / "thread.json"

# Authors of the hand-made exports. Tests grant `train` to MAREN, TEO and ROS; JUNO and TALLY (a bot account
# DCE does not flag as one) never consent; DELETED_USER is the "Deleted User" DCE writes for a gone account.
MAREN, TEO, JUNO, TALLY, ROS, DELETED_USER, HOOK, PIP = (f"70000000000000000{i}" for i in range(1, 9))


def real_exports() -> list[Path]:
    """The six real captures, in the order the importer reads a folder (sorted paths)."""
    return sorted(REAL.rglob("*.json"))


def humanised(dest: Path) -> Path:
    """A copy of the real captures whose bot is flagged as a person: only `"isBot": true` changes, byte for byte."""
    for path in real_exports():
        raw = path.read_bytes()
        assert raw.count(b'"isBot": true') == raw.count(b'"isBot"'), path  # nothing else flips by accident
        target = dest / path.relative_to(REAL)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(raw.replace(b'"isBot": true', b'"isBot": false'))
    return dest
