"""`doppel bench fidelity`: does the persona write like the member on REAL people's chat? Black box, through the product.

Data: real multi-speaker chat of the Ubuntu IRC channel (`doppel/benchdata/ubuntu_irc.jsonl.gz`, see README.md
there: the Ubuntu logs are public domain, the selection is CC-BY-4.0). It is converted to DiscordChatExporter JSON,
imported into a fresh store with every author consenting, and then, per configuration:

- train the member's persona through the supervisor (the same path as `doppel train`),
- answer held-out openings (messages the member really answered, later than all training data) through the engine,
- attribute every reply with a fixed character n-gram classifier over a panel of real authors (the member and the
  next most active ones): the member's share against chance (1 / panel) and against the ceiling (the share of the
  member's own real held-out replies),
- report held-out perplexity (base → adapter) and the wall time of training.

The retrieval persona is served with the held-out replies excluded from its examples (otherwise it could quote
the very answer it is scored on). Configurations are TrainConfig overrides: the recipe and the prompt
shape (`prompt_style`, `core.chatformat.STYLES`) alike, so the recipe and the prompt can be told apart; each
adapter is served with the prompt style it was trained with, as in the product.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from core.errors import UserFacingError
from core.settings import Settings
from doppel.benchchild import trainer_result
from doppel.benchcorpus import DATA, GUILD, author_id, choose_panel, load_logs, select_logs
from doppel.benchscore import classifier, comparisons, score
from doppel.benchstore import Heldout, member_split, prepare

# The plain PEFT reference recipe of issue 14: r16 all-linear, lr 3e-4, 8 examples a step length-grouped, 120 steps,
# a nameless system prompt, up to 6 previous turns, own turns as assistant.
PLAIN_PEFT = {
    "max_steps": 120,
    "micro_batch_size": 8,
    "grad_accum": 1,
    "learning_rate": 3e-4,
    "lora_r": 16,
    "lora_alpha": 32,
    "batching": "length_grouped",
    "prompt_style": "plain",
}
# The product's recipe before issue 14 (150 steps x 4 examples at 2e-4, the named persona prompt).
PRODUCT_V1 = {
    "max_steps": 150,
    "micro_batch_size": 4,
    "grad_accum": 1,
    "learning_rate": 2e-4,
    "lora_r": 16,
    "lora_alpha": 32,
    "prompt_style": "persona",
}
# Each configuration is TrainConfig overrides on top of the preset (recipe and prompt shape alike).
CONFIGS: dict[str, dict[str, Any]] = {
    "product_v1": PRODUCT_V1,
    "plain_peft": PLAIN_PEFT,
    # The 2x2 that separates the suspects: each recipe with the other's prompt shape.
    "v1_recipe_plain_prompt": {**PRODUCT_V1, "prompt_style": "plain"},
    "plain_recipe_persona_prompt": {**PLAIN_PEFT, "prompt_style": "persona"},
    # Whatever TrainConfig defaults to now.
    "defaults": {},
    # The defaults with another prompt style: the named persona prompt (the default until run C), and the short
    # system prompt with speaker names (the default in run D).
    "persona_prompt": {"prompt_style": "persona"},
    "names_prompt": {"prompt_style": "plain+names"},
    # The defaults trained the way the hybrid persona is served: 4 of the member's replies shown in every prompt.
    "defaults_shots": {"example_shots": 4},
    # The defaults at the reference's learning rate (the default until run F, which chose 6e-4: under the
    # budget's steps the adapter underfits, and twice the step learned more within the same compute).
    "defaults_lr3e-4": {"learning_rate": 3e-4},
}
# Fast evaluation inside the job: the harness measures fidelity itself, the job only its perplexity.
JOB_EVAL = {"eval_fidelity": False, "eval_samples": 0, "eval_max_examples": 48}


def _scaled(settings: Settings, overrides: Mapping[str, Any], scale: float) -> dict[str, Any]:
    """`overrides` with its steps multiplied by `scale`: a fixed `max_steps`, or every bound of data-derived steps
    (epochs, cap, floor, token budget), which the trainer resolves from the tokenized data as it always does."""
    from jobspec.config import TrainConfig

    out = dict(overrides)
    if scale == 1.0:
        return out
    cfg = TrainConfig.from_settings(settings, base_model="-", **out)
    if cfg.max_steps > 0:
        out["max_steps"] = max(2, round(cfg.max_steps * scale))
        return out
    out["epochs"] = cfg.epochs * scale
    out["min_steps"] = max(2, round(cfg.min_steps * scale))
    if cfg.max_steps_cap:
        out["max_steps_cap"] = max(2, round(cfg.max_steps_cap * scale))
    if cfg.token_budget:
        out["token_budget"] = max(1, round(cfg.token_budget * scale))
    return out


async def _openings(settings: Settings, member: str, n: int) -> dict[str, Any]:
    """The member's held-out replies (the product's own time split) and the message each one answered."""
    split = await member_split(settings, member)
    ds, turns, mid = split.dataset, split.turns, split.member_id
    by_start = {(t.channel_id, t.start): (k, t) for ch in turns.values() for k, t in enumerate(ch)}
    by_msg = {m: t for ch in turns.values() for t in ch for m in t.message_ids}
    pairs = []
    for ex in sorted(ds.heldout, key=lambda e: e.ts):
        found = by_start.get((ex.channel_id, ex.ts))
        if found is None:
            continue
        k, turn = found
        partner = by_msg.get(turn.reply_to or "")
        if partner is None:
            before = [t for t in turns[ex.channel_id][max(0, k - 3) : k] if t.author_id != mid]
            partner = before[-1] if before else None
        if partner is None or partner.author_id == mid:
            continue
        pairs.append(
            {
                "partner_id": partner.author_id,
                "partner": partner.author_name,
                "message": partner.text,
                "reply": turn.text,
            }
        )
    if len(pairs) > n:
        step = len(pairs) / n  # spread over the held-out period, not its first hour
        pairs = [pairs[int(i * step)] for i in range(n)]
    return {"pairs": pairs, "heldout": [ex.target for ex in ds.heldout], "train_examples": len(ds.train)}


async def _heldout_rows(settings: Settings, member: str, limit: int, style: str) -> list[dict[str, str]]:
    """The member's held-out replies as perplexity rows, rendered in prompt style `style` (oldest first)."""
    held = sorted((await member_split(settings, member, style)).dataset.heldout, key=lambda e: e.ts)
    return [{"prompt": e.prompt, "completion": e.completion} for e in held[: limit or len(held)]]


