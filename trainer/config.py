"""`TrainConfig`: everything one training job needs, serialised as JOB_DIR/config.json."""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.errors import JobConfigError

MODES = ("sft", "sft+kto", "sft+dpo")
BATCHING = ("padding_free", "length_grouped", "random")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _f(default: Any, help: str) -> Any:
    if isinstance(default, (list, tuple, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """One persona training job: model, LoRA, schedule, evaluation and export settings."""

    member_id: str = _f("", "Discord id of the member whose persona is trained ('' for a multi-persona adapter).")
    persona_name: str = _f("", "Display name used in the system prompt and reports.")
    mode: str = _f("sft", "Training recipe: 'sft', 'sft+kto' or 'sft+dpo'.")
    base_model: str = _f("", "Base model to train on: a GGUF file (dequantized by transformers) or a HF model folder.")
    base_name: str = _f("", "Registry name of the base model, recorded in meta.json.")
    base_gguf: str = _f("", "GGUF file llama.cpp serves the adapter on; used to validate the export. Empty: base_model if it is a GGUF.")
    base_cache_dir: str = _f("", "Folder caching GGUF bases converted to float HF folders (empty: convert on every run).")
    max_steps: int = _f(200, "Optimizer steps for SFT (0: derive from epochs).")
    epochs: float = _f(1.0, "Epochs when max_steps is 0.")
    micro_batch_size: int = _f(4, "Examples per forward pass; halved automatically on CUDA out-of-memory.")
    grad_accum: int = _f(1, "Micro-batches per optimizer step; doubled when the micro-batch is halved.")
    learning_rate: float = _f(2e-4, "Peak learning rate of the LoRA weights.")
    lr_scheduler: str = _f("cosine", "transformers learning-rate schedule name.")
    warmup_steps: int = _f(0, "Linear warm-up steps.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA alpha (scale = alpha / r).")
    lora_dropout: float = _f(0.05, "Dropout on the LoRA input.")
    target_modules: list[str] = _f(list(DEFAULT_TARGETS), "Linear layers that get a LoRA adapter.")
    max_length: int = _f(512, "Longest training sequence in tokens; older context turns are dropped to fit.")
    batching: str = _f("padding_free", "How micro-batches are formed: 'padding_free' (examples concatenated, "
                       "attention kept apart by position ids), 'length_grouped' (shuffled length buckets) or 'random'.")
    seed: int = _f(1234, "Seed for LoRA init, data order and sampling.")
    save_steps: int = _f(50, "Write a checkpoint every N steps (resume continues from the last one).")
    save_total_limit: int = _f(2, "Checkpoints kept on disk.")
    logging_steps: int = _f(1, "Emit a progress event every N steps.")
    quantize_4bit: bool = _f(True, "On CUDA: load the base in 4-bit NF4 (QLoRA). Ignored on CPU.")
    gradient_checkpointing: bool = _f(True, "On CUDA: trade compute for memory. Ignored on CPU.")
    threads: int = _f(0, "CPU threads for torch (0: torch's default).")
    tensorboard: bool = _f(False, "Also log the training scalars to JOB_DIR/tensorboard.")
    eval_batch_size: int = _f(4, "Batch size for held-out perplexity.")
    eval_max_examples: int = _f(64, "Held-out examples scored for perplexity (0: all).")
    eval_samples: int = _f(4, "Held-out contexts generated for the style metrics.")
    eval_max_new_tokens: int = _f(48, "Tokens generated per style sample.")
    eval_fidelity: bool = _f(True, "Compute the style/attribution fidelity report (loads the embedding model).")
    pref_steps: int = _f(50, "Optimizer steps of the KTO/DPO stage.")
    pref_beta: float = _f(0.1, "KTO/DPO beta (strength of the pull towards the reference).")
    pref_learning_rate: float = _f(5e-5, "Learning rate of the preference stage.")
    gguf_dtype: str = _f("f32", "Float type of adapter.gguf tensors: 'f32' or 'f16'.")
    simulate_oom_at_step: int = _f(0, "Testing hook: raise a CUDA out-of-memory error once at this step (0: off).")
    simulate_eval_failure: str = _f("", "Testing hook: 'error' raises, 'kill' SIGKILLs the trainer as evaluation starts.")

    def validate(self) -> TrainConfig:
        """Raise `JobConfigError` with a one-line reason when a value cannot work."""
        if self.mode not in MODES:
            raise JobConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
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
        if self.batching not in BATCHING:
            raise JobConfigError(f"batching must be one of {', '.join(BATCHING)}, got {self.batching!r}")
        if self.gguf_dtype not in ("f32", "f16"):
            raise JobConfigError(f"gguf_dtype must be 'f32' or 'f16', got {self.gguf_dtype!r}")
        return self

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
        return cls.from_dict(data)

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> TrainConfig:
        """Defaults from the `[training]` and `[model]` settings, then `overrides` (e.g. member_id, max_steps)."""
        t = settings.training
        base: dict[str, Any] = {
            "max_steps": t.max_steps,
            "epochs": t.epochs,
            "lora_r": t.lora_r,
            "lora_alpha": t.lora_alpha,
            "lora_dropout": t.lora_dropout,
            "learning_rate": t.learning_rate,
            "base_name": settings.model.base_name,
            "base_cache_dir": str(settings.cache_dir / "base-models"),
        }
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
        raise JobConfigError(f"config field {name}: expected {getattr(kind, '__name__', kind)}, got {value!r}")
    return value
