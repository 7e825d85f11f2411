"""`doppel consent grant|revoke USER_ID... [--scope train,chat]` and `doppel consent list` (operator-side, audited)."""

from __future__ import annotations

import argparse
import asyncio
import getpass
from typing import Any

from doppel.settings import Settings


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("consent", help="grant, revoke or list members' consent (audited as the CLI operator)")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=type(p))
    for name, verb in (("grant", "give"), ("revoke", "withdraw")):
        a = actions.add_parser(name, help=f"{verb} consent scopes for one or many members")
        a.add_argument("member_ids", nargs="+", metavar="USER_ID", help="Discord user id(s)")
        a.add_argument("--scope", default="train,chat", help="comma-separated scopes: train, chat (default: both)")
        a.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    ls = actions.add_parser("list", help="members holding any scope")
    ls.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def _actor() -> str:
    try:
        return f"operator:{getpass.getuser()}"
    except Exception:  # noqa: BLE001 - no login name in some containers; the channel still says "cli"
        return "operator"


async def _run(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from consent.service import ConsentService, parse_scopes
    from data.store import Store

    if args.action != "list":
        parse_scopes(args.scope)  # fail on a bad scope before touching the store
    async with Store.open(settings) as store:
        service = ConsentService(store)
        if args.action == "grant":
            return {"granted": await service.grant(args.member_ids, args.scope, _actor(), "cli")}
        if args.action == "revoke":
            return await service.revoke(args.member_ids, args.scope, _actor(), "cli")
        return {"members": await service.list()}


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
        else:
            if not result["members"]:
                print("no member has granted consent")
            for m in result["members"]:
                print(f"{m['member_id']}  {m['display_name']}  {','.join(m['scopes'])}")
    return result
