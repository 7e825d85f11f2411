"""A trained adapter is never lost to a failure after training: kept as a candidate, then `doppel eval` completes it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import supervision as fx

pytestmark = pytest.mark.timeout(400)


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, **fx.control_env(home)}


@fx.run_async
async def test_killed_evaluation_keeps_the_adapter_and_doppel_eval_completes_it(
    doppel_home: Path, tiny_model: Any
) -> None:
    from core.settings import Settings
    from data.store import Store
    from jobs.supervisor import Supervisor

    settings = Settings.load(env=_env(doppel_home))
    await fx.seed_member(settings)
    store = await Store.open(settings)
    sup = Supervisor(store, settings)
    await sup.start()
    try:
        # The trainer SIGKILLs itself as evaluation starts: what the OOM killer did to the 1,315-member server.
        job = await sup.submit(
            fx.PERSONA_ID,
            requested_by="admin",
            **fx.tiny_overrides(tiny_model, simulate_eval_failure="kill", eval_fidelity=False),
        )
        done = await sup.wait(job.id)
        assert done.status.value == "succeeded", (done.error, done.exit_detail)
        assert done.error is not None and done.error.startswith("evaluation failed: "), done.error
        assert "SIGKILL" in done.error or "signal 9" in done.error, done.error
        version = await sup.registry.get(done.adapter_id)
        assert version.status == "candidate" and version.version == 1
        why = version.metrics["evaluation_error"]
        assert version.metrics["evaluation"] == "failed" and ("SIGKILL" in why or "signal 9" in why)
        assert version.metrics["gate_reason"].startswith(f"evaluation failed: {why}")
        assert "doppel eval" in version.metrics["gate_reason"]
        assert "ppl_adapter" not in version.metrics
        assert version.gguf_path.is_file() and (Path(version.path) / "adapter_model.safetensors").is_file()
        assert version.meta["training"]["sft"]["steps"] == 6, "the training itself is kept"
        assert not Path(job.job_dir).exists()
    finally:
        await sup.close()
        await store.close()

    # `doppel eval` sees the failed evaluation and runs it again in a trainer child.
    ran = subprocess.run(
        [sys.executable, "-m", "doppel", "eval", fx.PERSONA_ID, "--json"],
        capture_output=True,
        text=True,
        env=_env(doppel_home),
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    result = json.loads(ran.stdout.strip().splitlines()[-1])
    assert result["reevaluated"] is True and result["adapter_id"] == version.id
    metrics = result["metrics"]
    assert metrics["evaluation"] == "done" and metrics["ppl_adapter"] > 0 and metrics["ppl_base"] > 0
    assert metrics["resources"]["peak_rss_mb"] > 0
    assert not metrics.get("evaluation_error")
    assert "evaluation failed" not in result["gate"]["reason"]
    # Recorded: in the registry (active when the gate passes) and in the adapter folder's meta.json.
    async with Store.open(settings) as store:
        from models.registry import Registry

        again = await Registry(store, settings).get(version.id)
    assert again.metrics["evaluation"] == "done"
    assert again.status == ("active" if again.metrics["active"] else "candidate")
    assert (
        json.loads((Path(again.path) / "meta.json").read_text())["metrics"]["ppl_adapter"]
        == metrics["ppl_adapter"]
    )
    assert not [p for p in settings.jobs_dir.iterdir() if p.name.startswith("eval-")], (
        "the eval folder is removed"
    )
    # A second `doppel eval` only reports: nothing left to evaluate.
    report = subprocess.run(
        [sys.executable, "-m", "doppel", "eval", fx.PERSONA_ID, "--json"],
        capture_output=True,
        text=True,
        env=_env(doppel_home),
        timeout=120,
    )
    assert (
        report.returncode == 0 and json.loads(report.stdout.strip().splitlines()[-1])["reevaluated"] is False
    )
