"""The join benchmark's pieces: IRC timing, who spoke before whom, the KS statistic, and a scored split of a small
synthetic channel (the gate against what really happened, the named baseline, the timing)."""

from __future__ import annotations

import random
from typing import Any

from core.settings import Settings
from doppel import benchjoin
from doppel.benchjoin import Line, ks, own_messages, timed


def test_timed_spreads_a_minute_and_crosses_midnight() -> None:
    lines = timed({"date": "2020-01-01", "lines": [[1439, "a", "x"], [1439, "b", "y"], [0, "a", "z"]]})
    base = 1577836800.0
    assert [round(line.at - base) for line in lines] == [1439 * 60 + 15, 1439 * 60 + 45, 1440 * 60 + 30]


def test_own_messages_know_when_someone_else_last_spoke() -> None:
    lines = [Line(0.0, "a", "1"), Line(5.0, "b", "2"), Line(9.0, "b", "3"), Line(20.0, "a", "4")]
    mine = own_messages(lines)
    assert [m.prev_other_at for m in mine["b"]] == [0.0, 0.0]
    assert [m.prev_other_at for m in mine["a"]] == [None, 9.0]


def test_ks_statistic() -> None:
    assert ks([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == 0.0
    assert ks([1.0, 2.0], [3.0, 4.0]) == 1.0
    assert ks([1.0, 2.0, 3.0, 4.0], [3.0, 4.0, 5.0, 6.0]) == 0.5


def _logs(rng: random.Random) -> list[dict[str, Any]]:
    """Twelve windows: 'host' answers whoever names them; the others chat at random."""
    logs = []
    for w in range(12):
        lines: list[list[Any]] = []
        minute = 600
        for _ in range(300):
            minute += rng.random() < 0.3
            nick = rng.choice(["amy", "ben", "cal", "dee", "eve"])
            if rng.random() < 0.03:
                lines.append([minute, nick, "host: how do I mount a usb disk?"])
                minute += 1
                lines.append([minute, "host", f"{nick}: sudo mount /dev/sdb1 /mnt"])
            else:
                lines.append(
                    [minute, nick, rng.choice(["hi", "wifi broken", "try rebooting", "which kernel?"])]
                )
        logs.append({"log": f"w{w:02d}", "date": f"2020-01-{w + 1:02d}", "lines": lines})
    return logs


def test_a_scored_split_compares_the_gate_with_its_baselines(settings: Settings) -> None:
    result = benchjoin.evaluate(settings, "heldout", logs=_logs(random.Random(5)))
    assert result["windows_scored"] == 3 and result["human_messages"] > 500
    assert 0 < result["base_rate"] < 1
    assert set(result["levels"]) == {"quiet", "normal", "lively"}
    for row in result["levels"].values():
        assert 0.0 <= row["precision"] <= 1.0 and "random_same_rate" in row
    assert result["speak_when_named"]["decisions"] > 0
    assert result["timing"]["turns"] > 0 and 0.0 <= result["timing"]["burst_size_ks"] <= 1.0
    baselines = result["baselines"]
    assert set(baselines) == {"named", "recent_speaker", "addressed"}
    assert baselines["recent_speaker"]["decisions"] > baselines["addressed"]["decisions"] > 0
    # 'host' answers whoever addresses them while around: the gate, asked as if they were away, lets them speak.
    assert result["addressed_answered_present"] > 5
    assert result["levels"]["normal"]["addressed_recall"] >= 0.5


def test_the_fit_learns_from_present_moments_of_the_fit_windows_only(settings: Settings) -> None:
    logs = _logs(random.Random(5))
    fitted = benchjoin.fit(settings, logs)
    assert fitted["windows"] == list(benchjoin.split_bounds(len(logs))["fit"])
    assert fitted["windows"][1] <= benchjoin.split_bounds(len(logs))["validation"][0]
    assert fitted["present_moments"] > 0
    assert fitted["weights"]["directed"] > 1.0, "'host' answers when addressed, and only then"
    # Changing what happens in the held-out windows does not move the fitted weights.
    changed = logs[:-3] + [dict(w, lines=w["lines"][:50]) for w in logs[-3:]]
    assert benchjoin.fit(settings, changed)["weights"] == fitted["weights"]
