"""The trainer child stops when its supervisor dies: a parent-death signal on Linux, a watcher thread elsewhere.

Without this, a supervisor killed by SIGTERM or SIGKILL leaves the trainer under init, training on while its job
already reads `interrupted`, and a `--resume` could race it on the same folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from jobspec.jobdata import SUPERVISOR_PID_ENV

PR_SET_PDEATHSIG = 1
POLL_S = 1.0


def _silence_pipes() -> None:
    # Nobody reads our stdout/stderr any more: writing to them would raise EPIPE mid-checkpoint.
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)


def watch_supervisor(on_orphaned: Callable[[], None]) -> bool:
    """Call `on_orphaned` once the supervisor that started this process is gone; False when none is named."""
    raw = os.environ.get(SUPERVISOR_PID_ENV, "")
    if not raw.isdigit():
        return False
    supervisor = int(raw)
    fired = threading.Event()

    def orphaned() -> None:
        if not fired.is_set():
            fired.set()
            _silence_pipes()
            on_orphaned()

    def on_signal(signum: int, frame: Any) -> None:
        orphaned()

    if sys.platform.startswith("linux"):
        # SIGUSR1, not SIGTERM: a supervisor's death is told apart from a cancel, and its pipes are silenced first.
        signal.signal(signal.SIGUSR1, on_signal)
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGUSR1), 0, 0, 0)

    def poll() -> None:
        # Also covers a supervisor that died before prctl ran, and platforms without a parent-death signal.
        while not fired.is_set():
            if os.getppid() != supervisor:
                orphaned()
                return
            fired.wait(POLL_S)

    threading.Thread(target=poll, name="doppel-lifeline", daemon=True).start()
    return True
