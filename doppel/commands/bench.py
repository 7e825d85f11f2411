"""`doppel bench NAME`: benchmarks with JSON results; they live in the application shell (doppel/bench*.py), above what they measure."""

from __future__ import annotations

import argparse
import importlib
import json
from typing import Any

from core.errors import UserFacingError
from core.settings import Settings

# name -> "module:function"; each function takes (settings, args) and returns a JSON-able dict.
BENCHES = {
    "ingest": "doppel.benchingest:ingest",
    "dataset": "doppel.benchtrain:dataset",
    "train": "doppel.benchtrain:train",
    "inference": "doppel.benchinference:inference",
    "fidelity": "doppel.benchmembers:fidelity",
    "scale": "doppel.benchscale:scale",
    "colocated": "doppel.benchcolocated:colocated",
    "join": "doppel.benchjoin:join",
    "memory": "doppel.benchmemory:memory",
}


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="run a benchmark (ingest, dataset, train, inference, join, memory, all)")
    p.add_argument("name", choices=[*BENCHES, "all"])
    p.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    p.add_argument("-o", "--output", help="also write the JSON result to this file")
    p.add_argument(
        "--sizes",
        default="",
        help="scale: community sizes MEMBERSxMESSAGES[,...] (default 200x40000,1000x200000)",
    )
    # fidelity only: which configurations, how many held-out openings, a factor on every configuration's steps.
    p.add_argument("--configs", default="", help="fidelity: comma-separated configurations (default: all)")
    p.add_argument("--openings", type=int, default=0, help="fidelity: held-out openings answered per system")
    p.add_argument(
        "--steps-scale", type=float, default=0.0, help="fidelity: multiply every configuration's steps"
    )
    p.add_argument(
        "--member", default=None, help="fidelity: the member (an IRC nick; default the most active)"
    )
    p.add_argument(
        "--members",
        type=int,
        default=0,
        help="fidelity: the honest run over this many members, each against its most similar writers, with "
        "detectability and 95%% intervals (doppel/benchdetect.py; 5 and --openings 100 for the record)",
    )
    p.add_argument(
        "--keep-home",
        action="store_true",
        help="fidelity: keep the benchmark's own DOPPEL_HOME (store, adapters; ~0.5 GB) for inspection",
    )
    p.add_argument(
        "--no-own-vs-other",
        action="store_true",
        help="fidelity: skip training another member's adapter to compare perplexities",
    )
    p.add_argument(
        "--split",
        default="heldout",
        choices=("heldout", "validation"),
        help="join: score the held-out windows (default) or the validation windows used to tune the method",
    )
    p.add_argument(
        "--cases",
        default="",
        help="memory: comma-separated cases (smollm2-135m, qwen2.5-0.5b, qwen2.5-1.5b; default all)",
    )
    return p


def run(args: argparse.Namespace, settings: Settings) -> Any:
    # fidelity, scale and colocated train personas (minutes to tens of minutes on a CPU): by name, not in `all`.
    long = ("fidelity", "scale", "colocated", "memory")
    names = [n for n in BENCHES if n not in long] if args.name == "all" else [args.name]
    results: dict[str, Any] = {}
    for name in names:
        module_name, func = BENCHES[name].split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise UserFacingError(f"benchmark {name} is unavailable: {exc}") from None
        results[name] = getattr(module, func)(settings, args)
        if not args.json:
            print(f"{name}: {json.dumps(results[name], default=str)}")
    result = results[names[0]] if len(names) == 1 else results
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2, default=str)
    return result
