"""One module per `doppel` subcommand."""

from __future__ import annotations
