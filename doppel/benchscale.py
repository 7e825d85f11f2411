"""`doppel bench scale`: a generated community of many members, then import, train, chat and forget, each measured.

Every phase runs as its own process (`doppel ...` in a fresh DOPPEL_HOME), so its peak RSS is its own: the exact
peak of the process tree comes from `wait4` (the kernel's maxrss of the process and every descendant it reaped),
and a sampler keeps each process's own peak apart (the `doppel train` supervisor from its trainer child). The
trainer reports its own peak after training and after evaluation (`metrics.resources`); the bench checks that the
evaluation keeps it within 1.5x of the training phase, and that it stays flat when the community grows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from core.errors import UserFacingError
from core.settings import Settings
from doppel.benchchild import trainer_result

FULL_SIZES = "200x40000,1000x200000"
QUICK_SIZES = "40x4000"
MAX_RATIO = 1.5
PHASES = ("generate", "consent", "import", "train", "chat", "forget")
# A short training that fits beside other work: the point is the trainer's memory, not the persona's quality.
TRAIN_SET = {"micro_batch_size": 2, "grad_accum": 1, "max_length": 256}
QUICK_SET = {"eval_max_examples": 8, "eval_samples": 1, "eval_max_new_tokens": 8}
CHAT_MESSAGE = "anyone up for the raid tonight?"


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'200x40000,1000x200000' -> [(200, 40000), (1000, 200000)]; one-line error on bad input."""
    sizes = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        members, sep, messages = part.partition("x")
        if not sep or not members.isdigit() or not messages.isdigit():
            raise UserFacingError(f"bench scale: --sizes expects MEMBERSxMESSAGES[,...], got {part!r}")
        if int(members) < 5 or int(messages) < 100:
            raise UserFacingError(f"bench scale: {part!r} is too small (at least 5 members and 100 messages)")
        sizes.append((int(members), int(messages)))
    if not sizes:
        raise UserFacingError("bench scale: --sizes names no size")
    return sizes


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _mb(kib: float) -> float:
    return round(kib / 1024, 1)


class _Sampler(threading.Thread):
    """Samples the RSS of a process tree every 100 ms: each process's own peak, and the tree's summed peak."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.done = threading.Event()
        self.peaks: dict[int, tuple[str, int]] = {}
        self.tree_peak = 0

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self.done.is_set():
            total = 0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            for proc in procs:
                try:
                    rss = proc.memory_info().rss
                    kind = self.peaks.get(proc.pid, ("", 0))[0] or _kind(proc.cmdline(), proc.pid == self.pid)
                except psutil.Error:
                    continue
                total += rss
                if rss > self.peaks.get(proc.pid, ("", 0))[1]:
                    self.peaks[proc.pid] = (kind, rss)
            self.tree_peak = max(self.tree_peak, total)
            self.done.wait(0.1)

    def by_kind(self) -> dict[str, float]:
        """Peak RSS (MB) per kind of process: the phase's own process, trainer children, other children."""
        out: dict[str, float] = {}
        for kind, rss in self.peaks.values():
            out[kind] = max(out.get(kind, 0.0), round(rss / 2**20, 1))
        return out


def _kind(cmdline: list[str], is_root: bool) -> str:
    if is_root:
        return "process"
    return "trainer_child" if "trainer" in cmdline[1:4] else "other_child"


