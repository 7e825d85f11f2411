"""`doppel bench fidelity --members N`: the honest run of the fidelity benchmark over several real members.

The protocol (panel, judge, detectability, split, sampling) is `doppel/benchdetect.py`'s and is copied into the
result. Systems: the member's own held-out replies (the ceiling), the base model, the retrieval persona (what `auto`
serves a member without an adapter), and for each training configuration asked for, the adapter alone and the
hybrid (what `auto` serves once the member has one).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from core.chatformat import Utterance
from core.errors import ConfigError, UserFacingError
from core.settings import Settings, with_changes
from doppel import benchdetect as bd
from doppel.benchcorpus import DATA, author_id, load_logs
from doppel.benchscore import classifier
from doppel.benchstore import Heldout, member_split, prepare
from jobspec.attribution import FOLDS

SEED = 0
# The systems no training makes: the bare base, the retrieval persona, and it without the member's message shape.
UNTRAINED = ("base", "auto", "auto-unfitted")


async def _contexts(settings: Settings, member: str, n: int) -> dict[str, Any]:
    """The member's held-out replies with the turns before each, and every held-out reply (to keep from retrieval)."""
    split = await member_split(settings, member)
    ds = split.dataset
    return {
        "contexts": bd.heldout_contexts(split.turns, ds.heldout, split.member_id, n),
        "banned": bd.banned_texts(ds.heldout),
        "train_examples": len(ds.train),
        "heldout": len(ds.heldout),
    }


async def _served(
    settings: Settings,
    member: str,
    adapter: str | None,
    contexts: Sequence[Mapping[str, Any]],
    banned: set[str],
    *,
    with_messages: bool = True,
) -> tuple[str, list[str]]:
    """Replies as the bot makes them: `auto` for what the member has, the bot's temperature and length."""
    from data.store import Store
    from inference.engine import Engine
    from inference.requests import GenParams, PersonaRequest, resolve_mode
    from inference.retrieval import Retriever

    mode = resolve_mode(
        settings.bot.persona_mode, has_adapter=adapter is not None, has_messages=with_messages
    )
    persona = PersonaRequest(
        member_id=author_id(member),
        name=member,
        channel_name="ubuntu",
        mode=mode,
        adapters=((adapter, 1.0),) if adapter else (),
        guild_id="bench",
    )
    cfg = settings.inference
    out = []
    async with Store.open(settings) as store:
        async with Engine(settings, retriever=Heldout(Retriever(store, settings), banned)) as engine:
            for i, c in enumerate(contexts):
                params = GenParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, seed=SEED + i)
                context = [Utterance(a, name, text) for a, name, text in c["context"]]
                out.append((await engine.reply(persona, context, params).text()).strip())
    return mode, out


