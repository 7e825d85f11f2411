"""Erasure's serving part: every process that serves personas lets go of the member's adapters, and says so."""

from __future__ import annotations

import asyncio
import os
import socket
import time

from consent.erasure import ErasureContext, erasure_part
from data.serving import Place
from inference.places import LIVE_S, LetGo, describe


@erasure_part("serving", order=95, tables=("serving_places", "erasure_notices", "erasure_acks"))
async def reach_serving(ctx: ErasureContext) -> dict[str, int]:
    """Post the erasure to every serving place and wait (bounded) until each says it let go; name those that did not."""
    serving = ctx.store.serving
    folders = [str(a["path"]) for a in ctx.retired_adapters if a.get("path")]
    seq = await serving.notify(ctx.member_id, folders)
    await serving.delete_member(ctx.member_id, keep=seq)  # earlier notices of the member: read or expired
    # A place whose process is gone (killed before it could unregister) is not waited for, only named.
    places = [p for p in await serving.live(LIVE_S) if _running(p)]
    live_ids = {p.id for p in places}
    silent = [p for p in await serving.registered() if p.id not in live_ids]
    deadline = time.monotonic() + max(0.0, ctx.settings.inference.erasure_wait_s)
    acks = await serving.acks(seq)
    while any(p.id not in acks for p in places) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        acks = await serving.acks(seq)
    answers: list[tuple[str, LetGo | None]] = []
    for place in places:
        ack = acks.get(place.id)
        answers.append((place.label, LetGo(ack.held, ack.released, ack.detail) if ack else None))
    ctx.serving.extend(describe(answers))
    if all(answer is not None for _, answer in answers):
        # Every live place acted on it: the notice goes now, since it names the member. One that did not answer
        # may still read it later (its report says so); it is pruned within the hour (data.serving.NOTICE_KEPT_S).
        await serving.delete_notice(seq)
    for place in silent:
        down = not _running(place)
        ctx.serving.append(
            {
                "place": place.label,
                "answered": False,
                "down": down,
                "last_seen_s": round(time.time() - place.heartbeat_at, 1),
            }
        )
        if down:
            # Named once: a stopped process holds nothing, and when it starts again it reads the registry and the
            # store, which no longer list the member's adapters. A running one that stopped beating stays listed.
            await serving.unregister(place.id)
    return {
        "places": len(places) + len(silent),
        "answered": sum(1 for _, a in answers if a is not None),
        "released": sum(1 for _, a in answers if a is not None and a.released),
    }


def _running(place: Place) -> bool:
    """Whether a place that stopped beating still runs: its pid on this host (another host's: assume it does)."""
    parts = place.id.split(":")
    if len(parts) < 4 or parts[1] != socket.gethostname() or place.pid is None:
        return True
    try:
        os.kill(int(place.pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
