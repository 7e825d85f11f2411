"""`doppel consent grant|revoke USER_ID... [--scope train,chat,join]` and `doppel consent list` (operator-side, audited)."""

from __future__ import annotations

import argparse
import asyncio
import getpass
from typing import Any

from core.errors import UserFacingError
from core.settings import Settings


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("consent", help="grant, revoke or list members' consent (audited as the CLI operator)")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=type(p))
    for name, verb in (("grant", "give"), ("revoke", "withdraw")):
        a = actions.add_parser(name, help=f"{verb} consent scopes for one or many members")
        a.add_argument("member_ids", nargs="+", metavar="USER_ID", help="Discord user id(s)")
        a.add_argument(
            "--scope",
            default="train,chat",
            help="comma-separated scopes: train, chat, join (speaking unprompted; never implied) (default: train,chat)",
        )
        a.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    ls = actions.add_parser("list", help="members holding any scope")
    ls.add_argument(
        "--limit",
        type=int,
        default=0,
        help="at most this many members (JSON: default 500 a page; text: all, read a page at a time)",
    )
    ls.add_argument(
        "--after", default=None, metavar="USER_ID", help="start after this member id (the next page)"
    )
    ls.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def _actor() -> str:
    try:
        return f"operator:{getpass.getuser()}"
    except Exception:
        return "operator"


async def _run(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from consent.service import ConsentService, parse_scopes
    from data.store import Store
    from doppel.erasure import erasure_parts

    if args.action != "list":
        parse_scopes(args.scope)  # fail on a bad scope before touching the store
    async with Store.open(settings) as store:
        service = ConsentService(store, erasure_parts())
        if args.action == "grant":
            return {"granted": await service.grant(args.member_ids, args.scope, _actor(), "cli")}
        if args.action == "revoke":
            return await service.revoke(args.member_ids, args.scope, _actor(), "cli")
        return await _list(service, args)


PAGE = 500


async def _list(service: Any, args: argparse.Namespace) -> dict[str, Any]:
    """One page for JSON; for text, every member printed page by page (a large server is never held whole)."""
    if args.limit < 0:
        raise UserFacingError("--limit must be 0 (default) or more")
    total = await service.count()
    if args.json:
        limit = args.limit or PAGE
        members = await service.list(limit=limit, after=args.after)
        more = len(members) == limit and bool(await service.list(limit=1, after=members[-1]["member_id"]))
        return {"members": members, "total": total, "next_after": members[-1]["member_id"] if more else None}
    shown, after = 0, args.after
    while not args.limit or shown < args.limit:
        page = await service.list(limit=min(PAGE, args.limit - shown) if args.limit else PAGE, after=after)
        if not page:
            break
        for m in page:
            print(f"{m['member_id']}  {m['display_name']}  {','.join(m['scopes'])}")
        shown += len(page)
        after = page[-1]["member_id"]
    if not total:
        print("no member has granted consent")
    return {"shown": shown, "total": total}


def run(args: argparse.Namespace, settings: Settings) -> Any:
    result = asyncio.run(_run(args, settings))
    if not args.json:
        if args.action == "grant":
            for member, scopes in result["granted"].items():
                print(f"{member}: granted {', '.join(scopes) or 'nothing new'}")
        elif args.action == "revoke":
            for member, scopes in result["revoked"].items():
                erased = result["erased"].get(member)
                tail = ""
                if erased:
                    tail = f"; erased {erased['parts'].get('messages', 0)} messages"
                print(f"{member}: revoked {', '.join(scopes) or 'nothing held'}{tail}")
    return result