def fidelity(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """Entry point of `doppel bench fidelity`: the honest run with `--members N`, else the recipe comparison."""
    from doppel.benchfidelity import run_fidelity

    members = int(getattr(args, "members", 0) or 0)
    return asyncio.run(run_fidelity(settings, args, run_members if members > 0 else None))


async def run_members(bench: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """Every member: contexts, the similar panel and its judge, each system's replies judged the same way."""
    from doppel.benchfidelity import CONFIGS, _scaled, _train, say

    k = int(getattr(args, "members", 0) or 5)
    quick = bool(getattr(args, "quick", False))
    n_open = int(getattr(args, "openings", 0) or (12 if quick else 100))
    scale = float(getattr(args, "steps_scale", 0) or (0.1 if quick else 1.0))
    names = [c for c in str(getattr(args, "configs", "") or "").split(",") if c]
    trained_configs = [c for c in names if c in CONFIGS]
    for name in names:  # every label is checked before the long import
        if name.startswith("auto@"):
            variant(bench, name)
        elif name not in CONFIGS and name not in UNTRAINED:
            known = ", ".join([*UNTRAINED, *CONFIGS, "auto@KEY=VALUE"])
            raise UserFacingError(f"--configs: unknown configuration {name!r} (known: {known})")
    t0 = time.monotonic()
    logs = load_logs(DATA)
    members = bd.most_active(logs, k)
    first = getattr(args, "member", None)
    if first:
        members = [first, *[m for m in members if m != first]][:k]
    authors = bd.profiles(logs, bd.MIN_MESSAGES)
    panels = {m: bd.similar_panel(authors, m, bd.PANEL, SEED) for m in members}
    if quick:  # a smoke run: only the logs the first member speaks in most
        from doppel.benchcorpus import select_logs

        logs = select_logs(logs, [members[0]], 20)
        members = members[:2]
    else:
        wanted = set(members)
        logs = [log for log in logs if any(nick in wanted for _, nick, _ in log["lines"])]
    bench.home.mkdir(parents=True, exist_ok=True)
    panel_nicks = sorted({n for p in panels.values() for n in p})
    prep = await prepare(bench, panel_nicks, logs)
    say(f"imported {prep['stored']} messages of {prep['authors']} authors; members {members}")
    result: dict[str, Any] = {
        "protocol": {
            "corpus": "Ubuntu IRC #ubuntu (irc-disentanglement selection, CC-BY-4.0; logs public domain)",
            "members": "the most active humans",
            "panel": f"member + {bd.PANEL - 1} most similar by char 2-4-gram TF-IDF cosine "
            f"(authors with >= {bd.MIN_MESSAGES} messages)",
            "judge": "hashed char n-gram linear SVM over the panel, held-out replies excluded",
            "detectability": f"{FOLDS}-fold CV accuracy, char_wb 1-4-gram TF-IDF + logistic regression, "
            "system replies vs the member's real replies to the same contexts",
            "contexts": f"held-out replies (time split, heldout_fraction "
            f"{bench.dataset.heldout_fraction}), up to {bd.DEPTH} turns before each",
            "sampling": f"auto mode, temperature {bench.inference.temperature}, "
            f"max_tokens {bench.inference.max_tokens}, seed = context index",
            "intervals": "95%: Wilson for proportions, normal for means",
            "seed": SEED,
        },
        "messages": prep["stored"],
        "members": {},
    }
    for member in members:
        got = await _contexts(bench, member, n_open)
        contexts, banned = got["contexts"], got["banned"]
        real = [c["reply"] for c in contexts]
        judge = classifier(logs, panels[member], banned, seed=SEED)
        mid = author_id(member)
        entry: dict[str, Any] = {
            "panel": panels[member],
            "judge_accuracy": round(judge.accuracy, 3),
            "contexts": len(contexts),
            "train_examples": got["train_examples"],
            "systems": {
                "member": {"attribution": bd.attribution(judge, mid, real), "shape": bd.shape(real)},
            },
            "samples": {},
        }
        # The untrained systems: both, unless --configs names some of them (`base`, `auto`, and `auto-unfitted`:
        # auto without the member's message shape, [inference] fit_shape = false, for the method's before/after).
        # `auto@key=value@...`: auto with those [inference] settings changed (a method change against auto).
        asked = [s for s in names if s in UNTRAINED or s.startswith("auto@")] or ["base", "auto"]
        runs: list[tuple[str, str | None, bool]] = [(s, None, s != "base") for s in asked]
        for name in trained_configs:
            trained = await _train(bench, member, _scaled(bench, CONFIGS[name], scale))
            entry.setdefault("adapters", {})[name] = {
                "ppl_base": trained["metrics"].get("ppl_base"),
                "ppl_adapter": trained["metrics"].get("ppl_adapter"),
                "train_s": trained["train_s"],
            }
            runs.append((name, trained["adapter"], True))
        for label, adapter, with_messages in runs:
            served = variant(bench, "auto@fit_shape=false" if label == "auto-unfitted" else label)
            mode, texts = await _served(
                served, member, adapter, contexts, banned, with_messages=with_messages
            )
            key = mode if label in ("base", "auto") else f"{label}:{mode}"
            entry["systems"][key] = bd.judged(judge, mid, texts, real, SEED)
            entry["samples"][key] = texts[:3]
        result["members"][member] = entry
        say(f"{member}: " + ", ".join(f"{s}: {_brief(v)}" for s, v in entry["systems"].items()))
        partial = getattr(args, "output", None)
        if partial:
            # Each member's figures as soon as they exist: a long run cut short keeps what it measured.
            Path(f"{partial}.partial").write_text(json.dumps(result), encoding="utf-8")
    systems = sorted({s for e in result["members"].values() for s in e["systems"] if s != "member"})
    result["pooled"] = {s: bd.pooled(result["members"], s) for s in systems}
    result["pooled"]["member"] = bd.pooled(
        {
            m: {"systems": {"member": {**e["systems"]["member"], "detectability": _none()}}}
            for m, e in result["members"].items()
        },
        "member",
    )
    result["elapsed_s"] = round(time.monotonic() - t0, 1)
    return result


def variant(bench: Settings, label: str) -> Settings:
    """The settings a system label names: `auto@fit_shape=false@retrieval_k=8` changes those [inference] fields."""
    fields = {f.name for f in dataclasses.fields(bench.inference)}
    changes: dict[str, str] = {}
    for item in label.split("@")[1:]:
        key, _, raw = item.partition("=")
        if key not in fields or not raw:
            raise UserFacingError(f"--configs {label}: {item!r} is not KEY=VALUE of an [inference] setting")
        changes[key] = raw
    try:
        inference = with_changes(bench.inference, changes, "inference")
    except ConfigError as exc:
        raise UserFacingError(f"--configs {label}: {exc}") from None
    return dataclasses.replace(bench, inference=inference)


def _none() -> dict[str, Any]:
    return {"accuracy": None, "ci": None, "n": 0}


def _brief(v: Mapping[str, Any]) -> str:
    att = v["attribution"]["share"]
    det = (v.get("detectability") or {}).get("accuracy")
    return f"attr {att}" + (f" det {det}" if det is not None else "") + f" len {v['shape']['chars']['mean']}"
