"""`doppel serve`: a managed llama.cpp persona server for one base (inference/persona_server.py)."""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path
from typing import Any

from core.errors import UserFacingError
from core.settings import Settings


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve",
        help="serve the active personas of a base from llama.cpp's llama-server, restarted as personas change",
    )
    p.add_argument("--base", default=None, help="the base model's name (default: [model] base_name)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (another needs DOPPEL_SERVER_API_KEY)"
    )
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--slots", type=int, default=2, help="replies generated in parallel (default 2)")
    p.add_argument("--n-ctx", type=int, default=0, help="context per slot (default: [inference] n_ctx)")
    p.add_argument(
        "--threads", type=int, default=0, help="llama.cpp threads (default: [inference] n_threads)"
    )
    p.add_argument("--log", type=Path, default=None, help="llama-server's log (default: DOPPEL_HOME/logs)")
    return p


def _base_gguf(settings: Settings, name: str) -> Path:
    from models.catalog import Catalog

    if name == settings.model.base_name:
        return settings.base_gguf_path().resolve()
    for model in Catalog(settings).bases():
        if model.name == name:
            return Path(model.path).resolve()
    raise UserFacingError(f"no base model named {name!r} (see `doppel personas bases`)")


def run(args: argparse.Namespace, settings: Settings) -> Any:
    from inference.persona_server import check_binding

    if not 0 < args.port < 65536:
        raise UserFacingError(f"--port must be 1-65535, got {args.port}")
    if args.slots < 1:
        raise UserFacingError(f"--slots must be at least 1, got {args.slots}")
    check_binding(args.host, settings.server_api_key)
    name = args.base or settings.model.base_name
    base = _base_gguf(settings, name)
    return asyncio.run(_serve(args, settings, name, base))


async def _serve(args: argparse.Namespace, settings: Settings, name: str, base: Path) -> dict[str, Any]:
    from data.store import Store
    from doppel.llamaserver import ServerBuildError, build, cached_binary
    from inference.persona_server import LlamaServerProcess, PersonaServer, ServeOptions
    from models.registry import Registry

    if cached_binary() is None:
        print(
            "doppel serve: building llama-server for this CPU (once, about 8 minutes on 2 cores)", flush=True
        )
    try:
        binary = await asyncio.to_thread(build)
    except ServerBuildError as exc:
        raise UserFacingError(f"llama-server: {exc}") from None
    opts = ServeOptions(
        binary=binary,
        base=base,
        host=args.host,
        port=args.port,
        api_key=settings.server_api_key,
        n_ctx=args.n_ctx or settings.inference.n_ctx,
        slots=args.slots,
        threads=args.threads or settings.inference.n_threads,
        log=args.log or settings.logs_dir / f"llama-server-{args.port}.log",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # A script's `&` starts us with SIGINT ignored; an explicit handler takes it back.
        loop.add_signal_handler(sig, stop.set)
    process = LlamaServerProcess(opts)
    async with Store.open(settings) as store:
        server = PersonaServer(store, Registry(store, settings), name, process)
        task = asyncio.create_task(server.run(stop))
        ready = asyncio.create_task(server.ready.wait())
        await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if not task.done():
            print(
                f"doppel serve: {name} at {process.url} with {len(process.loras)} persona adapter(s); "
                f'set [inference] backend = "server", server_url = "{process.url}"',
                flush=True,
            )
        await task
    return {"base": name, "url": process.url, "restarts": process.restarts}
