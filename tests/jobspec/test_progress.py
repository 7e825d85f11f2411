"""Progress output for logs: a line only when something a reader cares about changed, at most every interval."""

from __future__ import annotations

from jobspec.progress import ProgressState, Throttle, render_bar


def test_a_throttle_never_repeats_the_same_text() -> None:
    throttle = Throttle(5.0)
    state = ProgressState(status="running", step=3, total=10, loss=1.5)
    line = render_bar(state)
    assert throttle.ready(state, now=0.0, text=line)
    # Minutes later, nothing changed: a log gains nothing from the same line again.
    assert not throttle.ready(state, now=600.0, text=line)
    state.step = 4
    moved = render_bar(state)
    assert throttle.ready(state, now=601.0, text=moved)
    state.step = 5
    assert not throttle.ready(state, now=602.0, text=render_bar(state)), "changed, but within the interval"
    assert throttle.ready(state, now=606.0, text=render_bar(state))
    state.status = "succeeded"
    assert throttle.ready(state, now=606.5, text=render_bar(state)), "a status change is always shown"


def test_a_log_of_a_long_job_has_no_identical_lines() -> None:
    from dataclasses import replace

    throttle = Throttle(5.0)
    printed: list[str] = []
    state = ProgressState(status="running", step=0, total=40, loss=2.0)
    for tick in range(2000):  # one progress event per 0.25 s; a step every 2.5 s; ETA changes every tick
        now = tick * 0.25
        state = replace(state, step=int(now // 2.5), eta_s=1000 - now, loss=2.0 - (now // 2.5) * 0.01)
        key = render_bar(replace(state, eta_s=None, tokens_per_s=None))
        if throttle.ready(state, now=now, text=key):
            printed.append(key)
    assert len(printed) == len(set(printed)), "no line is printed twice"
    assert 30 <= len(printed) <= 100, len(printed)
