"""`doppel import PATH...`: DiscordChatExporter JSON files or folders; only members with `train` consent are stored."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from core.settings import Settings


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("import", help="import DiscordChatExporter JSON exports (files or folders)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="export file(s) or folder(s) of *.json exports")
    return p


def _line(r: dict[str, Any]) -> str:
    skipped = ", ".join(f"{k} {v}" for k, v in r["skipped"].items()) or "none"
    return (
        f"read {r['read']}, stored {r['stored']}, duplicates {r['duplicates']}, "
        f"already stored {r['already_stored']}, updated by a later edit {r['updated']}, skipped: {skipped}"
    )


async def _run(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from data.dce_import import expand_paths, import_exports
    from data.store import Store

    files = expand_paths(args.paths)  # a missing path fails before the store is opened
    async with Store.open(settings) as store:
        return await import_exports(store, files)


def run(args: argparse.Namespace, settings: Settings) -> Any:
    from data.errors import ImportFileError

    result = asyncio.run(_run(args, settings))
    failed = [f for f in result["files"] if f["error"]]
    if not args.json:
        for f in result["files"]:
            print(f"{f['path']}: {'FAILED (rolled back): ' + f['error'] if f['error'] else _line(f)}")
        print(f"total ({result['total']['files']} files): {_line(result['total'])}")
    if failed:
        if args.json:
            print(json.dumps(result, ensure_ascii=False))
        raise ImportFileError(
            f"{len(failed)} of {len(result['files'])} file(s) failed; first: {failed[0]['error']}"
        )
    return result
