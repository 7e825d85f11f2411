"""`doppel bench join`: would the gate let a member speak when they really did? On real multi-party IRC chat.

Data: the `#ubuntu` IRC windows the fidelity bench uses (doppel/benchdata). Windows are in time order; the last
quarter is held out and only it is scored. Before each held-out window, every member's habits are fitted on the
windows before it (as the bot's stored history grows), never on the window scored. Members are the most active
humans of those earlier windows. For each human message and each member the gate may consider (not the author,
not active in the quiet minutes), the truth is whether the member wrote within the next WINDOW_S seconds.

The gate asks "would they answer if they were here", so it is also scored where that can be seen: moments where a
member who was present (wrote in the last RECENT_S) was addressed or replied to and answered within the window;
the gate is applied to them as if they were away, and the share it lets speak is the addressed recall.

The windows before the held-out quarter tune the method: `python -m doppel.benchjoin fit` fits the gate's weights on
the fit windows (present moments only), `--split validation` scores the validation windows between them and the
held-out quarter.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import random
import statistics
import time
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from core.errors import UserFacingError
from core.settings import JOIN_LEVELS, Settings
from doppel.benchcorpus import _ADDRESS, BOTS, load_logs
from inference.joingate import (
    FEATURES,
    LEVELS,
    RECENT_S,
    WINDOW_S,
    ChannelMemory,
    Moment,
    decide,
    eligible,
    features,
    is_named,
    probability,
    word_corpus,
)
from inference.joinhabits import (
    Habits,
    OwnMessage,
    build_habits,
    sample_burst,
    sample_delay,
)

CHANNEL = "ubuntu"
HELDOUT_FRACTION = 0.25
VALIDATION_FRACTION = 0.15
FIT_FRACTION = 0.26  # the fit windows: this share of all, just before the validation ones (60-105 of 173)
L2 = 1.0  # the fit's ridge on the weights (not the bias): keeps rare signals from running away
PANEL = 50  # members considered per window (the most active with enough history)
MIN_HISTORY = 30
KS_MAX = 0.2
LAG_MAX_MS = 20.0


@dataclass(frozen=True)
class Line:
    """One IRC line with a timestamp in seconds."""

    at: float
    nick: str
    text: str


def timed(log: Mapping[str, Any]) -> list[Line]:
    """A window's lines with epoch seconds: minutes from the log, messages of one minute spread evenly across it."""
    day = datetime.fromisoformat(str(log["date"])).replace(tzinfo=UTC).timestamp()
    raw = log["lines"]
    minutes: list[float] = []
    prev, offset = -1, 0
    for minute, _, _ in raw:
        if minute < prev - 60:
            offset += 1440  # the log crossed midnight
        prev = minute
        minutes.append(float(minute + offset))
    per: Counter[float] = Counter(minutes)
    seen: Counter[float] = Counter()
    out = []
    for m, (_, nick, text) in zip(minutes, raw, strict=True):
        k = seen[m]
        seen[m] += 1
        out.append(Line(day + m * 60.0 + 60.0 * (k + 0.5) / per[m], str(nick), str(text)))
    return out


def own_messages(lines: Sequence[Line]) -> dict[str, list[OwnMessage]]:
    """Each human's messages of a window, with when someone else last spoke before each."""
    out: dict[str, list[OwnMessage]] = {}
    last: tuple[str, float, float | None] | None = None  # (nick, at, that line's own prev_other_at)
    for line in lines:
        if last is None:
            prev_other = None
        elif last[0] != line.nick:
            prev_other = last[1]
        else:
            # The same speaker again: someone else last spoke where their previous line saw it.
            prev_other = last[2]
        if line.nick not in BOTS:
            out.setdefault(line.nick, []).append(OwnMessage(CHANNEL, line.at, line.text, prev_other))
        last = (line.nick, line.at, prev_other)
    return out


def ordered_windows(logs: Sequence[Mapping[str, Any]]) -> list[list[Line]]:
    """The windows in time order, timed."""
    return [timed(log) for log in sorted(logs, key=lambda w: (str(w["date"]), str(w["log"])))]


def addressee(text: str, known: set[str]) -> str | None:
    """The known nick a line opens by addressing ("nick: ..."), as IRC users reply."""
    m = _ADDRESS.match(text)
    return m.group(1) if m and m.group(1) in known else None


@dataclass
class Tally:
    """Decisions of one gate over the scored messages: speak (member chosen) and whether that member really spoke."""

    spoke: int = 0
    right: int = 0

    def row(self, positives: int, messages: int) -> dict[str, Any]:
        precision = self.right / self.spoke if self.spoke else 0.0
        return {
            "decisions": self.spoke,
            "speak_rate": round(self.spoke / messages, 4) if messages else 0.0,
            "precision": round(precision, 4),
            "recall": round(self.right / positives, 4) if positives else 0.0,
        }


