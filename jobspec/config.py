"""`TrainConfig`: everything one training job needs, serialised as JOB_DIR/config.json."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.chatformat import DEFAULT_STYLE, STYLES
from core.hostshare import PRIORITIES
from core.settings import Settings
from jobspec.errors import JobConfigError

MODES = ("sft", "sft+kto", "sft+dpo")
BATCHING = ("padding_free", "length_grouped", "random")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Recipes a user picks by the time they will spend. Steps follow the member's data (`epochs` over the training
# examples, at least `min_steps`, at most `max_steps_cap`), so a member with 300 replies is not trained as long as
# one with 30,000; `token_budget` caps the tokens trained, so long messages (real chat's examples are twice the
# demo's) do not double the time either. Chosen on `doppel bench fidelity` (BENCHMARKS.md).
# Times: training costs per token: ~200 tokens/s for SmolLM2-135M on 2 CPU cores (measured, `bench train` and
# `bench fidelity`); GPU: an estimate for a 0.5-3B QLoRA base (not measured on this project's machines).
# Learning rate 6e-4 for quick and good: under their budgets the adapter sees under one epoch and underfits; twice
# the reference's 3e-4 lowered held-out perplexity further (-53% vs -50%) at the same attribution or better (run F).
# 8 examples a step in one micro-batch: ~5% less CPU per token than 4 x 2 accumulated (measured, BENCHMARKS.md).
# Where the device has less free memory than the job's estimate, pre-flight halves the micro-batch and doubles the
# accumulation (`jobs.preflight.fit_micro_batch`): the same update, as the loss is normalised over the step.
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {
        "epochs": 1.0,
        "max_steps_cap": 60,
        "token_budget": 80_000,
        "micro_batch_size": 8,
        "grad_accum": 1,
        "learning_rate": 6e-4,
        "lora_r": 16,
        "lora_alpha": 32,
    },
    "good": {
        "epochs": 1.0,
        "max_steps_cap": 120,
        "token_budget": 160_000,
        "micro_batch_size": 8,
        "grad_accum": 1,
        "learning_rate": 6e-4,
        "lora_r": 16,
        "lora_alpha": 32,
    },
    "best": {
        "epochs": 2.0,
        "max_steps_cap": 600,
        "token_budget": 720_000,
        "micro_batch_size": 8,
        "grad_accum": 1,
        "learning_rate": 2e-4,
        "lora_r": 32,
        "lora_alpha": 64,
    },
}
# The budget at ~210 tokens/s (`doppel bench fidelity` run D on real chat, 2 cores of an AMD EPYC: 160k tokens in
# 761 s), plus a minute of loading and evaluation; a member with little data finishes sooner. No GPU was available
# to measure: the GPU figures are estimates.
PRESET_TIMES = {
    "quick": "<=60 steps of 8, <=80k tokens: ~7 min on 2 CPU cores (135M), ~1 min on a GPU (est.)",
    "good": "<=120 steps of 8, <=160k tokens: ~13 min on 2 CPU cores (135M), ~2 min on a GPU (est.)",
    "best": "2 epochs, <=600 steps of 8, <=720k tokens: ~1 h on 2 CPU cores (135M), ~8 min on a GPU (est.)",
}
DEFAULT_PRESET = "good"


def _f(default: Any, help: str, choices: tuple[str, ...] = ()) -> Any:
    # Help and choices live in the field's metadata (as TRL does): the CLI, the bot and the child derive from it.
    metadata = {"help": help, "choices": choices}
    if isinstance(default, (list, tuple, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """One persona training job: model, LoRA, schedule, evaluation and export settings."""

    member_id: str = _f(
        "", "Discord id of the member whose persona is trained ('' for a multi-persona adapter)."
    )
    persona_name: str = _f("", "Display name used in the system prompt and reports.")
    mode: str = _f("sft", "Training recipe: SFT alone, or SFT then KTO / DPO on reactions and 👍/👎.", MODES)
    base_model: str = _f(
        "", "Base model to train on: a GGUF file (dequantized by transformers) or a HF model folder."
    )
    base_name: str = _f("", "Registry name of the base model, recorded in meta.json.")
    base_gguf: str = _f(
        "",
        "GGUF file llama.cpp serves the adapter on; used to validate the export. Empty: base_model if it is a GGUF.",
    )
    base_cache_dir: str = _f(
        "", "Folder caching GGUF bases converted to float HF folders (empty: convert on every run)."
    )
    chat_template: str = _f(
        "",
        "Chat template chosen at add-base (chatml, plain or Jinja text); empty: the GGUF's own, else the default.",
    )
    chat_template_source: str = _f(
        "", "Where chat_template came from (chosen:NAME, file:PATH), recorded in meta.json."
    )
    preset: str = _f(DEFAULT_PRESET, "Recipe preset the defaults came from (PRESETS).", tuple(PRESETS))
    max_steps: int = _f(
        0, "Optimizer steps for SFT (0: derive from the data: epochs, min_steps, max_steps_cap)."
    )
    epochs: float = _f(1.0, "Epochs over the training examples when max_steps is 0.")
    max_steps_cap: int = _f(150, "Most steps derived from the data when max_steps is 0 (0: no cap).")
    min_steps: int = _f(20, "Fewest steps derived from the data when max_steps is 0.")
    token_budget: int = _f(
        0,
        "Most tokens trained when steps derive from the data (0: no budget): bounds a preset's time whatever "
        "the length of the member's messages.",
    )
    micro_batch_size: int = _f(4, "Examples per forward pass; halved automatically on CUDA out-of-memory.")
    grad_accum: int = _f(1, "Micro-batches per optimizer step; doubled when the micro-batch is halved.")
    learning_rate: float = _f(6e-4, "Peak learning rate of the LoRA weights.")
    lr_scheduler: str = _f("cosine", "transformers learning-rate schedule name.")
    warmup_steps: int = _f(0, "Linear warm-up steps.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA alpha (scale = alpha / r).")
    lora_dropout: float = _f(0.05, "Dropout on the LoRA input.")
    target_modules: list[str] = _f(list(DEFAULT_TARGETS), "Linear layers that get a LoRA adapter.")
    max_length: int = _f(512, "Longest training sequence in tokens; older context turns are dropped to fit.")
    batching: str = _f(
        "padding_free",
        "How micro-batches are formed: 'padding_free' (examples concatenated, "
        "attention kept apart by position ids), 'length_grouped' (shuffled length buckets) or 'random'.",
        BATCHING,
    )
    example_shots: int = _f(
        0,
        "Train the way the hybrid persona is served: show N of the member's other replies as their earlier turns "
        "in each training prompt (0: off; 4 matches [inference] retrieval_k).",
    )
    prompt_style: str = _f(
        DEFAULT_STYLE,
        "How each example's prompt is framed: 'persona' (a system prompt naming the member and channel), 'plain' "
        "(a short nameless one, no speaker names) or 'plain+names' (short, other speakers named). Recorded in the "
        "adapter's meta.json; the engine serves the adapter with the same.",
        tuple(STYLES),
    )
    seed: int = _f(1234, "Seed for LoRA init, data order and sampling.")
    save_steps: int = _f(50, "Write a checkpoint every N steps (resume continues from the last one).")
    save_total_limit: int = _f(2, "Checkpoints kept on disk.")
    logging_steps: int = _f(1, "Emit a progress event every N steps.")
    quantize_4bit: bool = _f(True, "On CUDA: load the base in 4-bit NF4 (QLoRA). Ignored on CPU.")
    gradient_checkpointing: bool = _f(
        True,
        "Recompute each block's activations in the backward pass (SFT: CPU and CUDA): less memory, more compute.",
    )
    threads: int = _f(0, "CPU threads for torch at most (0: the usable cores).")
    priority: str = _f(
        "idle",
        "The trainer's scheduling class: 'idle' yields the CPU at once to persona replies and anything else, "
        "'low' is nice 19, 'normal' leaves it as started.",
        PRIORITIES,
    )
    adapt_threads: bool = _f(
        True,
        "Before each step, take only the cores nobody else uses now (a persona generating, another job).",
    )
    yield_to_serving: bool = _f(
        True, "Sleep between two layers while a persona reply is being made on this host (see share_dir)."
    )
    share_dir: str = _f("", "The host's share folder, where engines mark that they generate ('': none).")
    tensorboard: bool = _f(False, "Also log the training scalars to JOB_DIR/tensorboard.")
    eval_batch_size: int = _f(4, "Batch size for held-out perplexity.")
    eval_max_examples: int = _f(64, "Held-out examples scored for perplexity (0: all).")
    eval_samples: int = _f(4, "Held-out contexts generated for the style metrics.")
    eval_max_new_tokens: int = _f(48, "Tokens generated per style sample.")
    eval_fidelity: bool = _f(
        True, "Compute the style/attribution fidelity report (loads the embedding model)."
    )
    pref_steps: int = _f(50, "Optimizer steps of the KTO/DPO stage.")
    pref_beta: float = _f(0.1, "KTO/DPO beta (strength of the pull towards the reference).")
    pref_learning_rate: float = _f(5e-5, "Learning rate of the preference stage.")
    gguf_dtype: str = _f("f32", "Float type of adapter.gguf tensors: 'f32' or 'f16'.")
    simulate_oom_at_step: int = _f(
        0, "Testing hook: raise a CUDA out-of-memory error once at this step (0: off)."
    )
    simulate_eval_failure: str = _f(
        "", "Testing hook: 'error' raises, 'kill' SIGKILLs the trainer as evaluation starts."
    )
    simulate_export_failure: bool = _f(
        False, "Testing hook: the GGUF conversion fails after training (the adapter is kept)."
    )

    def validate(self) -> TrainConfig:
        """Raise `JobConfigError` with a one-line reason when a value cannot work."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise JobConfigError(
                    f"{f.name} must be one of {', '.join(choices)}, got {getattr(self, f.name)!r}"
                )
        if self.max_steps_cap < 0 or self.min_steps < 0:
            raise JobConfigError("max_steps_cap and min_steps must not be negative")
        if not self.base_model:
            raise JobConfigError("base_model is empty: name a GGUF file or a HF model folder")
        if self.max_steps < 0 or (self.max_steps == 0 and self.epochs <= 0):
            raise JobConfigError("set max_steps > 0 or epochs > 0")
        for name in ("micro_batch_size", "grad_accum", "lora_r", "max_length", "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise JobConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise JobConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.learning_rate <= 0:
            raise JobConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if not self.target_modules:
            raise JobConfigError("target_modules is empty")
        if self.gguf_dtype not in ("f32", "f16"):
            raise JobConfigError(f"gguf_dtype must be 'f32' or 'f16', got {self.gguf_dtype!r}")
        return self

    @classmethod
    def choices(cls, name: str) -> tuple[str, ...]:
        """The allowed values of a field, as declared once in its metadata (empty: any value of its type)."""
        return tuple(next(f for f in dataclasses.fields(cls) if f.name == name).metadata.get("choices", ()))

    @classmethod
    def help_of(cls, name: str) -> str:
        """A field's help text, for the CLI and the bot."""
        return str(next(f for f in dataclasses.fields(cls) if f.name == name).metadata.get("help", ""))

    def steps_for(self, n_train: int, tokens_per_example: float = 0.0) -> int:
        """Optimizer steps for `n_train` training examples: `max_steps`, or derived from the data when it is 0.

        Derived: `epochs` over the examples, at most `max_steps_cap`, and at most `token_budget` tokens when the
        examples' mean length is known (the trainer knows it once they are tokenized); at least `min_steps`.
        """
        if self.max_steps > 0:
            return self.max_steps
        per_step = self.micro_batch_size * self.grad_accum
        steps = math.ceil(self.epochs * max(0, n_train) / per_step)
        if self.max_steps_cap:
            steps = min(steps, self.max_steps_cap)
        if self.token_budget and tokens_per_example > 0:
            steps = min(steps, int(self.token_budget // (tokens_per_example * per_step)))
        return max(1, self.min_steps, steps) if n_train > 0 else max(1, self.min_steps)

    def for_rows(self, rows: Sequence[Mapping[str, Any]]) -> TrainConfig:
        """This config with its steps resolved for the fitted training rows (their `n_tokens` feed the budget)."""
        lengths = [int(r["n_tokens"]) for r in rows if r.get("n_tokens")]
        mean = sum(lengths) / len(lengths) if lengths else 0.0
        return dataclasses.replace(self, max_steps=self.steps_for(len(rows), mean))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return dataclasses.asdict(self)

    def to_json(self, path: Path) -> None:
        """Write as JSON (the job folder's config.json)."""
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a dict, rejecting unknown keys and wrongly typed values with a one-line error."""
        if not isinstance(data, dict):
            raise JobConfigError("config must be a JSON object")
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise JobConfigError(f"unknown config field(s): {', '.join(unknown)}")
        values: dict[str, Any] = {}
        for key, value in data.items():
            values[key] = _coerce(hints[key], value, key)
        return cls(**values).validate()

    @classmethod
    def from_json(cls, path: Path) -> TrainConfig:
        """Read JOB_DIR/config.json."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise JobConfigError(f"{path}: not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise JobConfigError(f"{path}: invalid JSON: {exc}") from None
        # max_steps 0 stays 0 here: the recipe resolves it from the tokenized data (`for_rows`).
        return cls.from_dict(data)

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> TrainConfig:
        """The preset's recipe, then `[training]` values an operator changed, then `overrides` (member_id, max_steps...)."""
        t = settings.training
        preset = str(overrides.pop("preset", None) or t.preset or DEFAULT_PRESET)
        if preset not in PRESETS:
            raise JobConfigError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        base: dict[str, Any] = {
            **PRESETS[preset],
            "preset": preset,
            "base_name": settings.model.base_name,
            "base_cache_dir": str(settings.cache_dir / "base-models"),
            "priority": t.trainer_priority,
            "adapt_threads": t.adapt_threads,
            "yield_to_serving": t.yield_to_serving,
            "share_dir": str(settings.share_dir),
        }
        # 0 leaves the preset's value; any other value is the operator's and wins (even one equal to a preset's:
        # `lora_r = 16` must hold under `best`, whose rank is 32).
        for key in ("max_steps", "epochs", "lora_r", "lora_alpha", "learning_rate"):
            if value := getattr(t, key):
                base[key] = value
        if t.lora_dropout != type(t)().lora_dropout:
            base["lora_dropout"] = t.lora_dropout
        if t.prompt_style:
            base["prompt_style"] = t.prompt_style
        if "base_model" not in overrides:
            base["base_model"] = str(settings.base_gguf_path())
        base.update(overrides)
        return cls.from_dict(base)

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> help text (for docs and `--help`-style listings)."""
        return {f.name: str(f.metadata.get("help", "")) for f in dataclasses.fields(cls)}


def _coerce(kind: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(kind)
    ok: bool
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is str:
        ok = isinstance(value, str)
    elif origin is list:
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        value = list(value) if ok else value
    else:
        ok = True
    if not ok:
        raise JobConfigError(
            f"config field {name}: expected {getattr(kind, '__name__', kind)}, got {value!r}"
        )
    return value
