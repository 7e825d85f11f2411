"""Checking a base model before it is registered: the whole path (training, export, serving) must be able to work.

`add-base` refuses here, with the reason, what would otherwise fail at training or serving time: an unreadable
GGUF, an architecture whose LoRA export is not verified, no usable end-of-turn token, no chat format, or HF
weights that are not the same model as the GGUF they would be served on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import GGUFFileError
from core.ggufinfo import HF_TO_GGUF_ARCH, SUPPORTED_ARCHS, ModelShape, read_metadata, read_shape
from models.errors import ModelFileError

# Why some architectures people try are refused (others get the generic reason).
REFUSED = {
    "gemma": "Gemma 1's LoRA export is not verified; use a Gemma 2 or Gemma 3 model",
    "gemma3n": "Gemma 3n's per-layer embeddings and AltUp are not covered by the LoRA export",
    "qwen2moe": "mixture-of-experts layers cannot carry the LoRA doppel trains",
    "qwen3moe": "mixture-of-experts layers cannot carry the LoRA doppel trains",
    "mistral3": "Mistral 3 is a vision-language model; use a text-only Mistral (its GGUF architecture is llama)",
    "phi2": "Phi-2's LoRA export is not verified; use Phi-3 or Phi-4",
    "bert": "an encoder, not a model that writes replies",
}


@dataclass(frozen=True)
class BaseCheck:
    """What a valid base model is: its shape, the chat format in force and where that came from."""

    shape: ModelShape
    template: str | None  # the chosen template (a name or Jinja text); None: the GGUF's own or the default
    template_source: str
    eos_token: str


def refusal(arch: str) -> str | None:
    """Why an architecture cannot be a base model, or None when it can."""
    if arch in SUPPORTED_ARCHS:
        return None
    why = REFUSED.get(arch, "its LoRA export to llama.cpp is not verified")
    return f"architecture {arch!r} is not supported: {why} (supported: {', '.join(SUPPORTED_ARCHS)})"


def template_argument(value: str | None) -> tuple[str | None, str | None]:
    """`--template NAME|FILE` -> (template name or Jinja text, source label); (None, None) when not given."""
    from core.chatformat import TEMPLATES

    if value is None:
        return None, None
    if value in TEMPLATES:
        return value, f"chosen:{value}"
    path = Path(value).expanduser()
    if not path.is_file():
        raise ModelFileError(
            f"--template {value}: neither a template name ({', '.join(TEMPLATES)}) nor a file"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"--template {value}: unreadable ({exc})") from None
    if not text.strip():
        raise ModelFileError(f"--template {value}: the file is empty")
    return text, f"file:{path.resolve()}"


def check_gguf(path: Path, template: str | None = None, template_source: str | None = None) -> BaseCheck:
    """Validate a base GGUF up front: readable, a model, a supported architecture, a chat format that works."""
    from core.chatformat import ChatFormat

    try:
        shape = read_shape(path)
    except GGUFFileError as exc:
        raise ModelFileError(str(exc)) from None
    if shape.model_type == "adapter":
        raise ModelFileError(f"{path} is a LoRA adapter, not a base model")
    why = refusal(shape.architecture)
    if why:
        raise ModelFileError(f"{path.name}: {why}")
    try:
        fmt = ChatFormat.from_gguf(path, template=template, source=template_source)
    except ValueError as exc:
        raise ModelFileError(str(exc)) from None
    tokens = read_metadata(path, arrays=("tokenizer.ggml.tokens",)).get("tokenizer.ggml.tokens") or []
    if fmt.eos_token not in tokens:
        raise ModelFileError(
            f"{path.name}: the end-of-turn marker {fmt.eos_token!r} is not a token of the model"
        )
    sample = [{"role": "system", "content": "You are Ada."}, {"role": "user", "content": "Bo: hi"}]
    try:
        completion = fmt.completion(sample, "hey")
    except Exception as exc:
        raise ModelFileError(
            f"{path.name}: the chat template ({fmt.source}) does not render a turn: {exc}"
        ) from None
    if not completion.endswith(fmt.eos_token):
        raise ModelFileError(f"{path.name}: the chat template ({fmt.source}) does not end a turn")
    return BaseCheck(shape=shape, template=template, template_source=fmt.source, eos_token=fmt.eos_token)


def check_same_model(hf_dir: Path, gguf: Path, shape: ModelShape) -> dict[str, Any]:
    """HF weights to train on and a GGUF to serve on must be one model: architecture and vocabulary must match."""
    try:
        config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{hf_dir}: not a transformers model folder (config.json: {exc})") from None
    model_type = str(config.get("model_type") or "")
    if model_type in ("gemma3",) and "text_config" in config:
        raise ModelFileError(
            f"{hf_dir}: a Gemma 3 vision-language checkpoint; use its text-only (gemma3_text) weights"
        )
    arch = HF_TO_GGUF_ARCH.get(model_type, model_type)
    if arch != shape.architecture:
        raise ModelFileError(
            f"{hf_dir.name} and {gguf.name} are not the same model: architecture {model_type!r} "
            f"(llama.cpp {arch!r}) vs the GGUF's {shape.architecture!r}"
        )
    problems = []
    for key, gguf_value in (
        ("num_hidden_layers", shape.layers),
        ("hidden_size", shape.hidden),
        ("num_attention_heads", shape.heads),
    ):
        if key in config and gguf_value and int(config[key]) != gguf_value:
            problems.append(f"{key} {config[key]} vs {gguf_value}")
    hf_tokens = _hf_vocabulary(hf_dir)
    gguf_tokens = read_metadata(gguf, arrays=("tokenizer.ggml.tokens",)).get("tokenizer.ggml.tokens") or []
    if hf_tokens is None:
        problems.append("the HF folder has no tokenizer.json to compare vocabularies with")
    else:
        # The GGUF may pad its vocabulary to the embedding size; every token the HF tokenizer has must match.
        differ = [i for i, tok in hf_tokens.items() if i >= len(gguf_tokens) or gguf_tokens[i] != tok]
        if differ:
            i = differ[0]
            theirs = gguf_tokens[i] if i < len(gguf_tokens) else "nothing"
            problems.append(
                f"vocabulary differs at {len(differ)} token(s), first id {i}: {hf_tokens[i]!r} vs {theirs!r}"
            )
    if problems:
        raise ModelFileError(f"{hf_dir.name} and {gguf.name} are not the same model: {'; '.join(problems)}")
    return {"model_type": model_type, "vocab": len(hf_tokens or {})}


def _hf_vocabulary(hf_dir: Path) -> dict[int, str] | None:
    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path}: unreadable ({exc})") from None
    vocab = state.get("model", {}).get("vocab") or {}
    tokens = (
        {int(i): str(t) for t, i in vocab.items()}
        if isinstance(vocab, dict)
        else {i: str(entry[0]) for i, entry in enumerate(vocab)}
    )
    for added in state.get("added_tokens", []):
        tokens[int(added["id"])] = str(added["content"])
    return tokens


def from_hub(repo: str, filename: str | None = None) -> Path:
    """Download a GGUF from the Hugging Face Hub (progress bar, resumable, HF_HOME cache, HF_TOKEN) -> local path.

    Without `filename` the repository must hold exactly one .gguf file. Offline (HF_HUB_OFFLINE, or no network)
    and not already cached: one line saying so.
    """
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    try:
        if filename is None:
            ggufs = sorted(f for f in HfApi().list_repo_files(repo) if f.endswith(".gguf"))
            if len(ggufs) != 1:
                listed = ", ".join(ggufs[:8]) or "none"
                raise ModelFileError(f"{repo} has {len(ggufs)} GGUF files ({listed}): name one with --file")
            filename = ggufs[0]
        return Path(hf_hub_download(repo, filename))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        why = (
            "offline (HF_HUB_OFFLINE is set)"
            if _offline()
            else f"the Hub is not reachable ({_first_line(exc)})"
        )
        raise ModelFileError(
            f"cannot download {repo}/{filename or '*.gguf'}: {why}, and it is not in the cache"
        ) from None
    except RepositoryNotFoundError:
        raise ModelFileError(f"no Hub repository {repo!r} (or it is gated/private: set HF_TOKEN)") from None
    except EntryNotFoundError:
        raise ModelFileError(f"{repo} has no file {filename!r}") from None
    except HfHubHTTPError as exc:
        raise ModelFileError(f"cannot download {repo}/{filename}: {_first_line(exc)}") from None
    except OSError as exc:
        raise ModelFileError(f"cannot download {repo}/{filename}: {exc}") from None


def _offline() -> bool:
    import os

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
