"""`doppel export-data USER_ID [-o FILE]`: everything stored about a member, decrypted, as JSON."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from core.settings import Settings


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("export-data", help="everything stored about a member, decrypted, as JSON")
    p.add_argument("member_id", metavar="USER_ID", help="Discord user id")
    p.add_argument(
        "-o", "--output", type=Path, help="write to this file (atomically, mode 0600) instead of stdout"
    )
    return p


async def _run(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from consent.export import member_export
    from data.members import check_member_id
    from data.store import Store
    from doppel.erasure import erasure_parts

    member_id = check_member_id(args.member_id)
    async with Store.open(settings) as store:
        return await member_export(store, member_id, erasure_parts())


def run(args: argparse.Namespace, settings: Settings) -> Any:
    from data.export import write_atomic

    data = asyncio.run(_run(args, settings))
    if args.output:
        path = write_atomic(args.output, data)
        summary = {"path": str(path), "member_id": data["member_id"], "messages": len(data["messages"])}
        if not args.json:
            print(
                f"wrote {summary['messages']} messages and the rest of {data['member_id']}'s data to {path}"
            )
        return summary
    if not args.json:
        print(json.dumps(data, ensure_ascii=False, indent=2, default=str))
    return data
