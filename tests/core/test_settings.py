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
