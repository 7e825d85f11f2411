"""The one chat format: training examples and inference prompts are both rendered here, so they never disagree."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox


@dataclass(frozen=True)
class Utterance:
    """One turn of channel context: who said it and what (already cleaned)."""

    author_id: str
    name: str
    text: str


@dataclass(frozen=True)
class PromptStyle:
    """How a persona's turn is framed; an adapter is served with the style it was trained with.

    `system`: "persona" names the member and the community; "plain" is a short instruction without a name
    (a named system prompt on a small instruct model invites its assistant voice: "I am happy to help").
    `speaker_names`: prefix other people's lines with "Name: " (needed in group chat to tell speakers apart).
    """

    system: str = "persona"
    speaker_names: bool = True

    def __post_init__(self) -> None:
        if self.system not in ("persona", "plain"):
            raise ValueError(f"unknown system prompt style {self.system!r}")


# Named prompt shapes; a job records the name it trained with (TrainConfig.prompt_style, the adapter's meta.json) and
# the engine serves that adapter with the same one.
STYLES = {
    "persona": PromptStyle("persona", True),
    "plain": PromptStyle("plain", False),
    "plain+names": PromptStyle("plain", True),
}
# Chosen on `doppel bench fidelity` (BENCHMARKS.md, runs A, C, D): on real chat the nameless prompt's adapter was
# attributed to the member 63% of the time against 50% for the named ones (120 and 240 replies), at the same
# hybrid share and 6% fewer tokens per example. Group chat loses who said what: `plain+names` keeps it, per job or
# per server (`[training] prompt_style`).
DEFAULT_STYLE = "plain"
# Adapters from before the style was recorded were trained with the named persona prompt.
LEGACY_STYLE = "persona"


def style_named(name: str) -> PromptStyle:
    """The prompt style called `name` (one of STYLES)."""
    try:
        return STYLES[name]
    except KeyError:
        raise ValueError(f"unknown prompt style {name!r} (choose from {', '.join(STYLES)})") from None


def system_prompt(
    persona_name: str,
    channel_name: str | None = None,
    *,
    multi: bool = False,
    style: str = DEFAULT_STYLE,
) -> str:
    """The persona's system prompt in prompt style `style`; `multi` is the multi-persona adapter's 'respond as' one."""
    where = f" in #{channel_name}" if channel_name else ""
    if multi:
        return (
            f"Respond as {persona_name}, a member of this Discord community chatting{where}. "
            f"Write only {persona_name}'s next message, in their own style."
        )
    if style_named(style).system == "plain":
        return "You are chatting with a stranger. Reply in your own style."
    return (
        f"You are {persona_name}, a member of this Discord community, chatting{where}. "
        f"Write {persona_name}'s next message in their own voice: same tone, length, spelling and emoji."
    )


# The member's own past messages shown to the persona (retrieval when serving; `example_shots` when training) are
# short samples of style, not content to quote at length.
EXAMPLE_CHARS = 240
# The partner's side of a few-shot exchange: the member's past messages are shown as their own earlier turns, not
# quoted inside an instruction (a small instruct model answers instructions in its assistant voice, and copies
# the style of the turns it already "wrote").
EXAMPLE_CUE = "…"


def with_examples(messages: Sequence[dict[str, str]], examples: Sequence[str]) -> list[dict[str, str]]:
    """Put the member's own past messages before the conversation as earlier turns of theirs (most similar last)."""
    lines = [" ".join(e.split())[:EXAMPLE_CHARS] for e in examples if e.strip()]
    if not lines:
        return list(messages)
    shots: list[dict[str, str]] = []
    for line in reversed(lines):  # the closest example sits right before the conversation
        shots += [{"role": "user", "content": EXAMPLE_CUE}, {"role": "assistant", "content": line}]
    return [messages[0], *shots, *messages[1:]]


