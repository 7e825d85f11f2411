"""The one settings object: TOML + environment, secrets from the environment only."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import ConfigError
from core.settings import Settings


def test_defaults_live_under_doppel_home(tmp_path: Path) -> None:
    s = Settings.load(env={"DOPPEL_HOME": str(tmp_path)})
    assert s.home == tmp_path.resolve()
    assert s.db_path == tmp_path.resolve() / "doppel.sqlite3"
    assert s.training.jobs_per_device == 1


def test_toml_then_environment_override(tmp_path: Path) -> None:
    (tmp_path / "doppel.toml").write_text(
        "[training]\nmax_steps = 50\nlora_r = 4\n[inference]\nqueue_size = 9\n"
    )
    env = {
        "DOPPEL_HOME": str(tmp_path),
        "DOPPEL_TRAINING__MAX_STEPS": "75",
        "DOPPEL_TRAINING__DEVICES": "cuda:0,cuda:1",
    }
    s = Settings.load(env=env)
    assert s.training.max_steps == 75
    assert s.training.lora_r == 4
    assert s.training.devices == ("cuda:0", "cuda:1")
    assert s.inference.queue_size == 9


def test_secrets_only_from_environment(tmp_path: Path) -> None:
    (tmp_path / "doppel.toml").write_text('discord_token = "abc"\n')
    with pytest.raises(ConfigError, match="DISCORD_TOKEN"):
        Settings.load(env={"DOPPEL_HOME": str(tmp_path)})
    (tmp_path / "doppel.toml").write_text("")
    s = Settings.load(env={"DOPPEL_HOME": str(tmp_path), "DISCORD_TOKEN": "secret-token"})
    assert s.discord_token == "secret-token"
    assert "secret-token" not in repr(s)


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        ("[training]\nmax_step = 5\n", {}, "unknown setting"),
        ("[nope]\na = 1\n", {}, "unknown settings section"),
        ("[training\n", {}, "invalid TOML"),
        ("", {"DOPPEL_TRAINING__MAX_STEPS": "many"}, "expected int"),
    ],
)
def test_bad_settings_are_one_clear_error(
    tmp_path: Path, toml: str, env: dict[str, str], message: str
) -> None:
    (tmp_path / "doppel.toml").write_text(toml)
    with pytest.raises(ConfigError, match=message):
        Settings.load(env={"DOPPEL_HOME": str(tmp_path), **env})


def test_settings_are_frozen(tmp_path: Path) -> None:
    s = Settings.load(env={"DOPPEL_HOME": str(tmp_path)})
    with pytest.raises(AttributeError):
        s.training.max_steps = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        ('[bot]\npersona_mode = "hybrid"\n', {}, "[bot] persona_mode must be one of auto, base, adapter"),
        ("", {"DOPPEL_BOT__PERSONA_MODE": "Auto"}, "[bot] persona_mode must be one of auto"),
        ('[inference]\nbackend = "remote"\n', {}, "[inference] backend must be one of process, server"),
        ("", {"DOPPEL_INFERENCE__SERVER_FLAVOUR": "ollama"}, "server_flavour must be one of llama.cpp, vllm"),
        ('[training]\ntrainer_priority = "high"\n', {}, "trainer_priority must be one of idle, low, normal"),
        ('[join]\ndefault_level = "chatty"\n', {}, "[join] default_level must be one of quiet, normal"),
    ],
)
def test_a_choice_outside_its_declared_list_stops_the_start_in_one_line(
    tmp_path: Path, toml: str, env: dict[str, str], message: str
) -> None:
    import os
    import subprocess
    import sys

    (tmp_path / "doppel.toml").write_text(toml)
    with pytest.raises(ConfigError) as raised:
        Settings.load(env={"DOPPEL_HOME": str(tmp_path), **env})
    assert message in str(raised.value)
    # The CLI (and so `doppel run`, the bot) refuses to start: one line on stderr, exit 2, no traceback.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DOPPEL_")}
    done = subprocess.run(
        [sys.executable, "-m", "doppel", "personas"],
        env={**clean, "DOPPEL_HOME": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
