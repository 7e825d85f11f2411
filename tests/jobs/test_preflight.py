"""Pre-flight: refuses jobs that cannot fit, with the reason and what to change; doctor shows the host checks."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest


def _config(settings: Any, **overrides: Any) -> Any:
    from jobspec.config import TrainConfig

    if settings.base_gguf_path() is None:
        pytest.skip("no base model")
    return TrainConfig.from_settings(settings, member_id="1", **overrides)


def test_memory_estimate_grows_with_batch_and_length(settings: Any) -> None:
    from core.ggufinfo import read_shape
    from jobs.preflight import estimate_memory

    cfg = _config(settings)
    shape = read_shape(settings.base_gguf_path())
    small = estimate_memory(shape, _config(settings, micro_batch_size=1, max_length=128), "cpu")
    big = estimate_memory(shape, _config(settings, micro_batch_size=8, max_length=1024), "cpu")
    assert shape.params * 4 < small < big
    assert estimate_memory(shape, cfg, "cuda:0") < estimate_memory(shape, cfg, "cpu"), "4-bit + checkpointing"


def test_job_that_cannot_fit_is_refused_with_the_fix(settings: Any) -> None:
    from jobs.errors import PreflightError
    from jobs.preflight import job_checks, require

    ok = job_checks(settings, _config(settings, micro_batch_size=1, max_length=128), "cpu")
    require(ok)
    assert {c.name for c in ok} >= {"device", "base model", "memory", "disk"}
    huge = _config(settings, micro_batch_size=4096, max_length=8192)
    with pytest.raises(
        PreflightError, match=r"memory: needs about .* GiB.*fix: lower micro_batch_size \(now 4096\)"
    ):
        require(job_checks(settings, huge, "cpu"))
    with pytest.raises(PreflightError, match=r"fix: lower max_length \(now 65536\)"):
        require(job_checks(settings, _config(settings, micro_batch_size=1, max_length=65536), "cpu"))
    with pytest.raises(PreflightError, match="device cuda:7 is not available"):
        require(job_checks(settings, _config(settings), "cuda:7"))


def test_a_job_too_big_for_the_memory_trains_the_same_step_in_smaller_micro_batches(settings: Any) -> None:
    from core.ggufinfo import read_shape
    from jobs.preflight import estimate_memory, fit_micro_batch

    cfg = _config(settings, micro_batch_size=8, grad_accum=1, max_length=512)
    shape = read_shape(settings.base_gguf_path())
    need = {
        m: estimate_memory(shape, dataclasses.replace(cfg, micro_batch_size=m), "cpu") for m in (8, 4, 2, 1)
    }
    assert need[8] > need[4] > need[2] > need[1]
    assert fit_micro_batch(cfg, "cpu", need[8]) == cfg, "a job that fits is left alone"
    fitted = fit_micro_batch(cfg, "cpu", need[4] + 1)
    assert (fitted.micro_batch_size, fitted.grad_accum) == (4, 2), "the largest micro-batch that fits"
    assert dataclasses.replace(fitted, micro_batch_size=8, grad_accum=1) == cfg, "nothing else changes"
    floor = fit_micro_batch(cfg, "cpu", need[1] // 2)
    assert (floor.micro_batch_size, floor.grad_accum) == (1, 8), "job_checks then refuses it with the fix"
    odd = dataclasses.replace(cfg, micro_batch_size=3)
    assert fit_micro_batch(odd, "cpu", 1) == odd, "only even micro-batches split into equal halves"


def test_the_plan_fits_the_job_to_this_host_and_checks_and_estimates_what_it_will_run(settings: Any) -> None:
    from core.ggufinfo import read_shape
    from jobs.preflight import estimate_memory, plan_job, require

    shape = read_shape(settings.base_gguf_path())
    small = _config(settings, micro_batch_size=2, grad_accum=1, max_length=128)
    plan = plan_job(settings, small, "cpu")
    assert plan.config == small, "a job that fits is left alone"
    require(plan.checks)
    assert plan.mem_bytes == estimate_memory(shape, small, "cpu")
    # 4096 examples of 8192 tokens a micro-batch cannot fit 24 GiB; the plan splits the step as far as it can.
    huge = _config(settings, micro_batch_size=4096, grad_accum=1, max_length=8192)
    fitted = plan_job(settings, huge, "cpu")
    assert fitted.config.micro_batch_size < 4096
    assert fitted.config.micro_batch_size * fitted.config.grad_accum == 4096, "the same optimizer step"
    assert fitted.mem_bytes == estimate_memory(shape, fitted.config, "cpu"), "the estimate of what will run"
    memory = next(c for c in fitted.checks if c.name == "memory")
    assert memory.status == "ok" or "max_length (now 8192)" in memory.fix
    folder = dataclasses.replace(small, base_model=str(settings.home), base_gguf="")
    assert plan_job(settings, folder, "cpu").mem_bytes is None, "no GGUF shape, no estimate"


def test_memory_the_jobs_ahead_will_release_counts_and_is_named(settings: Any) -> None:
    from core.ggufinfo import read_shape
    from jobs.errors import PreflightError
    from jobs.preflight import cpu_device, estimate_memory, plan_job, require

    shape = read_shape(settings.base_gguf_path())
    hi = 1
    config = _config(settings, micro_batch_size=1, max_length=2048)
    free = cpu_device().free_bytes
    while estimate_memory(shape, config, "cpu") < 1.3 * free:  # an odd micro-batch just over what is free
        hi *= 2
        config = dataclasses.replace(config, micro_batch_size=hi + 1)
    need = estimate_memory(shape, config, "cpu")
    with pytest.raises(PreflightError, match=r"memory: needs about .* GiB free \(fix: "):
        require(plan_job(settings, config, "cpu").checks)
    later = plan_job(settings, config, "cpu", freed_bytes=need)
    require(later.checks)
    memory = next(c for c in later.checks if c.name == "memory")
    assert "free once the jobs ahead end" in memory.detail and "now)" in memory.detail
    assert later.config == config and later.mem_bytes == need


def test_disk_check_refuses_when_the_floor_is_not_met(settings: Any) -> None:
    from jobs.preflight import disk_check

    greedy = dataclasses.replace(
        settings, training=dataclasses.replace(settings.training, min_free_disk_mb=10**12)
    )
    check = disk_check(greedy)
    assert check.status == "fail" and "min_free_disk_mb" in check.fix
    assert disk_check(settings).status == "ok"


def test_configured_devices_are_the_queues(settings: Any) -> None:
    from jobs.preflight import devices

    assert [d.name for d in devices(settings)][-1:] in (["cpu"], [d.name for d in devices(settings)][-1:])
    pinned = dataclasses.replace(
        settings, training=dataclasses.replace(settings.training, devices=("cpu", "cuda:5"))
    )
    found = {d.name: d for d in devices(pinned)}
    assert found["cpu"].total_bytes > 0 and found["cuda:5"].total_bytes == 0


def test_progress_state_bar_and_throttle() -> None:
    from jobspec.progress import ProgressState, Throttle, render_bar

    state = ProgressState()
    state.apply({"event": "started", "total": 10, "step": 4, "resumed_from_step": 4})
    assert (state.step, state.resumed_from, state.status) == (4, 4, "running")
    state.apply(
        {"event": "progress", "step": 5, "total": 10, "loss": 1.25, "tokens_per_s": 300.0, "eta_s": 65}
    )
    line = render_bar(state, width=10, fill="#", empty="-")
    assert line.startswith("#####----- ") and "50%" in line and "step 5/10" in line
    assert "loss 1.250" in line and "300 tok/s" in line and "ETA 1:05" in line
    assert ProgressState.from_dict(state.to_dict()) == state
    throttle = Throttle(5.0)
    assert (
        throttle.ready(state, now=0.0)
        and not throttle.ready(state, now=1.0)
        and throttle.ready(state, now=6.0)
    )
    state.apply({"event": "finished", "status": "succeeded"})
    assert throttle.ready(state, now=6.5), "a status change always redraws"
    assert state.fraction == 1.0 and "succeeded" in render_bar(state)


def test_the_serving_gpu_keeps_what_the_engine_will_need(settings: Any) -> None:
    """Issue 22: on a GPU host a job never takes the memory the persona engine needs to answer."""
    from core.hostshare import ServingMarks
    from jobs.preflight import Device, _free, reserve_for_serving, serving_reserve
    from jobspec.memory import GIB

    two = [Device("cuda:0", 24 * GIB, 20 * GIB, "GPU 0"), Device("cuda:1", 24 * GIB, 20 * GIB, "GPU 1")]
    kept = reserve_for_serving(two, 3 * GIB)
    assert [d.free_bytes for d in kept] == [17 * GIB, 20 * GIB], "only llama.cpp's main GPU is reserved"
    assert "3.0 GiB kept for persona serving" in _free(kept[0]) and "kept" not in _free(kept[1])
    assert reserve_for_serving(two, 0) == two
    explicit = dataclasses.replace(
        settings, inference=dataclasses.replace(settings.inference, gpu_reserve_mb=2048)
    )
    assert serving_reserve(explicit) == 2 * GIB
    off = dataclasses.replace(settings, inference=dataclasses.replace(settings.inference, gpu_reserve_mb=0))
    assert serving_reserve(off) == 0
    # This CPU build of llama.cpp offloads nothing: the estimate reserves nothing for it.
    assert serving_reserve(settings) == 0
    # An engine already running holds its memory (nvidia-smi's free figure excludes it): nothing more is kept.
    marks = ServingMarks(settings.share_dir, threads=1)
    marks.open()
    try:
        assert serving_reserve(explicit) == 0
    finally:
        marks.close()
