"""A failed GGUF conversion after training keeps the PEFT adapter as a candidate; `doppel eval` converts and evaluates it."""

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
async def test_failed_export_keeps_the_adapter_and_doppel_eval_converts_it(
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
        job = await sup.submit(
            fx.PERSONA_ID,
            requested_by="admin",
            **fx.tiny_overrides(tiny_model, simulate_export_failure=True, eval_fidelity=False),
        )
        done = await sup.wait(job.id)
        assert done.status.value == "succeeded", (done.error, done.exit_detail)
        assert done.error is not None and done.error.startswith("export failed: GGUF export failed"), (
            done.error
        )
        version = await sup.registry.get(done.adapter_id)
        assert version.status == "candidate" and version.version == 1
        assert version.metrics["export"] == "failed" and "simulated" in version.metrics["export_error"]
        assert (
            version.metrics["gate_reason"].startswith("export failed: ")
            and "doppel eval" in version.metrics["gate_reason"]
        )
        folder = Path(version.path)
        assert (folder / "adapter_model.safetensors").is_file() and (folder / "adapter_config.json").is_file()
        assert not version.gguf_path.exists(), "no half-written GGUF is kept"
        assert version.meta["training"]["sft"]["steps"] == 6, "the training itself is kept"
        assert "ppl_adapter" not in version.metrics
        # It cannot be served as it is: activating it is refused with the missing file named.
        with pytest.raises(Exception, match="adapter.gguf"):
            await sup.registry.activate(fx.PERSONA_ID, 1)
        assert not Path(job.job_dir).exists()
    finally:
        await sup.close()
        await store.close()

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
    assert metrics["evaluation"] == "done" and metrics["ppl_adapter"] > 0 and metrics.get("export") is None
    assert metrics["generated_by"] == "llama.cpp", "the converted GGUF was loaded by llama.cpp"
    assert "export failed" not in result["gate"]["reason"]
    async with Store.open(settings) as store:
        from models.registry import Registry

        again = await Registry(store, settings).get(version.id)
    assert again.gguf_path.is_file() and again.meta["export"]["modules"] > 0
    assert again.status == ("active" if again.metrics["active"] else "candidate")
    folder_meta = json.loads((Path(again.path) / "meta.json").read_text())
    assert folder_meta["export"]["modules"] > 0 and folder_meta["metrics"]["evaluation"] == "done"
    assert not [p for p in settings.jobs_dir.iterdir() if p.name.startswith("eval-")], (
        "the eval folder is removed"
    )
