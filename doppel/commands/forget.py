"""`doppel forget USER_ID`: the erasure cascade (messages, key, embeddings, datasets, job folders, adapters)."""

from __future__ import annotations

import argparse
import asyncio
import getpass
from typing import Any

from core.settings import Settings
from inference.places import place_words


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("forget", help="erase everything stored about a member, and adapters trained on it")
    p.add_argument("member_id", metavar="USER_ID", help="Discord user id")
    return p


async def _run(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from consent.erasure import forget
    from data.members import check_member_id
    from data.store import Store
    from doppel.erasure import erasure_parts

    member_id = check_member_id(args.member_id)
    try:
        actor = f"operator:{getpass.getuser()}"
    except Exception:
        actor = "operator"
    async with Store.open(settings) as store:
        report = await forget(store, settings, member_id, actor, "cli", parts=erasure_parts())
    return report.to_dict()


def run(args: argparse.Namespace, settings: Settings) -> Any:
    result = asyncio.run(_run(args, settings))
    if not args.json:
        parts = ", ".join(f"{k}: {v}" for k, v in result["parts"].items())
        print(f"forgot {result['member_id']} in {result['duration_s']:.2f}s; {parts}")
        for a in result["adapters_retired"]:
            whose = "own" if a["own"] else f"of member {a['member_id']}"
            print(f"  adapter {a['id']} ({whose}, v{a['version']}) erased")
        if result["jobs_cancelled"]:
            print(f"  jobs cancelled: {', '.join(result['jobs_cancelled'])}")
        for place in result["serving"]:
            print(f"  {place['place']}: {place_words(place)}")
    return result
