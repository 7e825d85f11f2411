"""A real llama.cpp `llama-server` for the server-backend tests: built once from the llama-cpp-python sdist
(doppel/llamaserver.py, cached under ~/.cache/doppel/llama-server/), started on a free port with given adapters."""

from __future__ import annotations

from pathlib import Path

import pytest

from doppel.llamaserver import free_port, running_server

__all__ = ["free_port", "running_server", "server_binary"]


def server_binary() -> Path:
    """The cached llama-server for this CPU, built now when absent (about 8 minutes on 2 cores), or a skip."""
    from doppel.llamaserver import ServerBuildError, build

    try:
        return build()
    except ServerBuildError as exc:
        pytest.skip(f"llama-server is not buildable here: {exc}")