@dataclass
class Scored:
    """What one split's scoring gathered."""

    messages: int = 0
    pairs: int = 0
    positives: int = 0
    gates: dict[str, Tally] | None = None
    baselines: dict[str, Tally] | None = None
    eligible_sizes: list[tuple[int, int]] | None = (
        None  # per message: members considered, how many really spoke
    )
    addressed_answered: int = 0  # present members addressed or replied to who answered within the window
    addressed_hits: dict[str, int] | None = (
        None  # of those, how many the gate let speak as if away, per level
    )
    real_delays: list[float] | None = None
    model_delays: list[float] | None = None
    real_bursts: list[int] | None = None
    model_bursts: list[int] | None = None


def history_habits(history: Mapping[str, deque[OwnMessage]]) -> list[Habits]:
    """Habits of the PANEL most active members with enough history (fitted on earlier windows only)."""
    ranked = sorted(
        (n for n, h in history.items() if len(h) >= MIN_HISTORY), key=lambda n: (-len(history[n]), n)
    )
    return [build_habits(n, [n], list(history[n])) for n in ranked[:PANEL]]


def present(memory: ChannelMemory, member_id: str, at: float, quiet_s: float = 0.0) -> bool:
    """Whether the member was in the channel: they wrote there within RECENT_S (and not in the last `quiet_s`)."""
    seen = memory.seen.get(member_id)
    return seen is not None and quiet_s < at - seen <= RECENT_S


def directed_at(habits: Habits, moment: Moment) -> bool:
    """Whether the message addresses the member by name or replies to them."""
    return habits.addressed_by(moment.text) or moment.reply_to_author == habits.member_id


def wrote_within(times: Mapping[str, list[float]], member_id: str, at: float) -> bool:
    """Whether the member wrote within WINDOW_S after `at`."""
    ts = times.get(member_id, [])
    k = bisect.bisect_right(ts, at)
    return k < len(ts) and ts[k] <= at + WINDOW_S


def answered(lines: Sequence[Line], k: int, member_id: str, called: bool) -> bool:
    """Whether the member answered line `k`: wrote within WINDOW_S after it, to its author ("author: ...") or,
    when the line addressed or named them, at all (an answer to someone who called you needs no address)."""
    line = lines[k]
    for later in lines[k + 1 :]:
        if later.at > line.at + WINDOW_S:
            return False
        if later.nick == member_id and (called or addressee(later.text, {line.nick}) == line.nick):
            return True
    return False


def _times(lines: Sequence[Line]) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {}
    for line in lines:
        times.setdefault(line.nick, []).append(line.at)
    return times


def score_window(
    lines: Sequence[Line],
    habits: Sequence[Habits],
    quiet_s: float,
    out: Scored,
    rng: random.Random,
    max_burst: int,
) -> None:
    """Every human line of one window against every member the gate may consider, at every level."""
    assert out.gates is not None and out.baselines is not None and out.eligible_sizes is not None
    assert out.addressed_hits is not None
    corpus = word_corpus(habits)
    known = {line.nick for line in lines}  # anyone may be addressed, members or not
    times = _times(lines)
    memory = ChannelMemory()
    for line in lines:
        human = line.nick not in BOTS
        to = addressee(line.text, known)
        if human:
            moment = Moment(CHANNEL, line.at, line.nick, line.text, reply_to_author=to)
            pool = [h for h in habits if eligible(h.member_id, moment, memory, quiet_s)]
            truth = {h.member_id: wrote_within(times, h.member_id, line.at) for h in pool}
            out.messages += 1
            out.pairs += len(pool)
            out.positives += sum(truth.values())
            out.eligible_sizes.append((len(pool), sum(truth.values())))
            # Each member's probability once; a level lets the likeliest speak if it reaches the threshold.
            ps = {h.member_id: probability(h, moment, memory, corpus)[0] for h in pool}
            top = max(ps, key=lambda m: ps[m], default=None)
            for level in JOIN_LEVELS:
                if top is not None and ps[top] >= LEVELS[level].threshold:
                    out.gates[level].spoke += 1
                    out.gates[level].right += int(truth[top])
            # The baselines, each choosing at most one of the members the rules allow.
            picks = {
                "named": next((h for h in pool if is_named(h, line.text, corpus)), None),
                "addressed": next((h for h in pool if directed_at(h, moment)), None),
                "recent_speaker": max(
                    (h for h in pool if h.member_id in memory.seen),
                    key=lambda h: memory.seen[h.member_id],
                    default=None,
                ),
            }
            for name, chosen in picks.items():
                if chosen is not None:
                    out.baselines[name].spoke += 1
                    out.baselines[name].right += int(truth[chosen.member_id])
            # The product's question where it can be seen: present, addressed, answered; scored as if away.
            for h in habits:
                if h.member_id == line.nick or not present(memory, h.member_id, line.at):
                    continue
                if not directed_at(h, moment) or not wrote_within(times, h.member_id, line.at):
                    continue
                out.addressed_answered += 1
                mine = probability(h, moment, memory, corpus)[0]
                rival = max((p for m, p in ps.items() if m != h.member_id), default=0.0)
                for level in JOIN_LEVELS:
                    out.addressed_hits[level] += int(mine >= LEVELS[level].threshold and mine > rival)
        memory.note(line.nick, line.at, human=human, addressed=to)
    # Timing: the members' real reply delays and burst sizes in this window against the persona's draws.
    real = own_messages(lines)
    assert out.real_delays is not None and out.model_delays is not None
    assert out.real_bursts is not None and out.model_bursts is not None
    for h in habits:
        if h.member_id not in real:
            continue
        seen = build_habits(h.member_id, [h.member_id], real[h.member_id])
        out.real_delays += seen.delays
        out.model_delays += [sample_delay(h, rng) for _ in seen.delays]
        out.real_bursts += seen.bursts
        out.model_bursts += [sample_burst(h, rng, cap=max_burst) for _ in seen.bursts]


