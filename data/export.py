"""The store's sections of a member's data export and the atomic writer; `consent.export` adds jobs and adapters."""

from __future__ import annotations

import base64
import json
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data.errors import ExportError
from data.members import check_member_id

if TYPE_CHECKING:
    from data.store import Store

FORMAT = "doppel-member-export/1"


async def member_export(store: Store, member_id: str) -> dict[str, Any]:
    """The store's sections: profile, consent + audit, messages (decrypted), embeddings, feedback, persona replies,
    blind tests (`consent.export` adds jobs and adapters from their owners)."""
    member_id = check_member_id(member_id)
    member = await store.members.get(member_id)
    models = [
        r[0]
        for r in await store.fetchall(
            "SELECT DISTINCT model FROM embeddings WHERE member_id = ? ORDER BY model", (member_id,)
        )
    ]
    embeddings = {
        model: [
            {"message_id": mid, "vector_b64": base64.b64encode(vec).decode()}
            for mid, vec in await store.embeddings.get(member_id, model)
        ]
        for model in models
    }
    guilds = await store.fetchall(
        "SELECT guild_id, acknowledged_at FROM guild_settings WHERE acknowledged_by = ?", (member_id,)
    )
    return {
        "format": FORMAT,
        "exported_at": time.time(),
        "member_id": member_id,
        "profile": asdict(member) if member else None,
        **await store.consents.of_member(member_id),
        "messages": [asdict(m) for m in await store.messages.for_member(member_id)],
        "embeddings": embeddings,
        "feedback_on_persona": await store.feedback.for_persona(member_id),
        "feedback_given": await store.feedback.given_by(member_id),
        "persona_replies": await store.persona_replies.for_persona(member_id),
        "blind_tests_of_persona": await store.blind_tests.results(member_id),
        "blind_votes_given": await store.blind_tests.given_by(member_id),
        "guild_acknowledgements": [{"guild_id": r[0], "acknowledged_at": r[1]} for r in guilds],
    }


def write_atomic(path: Path, data: dict[str, Any]) -> Path:
    """Write JSON to `path` via a 0600 temp file in the same folder and a rename: never a half-written export."""
    path = path.expanduser()
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ExportError(f"{folder}: no such folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise ExportError(f"{path}: cannot write: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, ensure_ascii=False, indent=2, default=str)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