def build_messages(
    persona_id: str,
    persona_name: str,
    channel_name: str | None,
    context: Sequence[Utterance],
    *,
    multi: bool = False,
    style: str = DEFAULT_STYLE,
) -> list[dict[str, str]]:
    """Chat messages for a persona's next turn: others become user turns ("Name: text"), the persona's own assistant turns."""
    # The multi-persona adapter must know who says what; a single persona's style may drop the names.
    names = style_named(style).speaker_names or multi
    messages = [
        {"role": "system", "content": system_prompt(persona_name, channel_name, multi=multi, style=style)}
    ]
    pending: list[str] = []
    for u in context:
        if u.author_id == persona_id:
            if pending:
                messages.append({"role": "user", "content": "\n".join(pending)})
                pending = []
            messages.append({"role": "assistant", "content": u.text})
        else:
            # Consecutive speakers share one user turn: templates that insist on alternating roles still render.
            pending.append(f"{u.name}: {u.text}" if names else u.text)
    if pending:
        messages.append({"role": "user", "content": "\n".join(pending)})
    if messages[-1]["role"] != "user":
        # The persona speaks again right after itself: an empty-ish nudge keeps the template's role order valid.
        messages.append({"role": "user", "content": "(continue)"})
    return messages


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


# Default chat formats for base models whose GGUF has no chat template (pretrained models, often chosen on purpose
# for persona cloning: they imitate style without an assistant voice). ChatML where the vocabulary has its two
# markers as tokens; otherwise plain role-tagged turns, each closed by the model's own end-of-sequence token, so
# the trained persona learns to stop with a token llama.cpp already treats as end of generation.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize + ':\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:\n' }}{% endif %}"
)
TEMPLATES = {"chatml": CHATML_TEMPLATE, "plain": PLAIN_TEMPLATE}
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
# The labels PLAIN_TEMPLATE opens each turn with ("User:" on a line of its own), one per role build_messages writes.
# Only a trained persona ends its turn with the end-of-sequence token: an untrained base (the retrieval persona, the
# base-model fallback, a candidate that failed the gate) goes on to write the next turns, so a line starting with
# one of these labels ends the reply too (ChatFormat.stop, and the stream cleaner through Prompt.speakers).
PLAIN_LABELS = tuple(role.capitalize() for role in ("system", "user", "assistant"))