def measure(name: str, cmd: list[str], env: dict[str, str]) -> tuple[dict[str, Any], Any]:
    """Run one phase's command as its own process; (figures, the JSON of its last stdout line or None)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, stdin=subprocess.DEVNULL)
        sampler = _Sampler(proc.pid)
        sampler.start()
        # wait4 returns the rusage of the child and all its reaped descendants: ru_maxrss is the tree's largest peak.
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.monotonic() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.done.set()
        sampler.join(timeout=5)
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode("utf-8", "replace")
        stderr = err.read().decode("utf-8", "replace")
    if proc.returncode != 0:
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        why = lines[-1] if lines else f"exit code {proc.returncode}"
        raise UserFacingError(f"bench scale: the {name} phase failed (exit {proc.returncode}): {why}")
    result = None
    last = [ln for ln in stdout.splitlines() if ln.strip()]
    if last:
        try:
            result = json.loads(last[-1])
        except json.JSONDecodeError:
            result = None
    figures = {
        "seconds": round(seconds, 2),
        "peak_rss_mb": _mb(usage.ru_maxrss),
        "sampled_peak_rss_mb": sampler.by_kind(),
        "tree_peak_rss_mb": round(sampler.tree_peak / 2**20, 1),
    }
    return figures, result


def _doppel(*args: str) -> list[str]:
    return [sys.executable, "-m", "doppel", "--json", *args]


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOPPEL_")}
    if "DOPPEL_MASTER_KEY" in os.environ:
        env["DOPPEL_MASTER_KEY"] = os.environ["DOPPEL_MASTER_KEY"]
    env.update(
        DOPPEL_HOME=str(home),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        DOPPEL_TRAINING__MIN_FREE_DISK_MB="1",
    )
    return env


_GENERATE = (
    "import json, sys; from pathlib import Path; from doppel.samplecommunity import write_large_community as w; "
    "r = w(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), top_messages=int(sys.argv[4])); "
    "r.pop('per_author'); print(json.dumps(r))"
)


def run_size(
    members: int, messages: int, *, work: Path, base_cache: Path, steps: int, quick: bool, log: Any = None
) -> dict[str, Any]:
    """All phases on one generated community in a fresh DOPPEL_HOME under `work`; returns the figures."""
    home, export = work / f"home-{members}", work / f"export-{members}"
    env = _env(home)
    phases: dict[str, dict[str, Any]] = {}

    def step(name: str, cmd: list[str]) -> Any:
        if log:
            log(f"[{members} members] {name} ...")
        figures, result = measure(name, cmd, env)
        phases[name] = figures
        return result

    top = max(50, min(5000, messages // 8)) if quick else 5000
    gen = step(
        "generate", [sys.executable, "-c", _GENERATE, str(export), str(members), str(messages), str(top)]
    )
    ids: list[str] = gen["members"]
    persona = ids[0]  # the generator makes member 0 the most active
    step("consent", _doppel("consent", "grant", *ids, "--scope", "train,chat"))
    imported = step("import", _doppel("import", str(export)))
    total = imported["total"]
    phases["import"].update(stored=total["stored"], read=total["read"])
    overrides = {**TRAIN_SET, **(QUICK_SET if quick else {}), "base_cache_dir": str(base_cache)}
    sets = [arg for k, v in overrides.items() for arg in ("--set", f"{k}={json.dumps(v)}")]
    trained = step("train", _doppel("train", persona, "--max-steps", str(steps), *sets))
    version = trained["version"]
    trainer = asyncio.run(_trainer_figures(home, trained["adapter_id"]))
    phases["train"].update(adapter_status=trained["status"], trainer=trainer)
    if trained["status"] != "active":
        # A few steps rarely beat the base model: activate the version anyway so the chat phase serves the adapter.
        subprocess.run(
            _doppel("personas", "rollback", persona, str(version)), env=env, check=True, capture_output=True
        )
    reply = step(
        "chat", _doppel("chat", persona, "--message", CHAT_MESSAGE, "--seed", "1", "--max-tokens", "24")
    )
    phases["chat"].update(mode=reply["mode"], reply_chars=len(reply["reply"]))
    stored_before = asyncio.run(_member_rows(home, persona))
    forgot = step("forget", _doppel("forget", persona))
    phases["forget"].update(
        messages_erased=forgot["parts"].get("messages", 0), adapters_erased=len(forgot["adapters_retired"])
    )
    after = asyncio.run(_member_rows(home, persona))
    return {
        "members": members,
        "messages": gen["messages"],
        "persona": persona,
        "persona_messages": stored_before["messages"],
        "phases": phases,
        "trainer": trainer,
        "persona_rows_before_forget": stored_before,
        "persona_rows_after_forget": after,
    }


async def _trainer_figures(home: Path, adapter_id: str) -> dict[str, Any]:
    """The trainer child's own peaks (training phase, whole life) from the published adapter's metrics."""
    from data.store import Store
    from models.registry import Registry

    settings = Settings.load(env=_env(home))
    async with Store.open(settings) as store:
        version = await Registry(store, settings).get(adapter_id)
    metrics = version.metrics
    res = dict(metrics.get("resources") or {})
    train_peak, peak = float(res.get("train_peak_rss_mb") or 0), float(res.get("peak_rss_mb") or 0)
    ratio = round(peak / train_peak, 3) if train_peak > 0 else None
    return {
        "training_peak_rss_mb": train_peak,
        "peak_rss_mb": peak,
        "ratio": ratio,
        "within_limit": ratio is not None and ratio <= MAX_RATIO,
        "limit": MAX_RATIO,
        "evaluation": metrics.get("evaluation"),
        "heldout_examples": metrics.get("heldout_examples"),
        "attribution_panel": ((metrics.get("fidelity") or {}).get("attribution") or {}).get("members"),
        "estimate_mb": res.get("estimate_mb"),
    }


async def _member_rows(home: Path, member_id: str) -> dict[str, int]:
    """Rows that hold the member's data or identity, per table (all zero after `forget`)."""
    from data.store import Store

    settings = Settings.load(env=_env(home))
    queries = {
        "messages": "SELECT COUNT(*) FROM messages WHERE author_id = ?",
        "embeddings": "SELECT COUNT(*) FROM embeddings WHERE member_id = ?",
        "member_keys": "SELECT COUNT(*) FROM member_keys WHERE member_id = ?",
        "consent": "SELECT COUNT(*) FROM consent WHERE member_id = ?",
        "members": "SELECT COUNT(*) FROM members WHERE id = ?",
        "adapters_not_erased": "SELECT COUNT(*) FROM adapters WHERE member_id = ? AND status != 'erased'",
    }
    async with Store.open(settings) as store:
        return {name: int((await store.fetchone(sql, (member_id,)))[0]) for name, sql in queries.items()}


