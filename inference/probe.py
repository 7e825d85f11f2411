"""`python -m inference.probe`: load the base model and an adapter, generate a few tokens, print one JSON line.

Run by `doppel doctor` in a subprocess with the configured thread count, so a llama.cpp build that crashes on this
CPU (SIGILL from instructions the machine lacks) shows up as a failed check with its reason, not a dead bot.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from inference.synthetic import write_random_lora

PROMPT = "Hello! How are you today?"


def probe(base: Path, adapter: Path | None, threads: int, tokens: int) -> dict[str, object]:
    """Generate `tokens` greedy tokens through the engine's own runtime, with the adapter applied."""
    from inference.adapters import AdapterCache
    from inference.requests import GenParams
    from inference.runtime import BaseModel, KVStates, Session

    model = BaseModel(base)
    cache = AdapterCache(model.model.model, max_count=2, budget_bytes=1 << 30)
    session = Session(model, cache, KVStates(0), n_ctx=512, n_threads=threads)
    key = ((str(adapter), adapter.stat().st_mtime_ns, 1.0),) if adapter else ()
    pieces: list[str] = []
    prompt = model.tokenize(model.format.prompt([{"role": "user", "content": PROMPT}]))
    params = GenParams(max_tokens=tokens, temperature=0.0, stop=())
    started = time.perf_counter()

    def keep(text: str) -> bool:
        pieces.append(text)
        return True

    stats = session.generate(key, prompt, params, keep, lambda: False)
    seconds = time.perf_counter() - started
    session.close()
    model.close()
    return {
        "ok": True,
        "generated": stats.generated,
        "text": "".join(pieces),
        "threads": threads,
        "adapter": str(adapter) if adapter else None,
        "seconds": round(seconds, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inference.probe", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="base model GGUF")
    parser.add_argument(
        "--adapter", type=Path, help="LoRA GGUF (default: a small random one built for the base)"
    )
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads (use the configured count)")
    parser.add_argument("--tokens", type=int, default=8, help="tokens to generate")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="doppel-probe-") as tmp:
        adapter = args.adapter or write_random_lora(args.model, Path(tmp) / "probe-adapter.gguf", seed=0)
        result = probe(args.model, adapter, max(1, args.threads), args.tokens)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