def cross_perplexity(
    settings: Settings, base_model: str, rows: Sequence[Mapping[str, str]], adapters: Mapping[str, str]
) -> dict[str, Any]:
    """Perplexity of `rows` under the base the adapters were trained on and under each named PEFT adapter folder,
    measured in a trainer child (`python -m trainer perplexity`, trainer/bench.py)."""
    with tempfile.TemporaryDirectory(prefix="doppel-bench-ppl-") as tmp:
        # The rows go in a file of the bench's own temporary folder: the child reads them as it reads a job's.
        path = Path(tmp) / "rows.jsonl"
        path.write_text("".join(json.dumps(dict(r)) + "\n" for r in rows), encoding="utf-8")
        named = [f"--adapter={name}={folder}" for name, folder in adapters.items()]
        cache = str(settings.cache_dir / "base-models")
        return trainer_result(
            "perplexity",
            base_model,
            str(path),
            *named,
            "--cache-dir",
            cache,
            what="bench fidelity: perplexity",
        )


async def _train(settings: Settings, member: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    from data.store import Store
    from jobs.supervisor import Supervisor
    from models.registry import Registry

    async with Store.open(settings) as store:
        sup = Supervisor(store, settings)
        await sup.start()
        try:
            t0 = time.monotonic()
            job = await sup.submit(
                author_id(member), requested_by="bench", source="cli", mode="sft", **{**JOB_EVAL, **overrides}
            )
            job = await sup.wait(job.id)
            wall = time.monotonic() - t0
        finally:
            await sup.close()
        if job.adapter_id is None:
            raise UserFacingError(f"training failed: {job.error or job.status}")
        adapter = await Registry(store, settings).get(job.adapter_id)
    metrics = dict(adapter.metrics or (adapter.meta or {}).get("metrics") or {})
    trained_config = dict((adapter.meta or {}).get("training_config") or job.config)
    sft = dict(((adapter.meta or {}).get("training") or {}).get("sft") or {})
    return {
        "adapter": str(adapter.gguf_path),
        "folder": str(adapter.path),
        "wall_s": round(wall, 1),
        "base_model": str(job.config.get("base_model") or ""),
        "train_s": round((job.finished_at or 0) - (job.started_at or 0), 1),
        "metrics": metrics,
        # As trained: steps resolved from the data (and the preset's token budget), the prompt style.
        "config": {
            k: trained_config.get(k)
            for k in (
                "max_steps",
                "micro_batch_size",
                "grad_accum",
                "learning_rate",
                "lora_r",
                "lora_alpha",
                "target_modules",
                "batching",
                "token_budget",
                "prompt_style",
            )
        },
        "training": {
            k: sft.get(k)
            for k in (
                "steps",
                "real_tokens",
                "train_seconds",
                "cpu_seconds",
                "tokens_per_s",
                "padding_fraction",
            )
        },
    }


async def _replies(
    settings: Settings,
    member: str,
    mode: str,
    adapter: str | None,
    pairs: Sequence[Mapping[str, Any]],
    banned: set[str],
    max_tokens: int,
) -> list[str]:
    from core.chatformat import Utterance
    from data.store import Store
    from inference.engine import Engine
    from inference.requests import GenParams, PersonaRequest
    from inference.retrieval import Retriever

    persona = PersonaRequest(
        member_id=author_id(member),
        name=member,
        channel_name="ubuntu",
        mode=mode,  # type: ignore[arg-type]
        adapters=((adapter, 1.0),) if adapter else (),
        guild_id=GUILD,
    )
    out = []
    async with Store.open(settings) as store:
        async with Engine(settings, retriever=Heldout(Retriever(store, settings), banned)) as engine:
            for i, p in enumerate(pairs):
                params = GenParams(max_tokens=max_tokens, temperature=0.7, seed=i)
                context = [Utterance(str(p["partner_id"]), str(p["partner"]), str(p["message"]))]
                out.append((await engine.reply(persona, context, params).text()).strip())
    return out


async def _own_vs_other(
    settings: Settings, panel: Sequence[str], trained: Mapping[str, tuple[str, str, int, str]]
) -> dict[str, Any]:
    """The product's defaults (else the last configuration) trained for another panel member (same steps, same
    prompt style); held-out perplexity of the member's replies under the base, the member's own adapter and the
    other member's adapter. A persona that learned the member (not just chat in general) is best with its own."""
    name = "defaults" if "defaults" in trained else list(trained)[-1]
    own_folder, style, steps, base_model = trained[name]
    other = panel[1]
    overrides = {**CONFIGS[name], "max_steps": steps, "prompt_style": style}
    theirs = await _train(settings, other, overrides)
    rows = await _heldout_rows(settings, panel[0], JOB_EVAL["eval_max_examples"], style)
    ppl = await asyncio.to_thread(
        cross_perplexity,
        settings,
        base_model,
        rows,
        {"own_adapter": own_folder, "other_adapter": theirs["folder"]},
    )
    return {
        "config": name,
        "member": panel[0],
        "other": other,
        "other_train_wall_s": theirs["wall_s"],
        "steps": steps,
        "ppl": ppl,
        "own_better": bool(ppl["own_adapter"] < ppl["other_adapter"]),
        "own_vs_other_change": round((ppl["own_adapter"] - ppl["other_adapter"]) / ppl["other_adapter"], 3),
    }


def say(text: str) -> None:
    """Progress on stderr: stdout carries the JSON."""
    print(f"[fidelity] {text}", file=sys.stderr, flush=True)


def fidelity(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """Entry point of `doppel bench fidelity`."""
    return asyncio.run(run_fidelity(settings, args))


Runner = Callable[[Settings, argparse.Namespace], Awaitable[dict[str, Any]]]


async def run_fidelity(
    settings: Settings, args: argparse.Namespace, runner: Runner | None = None
) -> dict[str, Any]:
    """The harness (`runner`, default the single-member comparison of recipes) in a home of its own (a whole
    public corpus imported with consent), deleted afterwards."""
    home = Path(tempfile.mkdtemp(prefix="doppel-bench-fidelity-"))
    keep = bool(getattr(args, "keep_home", False))
    try:
        result = await (runner or _run)(dataclasses.replace(settings, home=home), args)
    finally:
        if not keep:
            shutil.rmtree(home, ignore_errors=True)
    if keep:
        result["home"] = str(home)
    return result


async def _run(bench: Settings, args: argparse.Namespace) -> dict[str, Any]:
    from core.chatformat import DEFAULT_STYLE

    quick = bool(getattr(args, "quick", False))
    names = [c for c in str(getattr(args, "configs", "") or "").split(",") if c] or list(CONFIGS)
    unknown = [c for c in names if c not in CONFIGS and c not in ("base", "retrieval")]
    if unknown:
        raise UserFacingError(
            f"unknown fidelity configuration(s): {', '.join(unknown)} (known: {', '.join(CONFIGS)})"
        )
    n_open = int(getattr(args, "openings", 0) or (12 if quick else 40))
    scale = float(getattr(args, "steps_scale", 0) or (0.1 if quick else 1.0))
    panel_size = int(getattr(args, "panel", 0) or 5)
    max_tokens = 48
    logs_all = load_logs(Path(getattr(args, "data", "") or DATA))
    panel = choose_panel(logs_all, panel_size, getattr(args, "member", None))
    logs = select_logs(logs_all, panel, 40 if quick else 0)
    bench.home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TQDM_DISABLE", "1")
    t0 = time.monotonic()
    prep = await prepare(bench, panel, logs)
    say(f"imported {prep['stored']} messages of {prep['authors']} authors; panel {panel}")
    opening = await _openings(bench, panel[0], n_open)
    pairs = opening["pairs"]
    banned = set(opening["heldout"])
    judge = classifier(logs, panel, banned, seed=0)
    chance = 1.0 / len(judge.authors)
    result: dict[str, Any] = {
        "data": {
            "source": "Ubuntu IRC #ubuntu (irc-disentanglement selection, CC-BY-4.0; logs public domain)",
            "logs": len(logs),
            "authors": prep["authors"],
            "messages": prep["stored"],
        },
        "member": panel[0],
        "panel": panel,
        "panel_size": len(judge.authors),
        "chance": round(chance, 3),
        "classifier_accuracy": round(judge.accuracy, 3),
        "train_examples": opening["train_examples"],
        "openings": len(pairs),
        "heldout_replies": len(banned),
        "steps_scale": scale,
        "temperature": 0.7,
        "max_tokens": max_tokens,
        "default_style": DEFAULT_STYLE,
        "ceiling": score(judge, panel[0], [p["reply"] for p in pairs]),
        "ceiling_all_heldout": round(judge.share(sorted(banned), author_id(panel[0])), 3),
        "systems": {},
    }
    for mode in ("base", "retrieval"):
        if mode in names or not getattr(args, "configs", ""):
            texts = await _replies(bench, panel[0], mode, None, pairs, banned, max_tokens)
            result["systems"][mode] = {**score(judge, panel[0], texts), "samples": texts[:4]}
            say(f"{mode}: {json.dumps(result['systems'][mode])}")
    trained_folders: dict[str, tuple[str, str, int, str]] = {}
    for name in names:
        if name not in CONFIGS:
            continue
        cfg = CONFIGS[name]
        trained = await _train(bench, panel[0], _scaled(bench, cfg, scale))
        m = trained["metrics"]
        base_ppl, ppl = m.get("ppl_base"), m.get("ppl_adapter")
        style = str(trained["config"]["prompt_style"] or DEFAULT_STYLE)
        entry: dict[str, Any] = {
            "style": style,
            "config": trained["config"],
            "training": trained["training"],
            "train_wall_s": trained["wall_s"],
            "train_s": trained["train_s"],
            "ppl_base": base_ppl,
            "ppl_adapter": ppl,
            "ppl_change": (
                round((ppl - base_ppl) / base_ppl, 3)
                if isinstance(base_ppl, (int, float))
                and isinstance(ppl, (int, float))
                and base_ppl
                and math.isfinite(ppl)
                else None
            ),
        }
        # Served as the product serves it: the engine reads the adapter's trained prompt style from its meta.json.
        for mode in ("adapter", "adapter+retrieval"):
            texts = await _replies(bench, panel[0], mode, trained["adapter"], pairs, banned, max_tokens)
            entry[mode] = {**score(judge, panel[0], texts), "samples": texts[:4]}
        result["systems"][name] = entry
        trained_folders[name] = (
            trained["folder"],
            style,
            int(trained["config"]["max_steps"] or 0),
            trained["base_model"],
        )
        say(
            f"{name}: adapter {entry['adapter']['share']}, hybrid {entry['adapter+retrieval']['share']}, "
            f"ppl {base_ppl} -> {ppl}, {trained['wall_s']} s"
        )
        # The whole entry, so a long run's figures are not lost if a later configuration fails.
        say(
            f"{name}: "
            + json.dumps(
                {
                    k: ({kk: vv for kk, vv in v.items() if kk != "samples"} if isinstance(v, dict) else v)
                    for k, v in entry.items()
                }
            )
        )
    if trained_folders and not getattr(args, "no_own_vs_other", False) and len(panel) > 1:
        result["own_vs_other"] = await _own_vs_other(bench, panel, trained_folders)
        say(f"own vs other adapter on {panel[0]}'s held-out replies: {result['own_vs_other']}")
    result["comparisons"] = comparisons(result["systems"])
    result["elapsed_s"] = round(time.monotonic() - t0, 1)
    return result