def scale(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """`doppel bench scale`: both community sizes, every phase, and the trainer's peaks compared."""
    quick = bool(getattr(args, "quick", False))
    sizes = parse_sizes(getattr(args, "sizes", "") or (QUICK_SIZES if quick else FULL_SIZES))
    steps = 2 if quick else 6
    show = not getattr(args, "json", False)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    base_gguf = settings.base_gguf_path()
    base_cache = settings.cache_dir / "base-models"
    work = Path(tempfile.mkdtemp(prefix="doppel-bench-scale-"))
    try:
        # Unmeasured: the base model's float copy is converted once and cached, as on any server after its first job.
        trainer_result("dequantize", str(base_gguf), str(base_cache), what="bench scale: converting the base")
        results = [
            run_size(
                m, n, work=work, base_cache=base_cache, steps=steps, quick=quick, log=log if show else None
            )
            for m, n in sizes
        ]
    except subprocess.CalledProcessError as exc:
        tail = (exc.stderr or b"").decode("utf-8", "replace").strip().splitlines()
        raise UserFacingError(f"bench scale: setup failed: {tail[-1] if tail else exc}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    peaks = [r["trainer"]["peak_rss_mb"] for r in results]
    return {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "quick": quick,
        "train_steps": steps,
        "train_config": {**TRAIN_SET, **(QUICK_SET if quick else {})},
        "sizes": results,
        "trainer_peak_rss_mb": peaks,
        # Flat in the member count: the largest community's trainer peak over the smallest's.
        "trainer_peak_growth": round(peaks[-1] / peaks[0], 3) if len(peaks) > 1 and peaks[0] else None,
        "all_within_limit": all(r["trainer"]["within_limit"] for r in results),
    }