def present_rows(
    lines: Sequence[Line],
    habits: Sequence[Habits],
    quiet_s: float,
    xs: list[tuple[float, ...]],
    ys: list[int],
) -> None:
    """The fit's rows from one window: each human message against each member around then but not talking.

    Around: they wrote here in the last RECENT_S. Not talking: not in the last `quiet_s`, the state in which the gate
    acts (the talk-over rule); a member in the middle of their own exchange writes again whatever is said to them.
    """
    corpus = word_corpus(habits)
    known = {line.nick for line in lines}  # anyone may be addressed, members or not
    memory = ChannelMemory()
    for k, line in enumerate(lines):
        human = line.nick not in BOTS
        to = addressee(line.text, known)
        if human:
            moment = Moment(CHANNEL, line.at, line.nick, line.text, reply_to_author=to)
            for h in habits:
                if h.member_id != line.nick and present(memory, h.member_id, line.at, quiet_s):
                    signals = features(h, moment, memory, corpus)
                    xs.append(signals)
                    called = bool(signals[FEATURES.index("directed")] or signals[FEATURES.index("named")])
                    ys.append(int(answered(lines, k, h.member_id, called)))
        memory.note(line.nick, line.at, human=human, addressed=to)


def logistic(xs: Sequence[Sequence[float]], ys: Sequence[int], l2: float = L2) -> tuple[float, list[float]]:
    """A ridge logistic regression by Newton's method: (bias, weights)."""
    import numpy as np

    x = np.hstack([np.ones((len(xs), 1)), np.asarray(xs, dtype=np.float64)])
    y = np.asarray(ys, dtype=np.float64)
    ridge = np.full(x.shape[1], l2)
    ridge[0] = 0.0  # the bias is not shrunk
    w = np.zeros(x.shape[1])
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        grad = x.T @ (y - p) - ridge * w
        hess = (x * (p * (1.0 - p))[:, None]).T @ x + np.diag(ridge)
        step = np.linalg.solve(hess, grad)
        w += step
        if float(np.abs(step).max()) < 1e-7:
            break
    return float(w[0]), [float(v) for v in w[1:]]


def split_bounds(n: int) -> dict[str, tuple[int, int]]:
    """Window ranges of the fit, validation and held-out parts (time order)."""
    heldout_from = n - int(n * HELDOUT_FRACTION)
    validation_from = heldout_from - int(n * VALIDATION_FRACTION)
    fit_from = validation_from - int(n * FIT_FRACTION)
    return {
        "fit": (fit_from, validation_from),
        "validation": (validation_from, heldout_from),
        "heldout": (heldout_from, n),
    }


