"""The host's share folder and the trainer's thread choice (core.hostshare)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from core.hostshare import (
    CpuMeter,
    ServingMarks,
    apply_priority,
    encoder_threads,
    serving_now,
    trainer_threads,
)


def test_threads_are_the_cores_nobody_else_uses_never_fewer_than_one() -> None:
    assert trainer_threads(cores=8, ceiling=0, busy_serving=0, others=None) == 8
    assert trainer_threads(cores=8, ceiling=4, busy_serving=0, others=0.1) == 4
    assert trainer_threads(cores=8, ceiling=0, busy_serving=2, others=None) == 6
    # The larger of what engines announce and what the host measured: another job, a test suite.
    assert trainer_threads(cores=8, ceiling=0, busy_serving=2, others=5.2) == 3
    assert trainer_threads(cores=2, ceiling=0, busy_serving=2, others=0.0) == 1
    assert trainer_threads(cores=2, ceiling=0, busy_serving=0, others=1.6) == 1
    assert trainer_threads(cores=2, ceiling=0, busy_serving=0, others=0.3) == 2


def test_an_encoder_beside_llama_cpp_gets_the_cores_llama_cpp_leaves() -> None:
    assert encoder_threads(cores=2, llama_threads=2) == 1
    assert encoder_threads(cores=16, llama_threads=8) == 8
    assert encoder_threads(cores=4, llama_threads=6) == 1


def test_what_others_use_while_the_trainer_sleeps_is_left_out_of_the_reading(monkeypatch) -> None:
    # (time, host busy CPU s, own CPU s): the engine runs 2 cores for 3 s while we sleep, then 1 s of quiet.
    samples = iter([(0.0, 10.0, 5.0), (1.0, 10.5, 5.4), (4.0, 16.5, 5.4), (5.0, 16.6, 5.5), (6.0, 18.6, 5.5)])
    monkeypatch.setattr(CpuMeter, "sample", staticmethod(lambda: next(samples)))
    meter = CpuMeter()
    assert meter.others() is None  # the first reading has nothing to compare with
    meter.exclude(meter.sample(), meter.sample())  # the pause, 1 s -> 4 s
    # Over the 5 s the host was busy 6.6 s, 0.5 s of it ours: others 6.1 s, 6.0 inside the pause, 0.1 in the 2 s out.
    assert meter.others() == pytest.approx((6.1 - 6.0) / 2.0)
    assert meter.others() == pytest.approx(2.0)  # nothing left out: the next second counts whole


def test_marks_say_who_serves_and_who_generates_now(tmp_path: Path) -> None:
    marks = ServingMarks(tmp_path / "run", threads=3)
    marks.open()
    assert serving_now(tmp_path / "run").engines == 1
    assert serving_now(tmp_path / "run").busy_threads == 0
    inside = threading.Event()
    release = threading.Event()

    def worker() -> None:
        with marks.generating():
            inside.set()
            release.wait(10)

    t = threading.Thread(target=worker)
    t.start()
    inside.wait(10)
    with marks.generating():  # two workers at once: still one engine's threads, counted once
        assert serving_now(tmp_path / "run").busy_threads == 3
    assert serving_now(tmp_path / "run").busy_threads == 3, "the other worker still generates"
    release.set()
    t.join()
    assert serving_now(tmp_path / "run").busy_threads == 0
    marks.close()
    assert serving_now(tmp_path / "run").engines == 0


def test_marks_of_a_process_that_died_are_ignored_and_removed(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    (tmp_path / f"{pid}.serving").write_text("2")
    (tmp_path / f"{pid}.busy").write_text("2")
    (tmp_path / "notes.txt").write_text("not a mark")
    assert serving_now(tmp_path).busy_threads == serving_now(tmp_path).engines == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert serving_now(tmp_path / "missing").engines == 0


def test_a_lowered_priority_is_what_the_process_then_runs_with() -> None:
    code = (
        "import os; from core.hostshare import apply_priority as a; "
        "print(a('idle'), os.sched_getscheduler(0) == os.SCHED_IDLE)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["idle", "True"]
    assert apply_priority("normal") == "normal" and os.sched_getscheduler(0) != os.SCHED_IDLE


def test_a_trainer_pauses_while_a_reply_is_made_and_never_longer_than_its_bound(tmp_path: Path) -> None:
    import time

    from core.hostshare import ServingPause

    marks = ServingMarks(tmp_path, threads=2)
    pause = ServingPause(tmp_path, check_every_s=0.0, max_wait_s=5.0)
    pause.wait()
    assert pause.pauses == 0, "nobody generates: no pause"
    done = threading.Event()

    def reply() -> None:
        with marks.generating():
            time.sleep(0.3)
        done.set()

    threading.Thread(target=reply).start()
    time.sleep(0.05)
    pause.wait()
    assert done.is_set() and pause.pauses == 1 and pause.paused_s >= 0.2
    bounded = ServingPause(tmp_path, check_every_s=0.0, max_wait_s=0.2)
    with marks.generating():  # a server that never stops talking does not starve the job
        t0 = time.monotonic()
        bounded.wait()
        assert 0.2 <= time.monotonic() - t0 < 2.0


def test_a_pause_ends_as_soon_as_the_trainer_is_told_to_stop(tmp_path: Path) -> None:
    import time

    from core.hostshare import ServingPause

    marks = ServingMarks(tmp_path, threads=2)
    pause = ServingPause(tmp_path, check_every_s=0.0, max_wait_s=30.0)
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    # A reply that outlasts a stop's grace: the sleep ends with the stop, not with the reply.
    with marks.generating():
        t0 = time.monotonic()
        pause.wait(until=stop.is_set)
        waited = time.monotonic() - t0
    assert stop.is_set() and pause.pauses == 1 and 0.15 <= waited < 5.0
