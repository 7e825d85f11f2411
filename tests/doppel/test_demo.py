"""`doppel demo` runs the whole loop offline, and running it twice works."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.settings import bundled_base_gguf, bundled_embedding_model
from doppel.cli import main

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        bundled_base_gguf() is None or bundled_embedding_model() is None,
        reason="bundled models not installed",
    ),
]


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["--json", "demo", *args]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_demo_twice(doppel_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = _run(capsys, "--max-steps", "6")
    assert first["import"]["stored"] > 1000
    assert first["import"]["skipped"]["no_consent"] > 0  # Prof. Hale never consented: counted, not stored
    adapter = first["adapter"]
    assert Path(adapter["path"], "adapter.gguf").is_file()
    assert first["metrics"]["ppl_base"] > 0 and first["metrics"]["ppl_adapter"] > 0
    assert len(first["replies"]) == 3
    assert all(r["base"] and r["retrieval"] and r["trained"] for r in first["replies"])

    second = _run(capsys)
    assert second["import"]["stored"] == 0 and second["import"]["already_stored"] == first["import"]["stored"]
    assert second["adapter"]["id"] == adapter["id"]  # reused, not retrained
    assert [r["trained"] for r in second["replies"]] == [r["trained"] for r in first["replies"]]  # greedy
