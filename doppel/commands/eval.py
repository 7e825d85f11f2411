"""`doppel eval USER_ID`: the fidelity report of a member's active adapter (base vs adapter vs retrieval-only)."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from core.errors import UserFacingError
from core.settings import Settings


class NoAdapterError(UserFacingError):
    """The member has no (matching) trained adapter to report on."""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="fidelity report of a member's active adapter against the base model")
    p.add_argument("user_id", help="Discord user id of the persona's member")
    p.add_argument("--version", type=int, help="report on this adapter version instead of the active one")
    p.add_argument(
        "--rerun",
        action="store_true",
        help="evaluate the adapter again (done anyway for a version whose evaluation failed)",
    )
    return p


def run(args: argparse.Namespace, settings: Settings) -> Any:
    if not str(args.user_id).strip():
        raise UserFacingError("eval: USER_ID must not be empty")
    version, blind, reran = asyncio.run(
        _find(
            settings,
            str(args.user_id).strip(),
            args.version,
            bool(getattr(args, "rerun", False)),
            not getattr(args, "json", False),
        )
    )
    metrics = dict(version.metrics or {})
    if not metrics:
        # Older rows kept the metrics only in meta.json; read them from the row's copy, then the folder's.
        metrics = dict((version.meta or {}).get("metrics") or _folder_metrics(Path(version.path)))
    from jobspec.verdict import format_report, gate

    active, reason = gate(metrics)
    report = format_report(metrics, blind=blind)
    header = (
        f"persona {version.member_id} v{version.version} ({version.status}), base {version.base_model}, "
        f"{metrics.get('heldout_examples', '?')} held-out replies"
    )
    # The panel and chance behind "attributed to member": a 5-member synthetic panel is easy, a real one is not.
    attribution = (metrics.get("fidelity") or {}).get("attribution") or {}
    panel = {
        "members": attribution.get("members"),
        "chance": attribution.get("chance"),
        "rule": attribution.get("panel_rule"),
        "classifier_accuracy": attribution.get("accuracy"),
    }
    if attribution.get("available"):
        header += f"; authorship panel of {panel['members']} members, chance {panel['chance']:.2f}"
        told = told_apart(attribution)
        if told:
            header += f"; {told}"
    else:
        header += "; authorship not measured"
    if not getattr(args, "json", False):
        print(header)
        print(report)
    return {
        "adapter_id": version.id,
        "member_id": version.member_id,
        "version": version.version,
        "status": version.status,
        "base_model": version.base_model,
        "gate": {"passes": active, "reason": reason},
        "metrics": metrics,
        "blind_test": blind,
        "attribution_panel": panel,
        "report": report,
        "reevaluated": reran,
    }


def told_apart(attribution: dict[str, Any], system: str = "adapter") -> str:
    """How often a classifier told the persona's replies from the member's real ones, with its 95% interval."""
    found = (attribution.get("detectability") or {}).get(system) or {}
    if found.get("accuracy") is None:
        return ""
    low, high = found["ci"]
    return (
        f"told apart from the member's real replies {found['accuracy']:.0%} of the time "
        f"(95% CI {low:.0%}-{high:.0%}, {found['n']} replies; 50% = indistinguishable)"
    )


async def _find(
    settings: Settings, member_id: str, wanted: int | None, rerun: bool = False, show: bool = True
) -> tuple[Any, dict[str, Any], bool]:
    import sys

    from data.store import Store
    from models.registry import needs_evaluation

    async with Store.open(settings) as store:
        version = await _version(store, settings, member_id, wanted)
        reran = False
        if rerun or needs_evaluation(dict(version.metrics or {})):
            # Saved before an evaluation that failed (or asked for): evaluate it now, in a trainer child.
            from jobs.reevaluate import reevaluate

            if show:
                # A version whose GGUF export failed after training is converted first, by the same trainer child.
                what = (
                    "converting and evaluating"
                    if (version.metrics or {}).get("export") == "failed"
                    else "evaluating"
                )
                print(f"{what} persona {member_id} v{version.version} again ...", file=sys.stderr, flush=True)
            version = await reevaluate(store, settings, version)
            reran = True
        # Votes count for the adapter version that generated the tested reply.
        blind = await store.blind_tests.results(member_id, adapter_id=version.id)
        return version, blind, reran


async def _version(store: Any, settings: Settings, member_id: str, wanted: int | None) -> Any:
    from models.registry import Registry

    registry = Registry(store, settings)
    versions = await registry.list(member_id)
    if wanted is not None:
        for v in versions:
            if v.version == wanted:
                return v
        raise NoAdapterError(f"member {member_id} has no adapter version {wanted}")
    active = await registry.active(member_id)
    from models.registry import needs_evaluation

    pending = [v for v in versions if v.status == "candidate" and needs_evaluation(dict(v.metrics or {}))]
    if pending and (active is None or pending[-1].version > active.version):
        return pending[-1]  # trained after the active one, its evaluation failed: that is the one to complete
    if active is not None:
        return active
    if versions:
        return versions[-1]  # no active one: the newest candidate, whose report says why it was not promoted
    raise NoAdapterError(
        f"member {member_id} has no trained adapter; train one with `doppel train {member_id}`"
    )


def _folder_metrics(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return dict(meta.get("metrics") or {})
