"""`doppel doctor`: the pre-flight checks of this host (packages, base model, devices, disk, memory, executor)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from doppel.errors import UserFacingError
from doppel.settings import Settings


class DoctorFailed(UserFacingError):
    """At least one check failed."""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    return sub.add_parser("doctor", help="check that this host can train and serve (same checks as pre-flight)")


def run(args: argparse.Namespace, settings: Settings) -> Any:
    from trainer.preflight import Check, host_checks, job_checks

    checks = host_checks(settings)
    try:
        from trainer.config import TrainConfig
        from trainer.preflight import devices

        config = TrainConfig.from_settings(settings)
        first = devices(settings)[0].name
        checks += [Check(f"default job: {c.name}", c.status, c.detail, c.fix)
                   for c in job_checks(settings, config, first) if c.name in ("memory",)]  # fmt: skip
    except UserFacingError as exc:
        checks.append(Check("default job", "fail", str(exc), "fix [training] / [model] settings"))
    marks = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}
    result = {"ok": all(c.status != "fail" for c in checks), "checks": [c.to_dict() for c in checks]}
    if args.json:
        print(json.dumps(result))
    else:
        for c in checks:
            print(f"[{marks.get(c.status, c.status)}] {c.name}: {c.detail}" + (f"  -> {c.fix}" if c.fix else ""))
    failed = [c for c in checks if c.status == "fail"]
    if failed:
        raise DoctorFailed(f"{len(failed)} check(s) failed: {', '.join(c.name for c in failed)}")
    return None
