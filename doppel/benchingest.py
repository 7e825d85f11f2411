"""`doppel bench ingest`: generate DiscordChatExporter exports, import them, report messages/s, peak RSS, forget time."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from core.settings import Settings

HEAVY = "100000000000000001"  # the member whose messages `forget` erases in the benchmark
WORDS = (
    "the of and to a in is you that it he was for on are as with his they I at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up other "
    "about out many then them these so some her would make like him into time has look two more write go see "
    "lol yeah ok nice gg tbh idk honestly maybe tomorrow server game patch build discord voice later"
).split()


def _text(rng: random.Random) -> str:
    # Log-normal word counts: most chat lines are short, a few are paragraphs (median ~8 words).
    n = max(1, min(200, int(rng.lognormvariate(2.1, 0.9))))
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_export(
    path: Path, n: int, authors: int, seed: int, heavy_share: float, channel: int
) -> dict[str, int]:
    """Write one DCE-shaped export of `n` messages, streamed to disk; returns message counts by author kind."""
    rng = random.Random(seed)
    start = datetime(2024, 1, 1, tzinfo=UTC)
    offsets = ("+00:00", "+02:00", "-05:00", "+05:30")
    heavy = 0
    with path.open("w", encoding="utf-8") as fh:
        guild_id, channel_id = "900000000000000001", str(800000000000000000 + channel)
        header: dict[str, Any] = {
            "guild": {"id": guild_id, "name": "Bench guild", "iconUrl": "https://cdn/x.png"},
            "channel": {
                "id": channel_id,
                "type": "GuildTextChat",
                "categoryId": "7",
                "category": "Text",
                "name": f"bench-{channel}",
                "topic": None,
            },
            "dateRange": {"after": None, "before": None},
            "exportedAt": "2024-06-01T00:00:00+00:00",
        }
        fh.write(json.dumps(header)[:-1] + ', "messages": [\n')
        for i in range(n):
            if rng.random() < heavy_share:
                author_id, heavy = HEAVY, heavy + 1
            else:
                author_id = str(200000000000000000 + rng.randrange(authors))
            ts = start + timedelta(seconds=i * 7 + rng.random())
            stamp = ts.isoformat(timespec="microseconds")[:-6][: 20 + rng.randrange(7)] + rng.choice(offsets)
            kind = rng.random()
            msg: dict[str, Any] = {
                "id": str(1100000000000000000 + channel * 10_000_000 + i),
                "type": "Reply" if kind < 0.1 else ("GuildMemberJoin" if kind > 0.995 else "Default"),
                "timestamp": stamp,
                "timestampEdited": stamp if kind < 0.03 else None,
                "callEndedTimestamp": None,
                "isPinned": False,
                "content": "" if 0.97 < kind <= 0.985 else _text(rng),
                "author": {
                    "id": author_id,
                    "name": f"user{author_id[-5:]}",
                    "discriminator": "0000",
                    "nickname": f"Nick {author_id[-4:]}",
                    "color": "#FFFFFF",
                    "isBot": 0.985 < kind <= 0.99,
                    "roles": [{"id": "1", "name": "member", "color": None, "position": 1}],
                    "avatarUrl": f"https://cdn.discordapp.com/avatars/{author_id}/a.png",
                },
                "attachments": [
                    {"id": "5", "url": "https://cdn/f.png", "fileName": "f.png", "fileSizeBytes": 10}
                ]
                if 0.97 < kind <= 0.98
                else [],
                "embeds": [],
                "stickers": [],
                "reactions": [
                    {
                        "emoji": {
                            "id": "",
                            "name": "👍",
                            "code": "thumbsup",
                            "isAnimated": False,
                            "imageUrl": "https://t/1f44d.svg",
                        },
                        "count": 2,
                    }
                ]
                if kind < 0.2
                else [],
                "mentions": [],
            }
            if msg["type"] == "Reply":
                msg["reference"] = {
                    "messageId": str(int(msg["id"]) - 1),
                    "channelId": channel_id,
                    "guildId": guild_id,
                }
            fh.write(("," if i else "") + json.dumps(msg, ensure_ascii=False) + "\n")
        fh.write(f'], "messageCount": {n}}}\n')
    return {"messages": n, "heavy": heavy}


def _child(home: str, files: list[str], consenting: list[str], authors: int) -> None:
    """Import in a fresh process so its peak RSS is the import's alone; prints one JSON line."""
    import resource

    from consent.service import ConsentService
    from data.dce_import import import_exports
    from data.store import Store

    settings = Settings.load(env={"DOPPEL_HOME": home})

    async def go() -> dict[str, Any]:
        async with Store.open(settings) as store:
            await ConsentService(store).grant(consenting, "train", "bench", "cli")
            usage = resource.getrusage(resource.RUSAGE_SELF)
            t0, cpu0 = time.perf_counter(), usage.ru_utime + usage.ru_stime
            result = await import_exports(store, files)
            seconds = time.perf_counter() - t0
            after = resource.getrusage(resource.RUSAGE_SELF)
            cpu = after.ru_utime + after.ru_stime - cpu0
            return {
                "seconds": seconds,
                "cpu_seconds": cpu,
                "total": result["total"],
                "rss_before_kb": usage.ru_maxrss,
            }

    out = asyncio.run(go())
    out["peak_rss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(out))


def _forget_child(home: str, member_id: str) -> None:
    """Time `forget` of one member in a fresh process; prints one JSON line."""
    from consent.erasure import forget
    from data.store import Store
    from doppel.erasure import erasure_parts

    settings = Settings.load(env={"DOPPEL_HOME": home})

    async def go() -> dict[str, Any]:
        async with Store.open(settings) as store:
            count = await store.messages.count(member_id)
            t0 = time.perf_counter()
            report = await forget(store, settings, member_id, "bench", "cli", parts=erasure_parts())
            return {
                "messages": count,
                "seconds": time.perf_counter() - t0,
                "erased": report.parts["messages"],
                "left": await store.messages.count(member_id),
            }

    print(json.dumps(asyncio.run(go())))


def _run_child(call: str, *params: Any) -> dict[str, Any]:
    code = f"import sys, json; from doppel.benchingest import {call}; {call}(*json.loads(sys.argv[1]))"
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(params)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ingest(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """Import two export sizes (the second twice the first) into fresh homes; then forget the heavy member."""
    base = 20_000 if getattr(args, "quick", False) else 250_000
    authors = 400
    consenting = [HEAVY] + [
        str(200000000000000000 + a) for a in range(0, authors, 2)
    ]  # half the crowd consents
    results: dict[str, Any] = {
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "target": {"messages_per_s": 30_000, "peak_rss_mb": 300, "forget_100k_s": 5.0},
        "sizes": [],
    }
    with tempfile.TemporaryDirectory(prefix="doppel-bench-") as tmp:
        root = Path(tmp)
        for size in (base, 2 * base):
            export = root / f"export-{size}.json"
            # 100k messages of the heavy member in the base size: the forget benchmark's member.
            counts = write_export(
                export, size, authors, seed=size, heavy_share=100_000 / 250_000, channel=size % 97
            )
            home = root / f"home-{size}"
            child = _run_child("_child", str(home), [str(export)], consenting, authors)
            total = child["total"]
            entry = {
                "messages": size,
                "file_mb": round(export.stat().st_size / 2**20, 1),
                "stored": total["stored"],
                "skipped": total["skipped"],
                "seconds": round(child["seconds"], 2),
                "messages_per_s": round(size / child["seconds"]),
                # Wall time suffers when other work shares the cores; CPU time says what the import itself costs.
                "messages_per_cpu_s": round(size / max(child["cpu_seconds"], 1e-9)),
                "peak_rss_mb": round(child["peak_rss_kb"] / 1024, 1),
                "rss_before_import_mb": round(child["rss_before_kb"] / 1024, 1),
                "heavy_member_messages": counts["heavy"],
            }
            results["sizes"].append(entry)
            if size == base:
                forget = _run_child("_forget_child", str(home), HEAVY)
                results["forget"] = {
                    "messages": forget["messages"],
                    "seconds": round(forget["seconds"], 2),
                    "left": forget["left"],
                }
                results["forget_100k_s"] = round(forget["seconds"] * 100_000 / max(1, forget["messages"]), 2)
            export.unlink()
    sizes = results["sizes"]
    results["messages_per_s"] = min(s["messages_per_s"] for s in sizes)
    results["peak_rss_mb"] = max(s["peak_rss_mb"] for s in sizes)
    results["rss_growth_mb_2x"] = round(sizes[1]["peak_rss_mb"] - sizes[0]["peak_rss_mb"], 1)
    results["meets_targets"] = (
        results["messages_per_s"] >= 30_000
        and results["peak_rss_mb"] <= 300
        and results["forget_100k_s"] <= 5.0
    )
    return results
