"""Starting and stopping the bot: open the services, connect, and one bounded shutdown path for SIGTERM and SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import TYPE_CHECKING, Any

import discord

from bot.client import DoppelBot
from bot.errors import BotError
from bot.services import Services
from core.settings import Settings

if TYPE_CHECKING:
    from consent.erasure import ErasureParts

log = logging.getLogger("doppel.bot")
DRAIN_S = 5.0  # how long in-flight command and button handlers may still finish once shutdown begins
CLOSE_MARGIN_S = 10.0  # beyond the trainer's checkpoint grace: gateway close, engine and store
# Tasks discord.py starts per event and interaction: the work in flight when a shutdown begins.
HANDLER_TASKS = ("CommandTree-invoker", "discord-ui-", "discord.py: on_")


class LoginRefused(BotError):
    """Discord rejected the token or the intents."""


class StopSignal:
    """SIGTERM (systemd, Docker) and SIGINT (Ctrl-C) both end up here: one event, the first signal's name."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.name: str | None = None
        self._installed: list[signal.Signals] = []

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Route both signals to `trip` (on platforms without loop signal handlers, Ctrl-C keeps its default)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.trip, sig)
                self._installed.append(sig)

    def uninstall(self, loop: asyncio.AbstractEventLoop) -> None:
        """Give the signals back to their defaults once shutdown is over."""
        for sig in self._installed:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
        self._installed.clear()

    def trip(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Ask for shutdown; a second signal only says so (the grace period already bounds the wait)."""
        if self.event.is_set():
            log.warning("%s again: already shutting down", sig.name)
            return
        self.name = sig.name
        log.info("%s received: shutting down", sig.name)
        self.event.set()


def grace_s(settings: Settings) -> float:
    """The whole shutdown's bound: drain handlers, let the trainer checkpoint (its own grace), close the rest."""
    return DRAIN_S + float(settings.training.cancel_grace_s) + CLOSE_MARGIN_S


async def serve(
    settings: Settings,
    token: str,
    *,
    erasure: ErasureParts,
    with_engine: bool = True,
    stop: StopSignal | None = None,
) -> None:
    """Run the bot until SIGTERM/SIGINT (or `stop`), then shut down within `grace_s`; login errors are one line."""
    loop = asyncio.get_running_loop()
    stop = stop or StopSignal()
    stop.install(loop)  # before the services open: a signal during a slow start still takes the graceful path
    try:
        services = await Services.open(settings, erasure, with_engine=with_engine)
        bot = DoppelBot(services)
        runner = asyncio.create_task(bot.start(token), name="doppel-gateway")
        try:
            await _run_until_stopped(runner, stop)
        finally:
            await shutdown(bot, services, grace_s(settings))
            if not runner.done():  # closing the gateway ends it; a login still under way is given up
                runner.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(runner, timeout=1.0)
    finally:
        stop.uninstall(loop)


async def _run_until_stopped(runner: asyncio.Task[None], stop: StopSignal) -> None:
    waiter = asyncio.create_task(stop.event.wait(), name="doppel-stop")
    try:
        await asyncio.wait({runner, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if not runner.done():
        return  # stopped by a signal: `shutdown` closes the gateway, which ends `runner`
    try:
        runner.result()
    except discord.LoginFailure:
        raise LoginRefused(
            "Discord rejected DISCORD_TOKEN: copy the bot token again from the Developer Portal"
        ) from None
    except discord.PrivilegedIntentsRequired:
        raise LoginRefused(
            "enable the Message Content intent for the bot in the Developer Portal (Bot → Privileged Gateway Intents)"
        ) from None


async def shutdown(bot: DoppelBot, services: Services, grace: float) -> None:
    """Stop taking work, let handlers in flight finish, close the gateway, stop training with a checkpoint, flush."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace

    def left() -> float:
        return max(0.1, deadline - loop.time())

    bot.draining = True  # new commands and presses are answered "shutting down" (ErrorTree / catch-all)
    log.info("shutdown: finishing work in flight (at most %.0f s in all)", grace)
    await _drain(min(DRAIN_S, left()))
    try:
        await asyncio.wait_for(bot.close(), timeout=left())  # a close frame to the gateway, then HTTP
    except Exception as exc:
        log.warning("shutdown: the gateway did not close cleanly: %s", exc)
    bot.uploads.clear()
    await bot.persona.stop_watchers()
    try:
        # Supervisor.close asks a running trainer to checkpoint and stop (its job becomes `interrupted`,
        # resumable), killing it after its grace; then the engine and the store close.
        await asyncio.wait_for(services.close(), timeout=left())
    except TimeoutError:
        log.error("shutdown: services did not close within %.0f s; exiting anyway", grace)
    log.info("shutdown complete")


async def _drain(timeout: float) -> None:
    """Wait (bounded) for the handlers discord.py started before the shutdown began."""
    current = asyncio.current_task()
    busy = [t for t in asyncio.all_tasks() if t is not current and t.get_name().startswith(HANDLER_TASKS)]
    if busy:
        _, pending = await asyncio.wait(busy, timeout=timeout)
        if pending:
            log.warning("shutdown: %d handler(s) still running after %.0f s", len(pending), timeout)


def run_forever(settings: Settings, token: str, **options: Any) -> None:
    """`doppel run`'s entry: serve on a fresh event loop until a signal ends it."""
    asyncio.run(serve(settings, token, **options))