def fit(settings: Settings, logs: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The gate's weights from the fit windows' present moments (habits from the windows before each)."""
    windows = ordered_windows(load_logs() if logs is None else logs)
    first, stop = split_bounds(len(windows))["fit"]
    xs: list[tuple[float, ...]] = []
    ys: list[int] = []
    history: dict[str, deque[OwnMessage]] = {}
    for k, lines in enumerate(windows[:stop]):
        if k >= first:
            present_rows(lines, history_habits(history), settings.join.member_quiet_s, xs, ys)
        for nick, msgs in own_messages(lines).items():
            history.setdefault(nick, deque(maxlen=settings.join.profile_messages)).extend(msgs)
    bias, weights = logistic(xs, ys)
    return {
        "split": "fit",
        "windows": [first, stop],
        "present_moments": len(ys),
        "answer_rate_present": round(sum(ys) / len(ys), 4) if ys else 0.0,
        "bias": round(bias, 3),
        "weights": {name: round(w, 3) for name, w in zip(FEATURES, weights, strict=True)},
    }


def random_gate(
    scored: Scored, rate: float, sizes: Sequence[tuple[int, int]], rng: random.Random
) -> dict[str, Any]:
    """A gate that speaks after a message at `rate`, for one of the members considered there, drawn at random."""
    spoke = right = 0
    for pool, positives in sizes:
        if pool and rng.random() < rate:
            spoke += 1
            right += rng.randrange(pool) < positives  # the drawn member is one of those who really spoke
    return Tally(spoke, right).row(scored.positives, scored.messages)


def ks(a: Sequence[float], b: Sequence[float]) -> float:
    """The two-sample Kolmogorov-Smirnov statistic (largest gap between the two empirical CDFs)."""
    if not a or not b:
        return 1.0
    xs, ys = sorted(a), sorted(b)
    i = j = 0
    gap = 0.0
    while i < len(xs) and j < len(ys):
        v = min(xs[i], ys[j])
        while i < len(xs) and xs[i] <= v:
            i += 1
        while j < len(ys) and ys[j] <= v:
            j += 1
        gap = max(gap, abs(i / len(xs) - j / len(ys)))
    return round(gap, 4)


def evaluate(
    settings: Settings, split: str, seed: int = 7, logs: Sequence[Mapping[str, Any]] | None = None
) -> dict[str, Any]:
    """Score the held-out (or validation) windows with habits fitted on every earlier window."""
    windows = ordered_windows(load_logs() if logs is None else logs)
    first, stop = split_bounds(len(windows))[split]
    rng = random.Random(seed)
    out = Scored(
        gates={level: Tally() for level in JOIN_LEVELS},
        baselines={name: Tally() for name in ("named", "recent_speaker", "addressed")},
        eligible_sizes=[],
        addressed_hits=dict.fromkeys(JOIN_LEVELS, 0),
        real_delays=[],
        model_delays=[],
        real_bursts=[],
        model_bursts=[],
    )
    keep = settings.join.profile_messages
    history: dict[str, deque[OwnMessage]] = {}
    for k, lines in enumerate(windows[:stop]):
        if k >= first:
            score_window(
                lines,
                history_habits(history),
                settings.join.member_quiet_s,
                out,
                rng,
                settings.join.max_burst,
            )
        for nick, msgs in own_messages(lines).items():
            history.setdefault(nick, deque(maxlen=keep)).extend(msgs)
    assert out.gates is not None and out.baselines is not None and out.eligible_sizes is not None
    assert out.addressed_hits is not None
    base = out.positives / out.pairs if out.pairs else 0.0
    levels = {}
    for level in JOIN_LEVELS:
        row = out.gates[level].row(out.positives, out.messages)
        row["random_same_rate"] = random_gate(out, row["speak_rate"], out.eligible_sizes, rng)
        row["threshold"] = LEVELS[level].threshold
        row["addressed_recall"] = (
            round(out.addressed_hits[level] / out.addressed_answered, 4) if out.addressed_answered else 0.0
        )
        levels[level] = row
    default = settings.join.default_level
    baselines = {name: t.row(out.positives, out.messages) for name, t in out.baselines.items()}
    named = baselines["named"]
    gate_p = levels[default]["precision"]
    delay_ks = ks(out.model_delays or [], out.real_delays or [])
    burst_ks = ks([float(b) for b in out.model_bursts or []], [float(b) for b in out.real_bursts or []])
    timing: dict[str, Any] = {
        "reply_delay_ks": delay_ks,
        "burst_size_ks": burst_ks,
        "delays": len(out.real_delays or []),
        "turns": len(out.real_bursts or []),
        "real_delay_median_s": round(statistics.median(out.real_delays), 1) if out.real_delays else None,
        "model_delay_median_s": round(statistics.median(out.model_delays), 1) if out.model_delays else None,
    }
    return {
        "split": split,
        "windows_scored": stop - first,
        "windows_fitted_before": first,
        "human_messages": out.messages,
        "member_pairs": out.pairs,
        "members_per_message": round(out.pairs / out.messages, 1) if out.messages else 0,
        "base_rate": round(base, 4),
        "truth": f"the member wrote within {int(WINDOW_S)} s after the message",
        "levels": levels,
        "speak_when_named": named,
        "baselines": baselines,
        "addressed_answered_present": out.addressed_answered,
        "addressed_truth": (
            f"a member present (wrote in the last {int(RECENT_S)} s) was addressed by name or replied to and "
            f"wrote within {int(WINDOW_S)} s; the gate applied to them as if they were away"
        ),
        "default_level": default,
        "default_precision_vs_base": round(gate_p / base, 2) if base else None,
        "timing": timing,
        "checks": {
            "precision_at_least_3x_base": bool(base and gate_p >= 3 * base),
            "precision_at_least_every_baseline": all(gate_p >= b["precision"] for b in baselines.values()),
            "addressed_recall_normal_at_least_0.5": levels["normal"]["addressed_recall"] >= 0.5,
            "addressed_recall_quiet_at_least_0.3": levels["quiet"]["addressed_recall"] >= 0.3,
            "delay_ks_ok": delay_ks <= KS_MAX,
            "burst_ks_ok": burst_ks <= KS_MAX,
        },
    }


async def loop_lag(settings: Settings, personas: int = 50, messages: int = 2000) -> dict[str, Any]:
    """Event-loop lag while the gate scores `personas` eligible members for every message, as the bot does."""
    windows = ordered_windows(load_logs())
    history: dict[str, deque[OwnMessage]] = {}
    for lines in windows[: len(windows) // 2]:
        for nick, msgs in own_messages(lines).items():
            history.setdefault(nick, deque(maxlen=settings.join.profile_messages)).extend(msgs)
    ranked = sorted(history, key=lambda n: -len(history[n]))[:personas]
    habits = await asyncio.to_thread(lambda: [build_habits(n, [n], list(history[n])) for n in ranked])
    corpus = word_corpus(habits)
    feed = [line for lines in windows[len(windows) // 2 :] for line in lines if line.nick not in ranked][
        :messages
    ]
    lags: list[float] = []
    decided: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        interval = 0.005
        while not stop.is_set():
            t0 = time.perf_counter()
            await asyncio.sleep(interval)
            lags.append(max(0.0, time.perf_counter() - t0 - interval) * 1000.0)

    tick = asyncio.create_task(ticker())
    memory = ChannelMemory()
    for line in feed:
        moment = Moment(CHANNEL, line.at, line.nick, line.text)
        t0 = time.perf_counter()
        await decide(habits, moment, memory, "lively", quiet_s=settings.join.member_quiet_s, corpus=corpus)
        decided.append((time.perf_counter() - t0) * 1000.0)
        memory.note(line.nick, line.at, human=True)
    stop.set()
    await tick
    lags.sort()
    decided.sort()
    p99 = lags[int(0.99 * (len(lags) - 1))] if lags else 0.0
    return {
        "personas": len(habits),
        "messages": len(feed),
        "loop_lag_ms": {
            "p50": round(lags[len(lags) // 2], 3),
            "p99": round(p99, 3),
            "max": round(lags[-1], 3),
        },
        "decision_ms": {
            "p50": round(decided[len(decided) // 2], 3),
            "p99": round(decided[int(0.99 * (len(decided) - 1))], 3),
        },
        "p99_ok": p99 <= LAG_MAX_MS,
    }


def join(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """`doppel bench join`: the gate on held-out IRC windows, the timing's KS, and the loop lag with 50 personas."""
    split = getattr(args, "split", None) or "heldout"
    if split not in ("heldout", "validation", "fit"):
        raise UserFacingError(f"bench join: --split must be heldout, validation or fit, got {split!r}")
    started = time.perf_counter()
    if split == "fit":
        fitted = fit(settings)
        fitted["wall_s"] = round(time.perf_counter() - started, 1)
        return fitted
    result = evaluate(settings, split)
    result["loop"] = asyncio.run(loop_lag(settings, messages=500 if getattr(args, "quick", False) else 2000))
    result["checks"]["loop_p99_ok"] = result["loop"]["p99_ok"]
    result["source"] = "Ubuntu IRC #ubuntu (irc-disentanglement selection, CC-BY-4.0; logs public domain)"
    result["wall_s"] = round(time.perf_counter() - started, 1)
    return result


# `python -m doppel.benchjoin fit`: the gate's weights from the fit windows, as JSON.
if __name__ == "__main__":
    import json
    import sys

    if sys.argv[1:] != ["fit"]:
        sys.exit("usage: python -m doppel.benchjoin fit")
    print(json.dumps(fit(Settings.load())))
