"""`doppel personas`: adapter versions (member, base, version, status, metrics), rollback, base models."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from core.errors import UserFacingError
from core.settings import Settings


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("personas", help="list persona adapters; roll back; list or add base models")
    p.add_argument("--member", help="only this member's versions")
    p.add_argument("--all", action="store_true", help="include erased versions")
    p.add_argument("--limit", type=int, default=200, help="list at most this many versions (default 200)")
    p.add_argument("--offset", type=int, default=0, help="skip this many versions (the next page)")
    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    r = actions.add_parser("rollback", help="make an older version of a member's adapter active again")
    r.add_argument("member_id")
    r.add_argument("version", type=int)
    b = actions.add_parser("bases", help="list base models")
    a = actions.add_parser(
        "add-base", help="register a base model under a name (checked: architecture, template...)"
    )
    a.add_argument("name")
    a.add_argument(
        "path", type=Path, nargs="?", help="the GGUF file llama.cpp serves (and, without --hf, trains on)"
    )
    a.add_argument("--gguf", type=Path, help="the GGUF file (instead of PATH)")
    a.add_argument(
        "--hf",
        type=Path,
        metavar="FOLDER",
        help="transformers weights of the same model to train on (bf16/NF4 on CUDA); served from the GGUF",
    )
    a.add_argument(
        "--from-hub", metavar="REPO", help="download the GGUF from this Hugging Face Hub repository"
    )
    a.add_argument("--file", metavar="F", help="with --from-hub: the GGUF file in the repository")
    a.add_argument(
        "--template",
        metavar="NAME|FILE",
        help="chat format: chatml, plain, or a Jinja template file (default: the GGUF's own, else "
        "ChatML when the vocabulary has its tokens, else plain role-tagged turns)",
    )
    for action in (r, b, a):  # `--json` also after the action, as every other command accepts it
        action.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def run(args: argparse.Namespace, settings: Settings) -> Any:
    return asyncio.run(_run(args, settings))


async def _run(args: argparse.Namespace, settings: Settings) -> Any:
    from data.store import Store
    from models.catalog import Catalog
    from models.registry import Registry

    async with Store.open(settings) as store:
        registry = Registry(store, settings)
        if args.action == "bases":
            catalog = Catalog(settings)
            bases = [catalog.describe(b) for b in catalog.bases()]
            if not args.json:
                for b in bases:
                    size = f"{b['params'] / 1e9:.2f}B" if b["params"] else "?"
                    state = "ready" if b["ready"] else f"not ready: {b['problem']}"
                    print(
                        f"{b['name']:<20} {b['source']:<8} {b['architecture'] or '?':<8} {size:>7}  "
                        f"template {b['template_source'] or '?':<16} {state}  {b['path']}"
                    )
            return {"bases": bases}
        if args.action == "add-base":
            gguf = args.gguf or args.path
            if sum(x is not None for x in (args.gguf, args.path, args.from_hub)) != 1:
                raise UserFacingError(
                    "add-base needs one GGUF: NAME FILE, NAME --gguf FILE or NAME --from-hub REPO"
                )
            if args.from_hub:
                from models.bases import from_hub

                gguf = await asyncio.to_thread(from_hub, args.from_hub, args.file)
            base = Catalog(settings).add_base(args.name, gguf, template=args.template, hf=args.hf)
            if not args.json:
                trained = f", trained on {base.hf_path}" if base.hf_path else ""
                print(
                    f"base model {base.name}: {base.path} (template {base.template_source}{trained}; "
                    f"sha256 {base.sha256})"
                )
            return base.to_dict()
        if args.action == "rollback":
            if args.version < 1:
                raise UserFacingError("version must be 1 or more")
            version = await registry.activate(args.member_id, args.version)
            if not args.json:
                print(f"member {version.member_id}: version {version.version} is active ({version.id})")
            return version.summary()
        if args.limit < 1 or args.offset < 0:
            raise UserFacingError("--limit must be 1 or more and --offset 0 or more")
        # A server with thousands of personas is listed a page at a time, never loaded whole.
        versions = await registry.list(
            member_id=args.member, include_erased=args.all, limit=args.limit, offset=args.offset
        )
        total = await registry.count(member_id=args.member, include_erased=args.all)
        if not args.json:
            if not versions:
                print("no persona adapters yet (train one with `doppel train USER_ID`)")
            for v in versions:
                ppl = v.metrics.get("ppl_adapter")
                base_ppl = v.metrics.get("ppl_base")
                metric = f"ppl {ppl} (base {base_ppl})" if ppl is not None else "no metrics"
                print(
                    f"{v.member_id or '(multi)':<20} {v.base_model:<16} v{v.version:<3} {v.status:<9} {metric}  {v.id}"
                )
            if args.offset + len(versions) < total:
                print(
                    f"... {total - args.offset - len(versions)} more: --offset {args.offset + len(versions)}"
                )
        return {
            "adapters": [v.summary() for v in versions],
            "total": total,
            "offset": args.offset,
            "next_offset": args.offset + len(versions) if args.offset + len(versions) < total else None,
        }