@dataclass(frozen=True)
class ChatFormat:
    """A model's chat template plus its end-of-turn token; renders prompts and training completions.

    `source` says where the template came from: `gguf` (the model's own), `default:chatml` / `default:plain`
    (the model has none), `chosen:NAME` or `file:PATH` (given at `doppel personas add-base --template`).
    """

    template: str
    eos_token: str
    bos_token: str = ""
    source: str = field(default="gguf", compare=False)

    @cached_property
    def _compiled(self) -> jinja2.Template:
        # Compiling is ~97% of rendering cost; dataset building renders thousands of examples.
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        return env.from_string(self.template)

    def render(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool) -> str:
        """Render `messages` with the model's own Jinja template, the way transformers does."""
        return self._compiled.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )

    def prompt(self, messages: Sequence[dict[str, str]]) -> str:
        """The text a model continues to write the next assistant turn."""
        return self.render(messages, add_generation_prompt=True)

    def completion(self, messages: Sequence[dict[str, str]], reply: str) -> str:
        """What follows `prompt(messages)` when the assistant says `reply`, ending with the end-of-turn token."""
        head = self.prompt(messages)
        full = self.render([*messages, {"role": "assistant", "content": reply}], add_generation_prompt=False)
        if not full.startswith(head):
            raise ValueError("chat template does not extend the generation prompt with the assistant turn")
        tail = full[len(head) :]
        end = tail.rfind(self.eos_token)
        if end < 0:
            # Templates that leave the turn open would train a model that never stops.
            return tail + self.eos_token
        return tail[: end + len(self.eos_token)]

    @property
    def turn_labels(self) -> tuple[str, ...]:
        """The role labels that open a turn at a line start: the made-up plain format's; a model's own has none."""
        return PLAIN_LABELS if self.template == PLAIN_TEMPLATE else ()

    @property
    def stop(self) -> list[str]:
        """Stop strings for generation: the end-of-turn token and the start of a new turn."""
        stops = [self.eos_token]
        if "<|im_start|>" in self.template:
            stops.append("<|im_start|>")
        # A label at the reply's very start has no newline before it: the stream cleaner catches that one.
        stops += [f"\n{label}:" for label in self.turn_labels]
        return stops

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> ChatFormat:
        """From a transformers tokenizer that carries a chat template."""
        template = tokenizer.chat_template
        if not template:
            raise ValueError("tokenizer has no chat template")
        return cls(template=template, eos_token=tokenizer.eos_token, bos_token=tokenizer.bos_token or "")

    def to_dict(self) -> dict[str, str]:
        """JSON-able record (meta.json's `chat_format`): what serving must use to agree with training."""
        return {
            "template": self.template,
            "eos_token": self.eos_token,
            "bos_token": self.bos_token,
            "source": self.source,
        }

    @classmethod
    def from_vocab(
        cls,
        tokens: Sequence[str],
        eos_id: int | None,
        bos_id: int | None,
        *,
        own: str | None = None,
        template: str | None = None,
        source: str | None = None,
    ) -> ChatFormat:
        """The format in force for a model: `template` (a name in TEMPLATES or Jinja text) if given, else the
        model's `own` template, else the default (ChatML when the vocabulary has its tokens, else plain turns).
        """

        def token(i: int | None) -> str:
            return str(tokens[i]) if i is not None and 0 <= i < len(tokens) else ""

        eos, bos = token(eos_id), token(bos_id)
        has_chatml = all(t in tokens for t in CHATML_TOKENS)
        if template is not None or not own:
            name = template if template is not None else ("chatml" if has_chatml else "plain")
            text = TEMPLATES.get(name, name)
            label = source or (
                f"chosen:{name}"
                if template is not None and name in TEMPLATES
                else "file"
                if template is not None
                else f"default:{name}"
            )
            if text == CHATML_TEMPLATE:
                if not has_chatml:
                    raise ValueError(
                        "the ChatML template needs <|im_start|> and <|im_end|> in the vocabulary"
                    )
                return cls(template=text, eos_token="<|im_end|>", bos_token=bos, source=label)
            if not eos:
                raise ValueError("the model has no end-of-sequence token to end a turn with")
            return cls(template=text, eos_token=eos, bos_token=bos, source=label)
        if not eos:
            raise ValueError("the model has no end-of-sequence token to end a turn with")
        return cls(template=own, eos_token=eos, bos_token=bos, source="gguf")

    @classmethod
    def for_config(cls, config: Mapping[str, Any]) -> ChatFormat:
        """The chat format of a training job's base: its GGUF's, or a HF folder's tokenizer_config.json's.

        One place for the trainer, the supervisor and re-evaluation; raises ValueError for a base without one.
        """
        import json

        base = str(config.get("base_model") or "")
        gguf = config.get("base_gguf") or (base if base.endswith(".gguf") else "")
        if gguf:
            return cls.from_gguf(
                Path(gguf),
                template=config.get("chat_template") or None,
                source=config.get("chat_template_source") or None,
            )
        folder = Path(base)
        try:
            tok = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read the chat template of {folder}: {exc}") from None
        template = tok.get("chat_template")
        if not template and (folder / "chat_template.jinja").exists():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        eos = tok.get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        if not template or not eos:
            raise ValueError(f"{folder} has no chat template or end-of-turn token")
        return cls(template=str(template), eos_token=str(eos))

    @classmethod
    def from_gguf(cls, path: Path, template: str | None = None, source: str | None = None) -> ChatFormat:
        """From the metadata of a GGUF model file (the template transformers reads from it, or the default)."""
        # The header reader skips tensor data: milliseconds, where gguf's GGUFReader maps every tensor (seconds).
        from core.ggufinfo import read_metadata

        meta = read_metadata(path, arrays=("tokenizer.ggml.tokens",))
        tokens = meta.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list):
            raise ValueError(f"{path}: GGUF has no tokenizer vocabulary")
        own = meta.get("tokenizer.chat_template")
        try:
            return cls.from_vocab(
                tokens,
                meta.get("tokenizer.ggml.eos_token_id"),
                meta.get("tokenizer.ggml.bos_token_id"),
                own=str(own) if own else None,
                template=template,
                source=source,
            )
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
