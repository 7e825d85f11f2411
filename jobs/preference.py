"""Preference signals for KTO and DPO: reactions on real replies, 👍/👎 on persona replies, reacted-vs-plain pairs."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from core.chatformat import DEFAULT_STYLE, ChatFormat, build_messages

if TYPE_CHECKING:
    from jobspec.example import Example


def preference_rows(
    examples: Sequence[Example], feedback: Iterable[Mapping[str, Any]] = ()
) -> list[dict[str, Any]]:
    """KTO rows (reacted real replies, 👍/👎 feedback) and DPO pairs (reacted vs unreacted reply to one message)."""
    rows: list[dict[str, Any]] = []
    groups: dict[tuple[str, str], list[Example]] = defaultdict(list)
    for ex in examples:
        if ex.reactions > 0:
            rows.append(
                _kto(ex.prompt, ex.completion, True, ex.members, "reactions", ex.reactions, ex.messages)
            )
        if ex.context_key:
            groups[(ex.member_id, ex.context_key)].append(ex)
    for (_, key), group in sorted(groups.items()):
        reacted = sorted((ex for ex in group if ex.reactions > 0), key=lambda ex: -ex.reactions)
        plain = [ex for ex in group if ex.reactions == 0]
        if not reacted or not plain:
            continue
        chosen = reacted[0]
        # The pair shares the earliest prompt: both replies answer the same message.
        prompt_ex = min(group, key=lambda ex: ex.ts)
        for rejected in plain:
            members = tuple(sorted({*chosen.members, *rejected.members, *prompt_ex.members}))
            rows.append(
                {
                    "kind": "dpo",
                    "prompt": prompt_ex.prompt,
                    "chosen": chosen.completion,
                    "rejected": rejected.completion,
                    "members": list(members),
                    "context_key": key,
                    # The rendered turns, so the recipe can drop the oldest context to fit max_length.
                    "messages": list(prompt_ex.messages),
                }
            )
            rows.append(
                _kto(
                    rejected.prompt,
                    rejected.completion,
                    False,
                    rejected.members,
                    "unreacted",
                    0,
                    rejected.messages,
                )
            )
    for fb in feedback:
        value = int(fb.get("value", 0))
        if value == 0 or not fb.get("prompt") or not fb.get("completion"):
            continue
        rows.append(
            _kto(fb["prompt"], fb["completion"], value > 0, tuple(fb.get("members", ())), "feedback", value)
        )
    return rows


def _kto(
    prompt: str,
    completion: str,
    label: bool,
    members: Sequence[str],
    source: str,
    signal: int,
    messages: Sequence[Mapping[str, str]] = (),
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "kind": "kto",
        "prompt": prompt,
        "completion": completion,
        "label": label,
        "members": list(members),
        "source": source,
        "signal": signal,
    }
    if messages:
        row["messages"] = [dict(m) for m in messages]
    return row


def feedback_rows(
    items: Iterable[Mapping[str, Any]],
    member_id: str,
    name: str,
    chat_format: ChatFormat,
    *,
    multi: bool = False,
    style: str = DEFAULT_STYLE,
) -> list[dict[str, Any]]:
    """👍/👎 on persona replies as KTO inputs: the reply under a context-free prompt, closed by end-of-turn."""
    # The conversation a rated reply answered may quote people who never consented to training: it is not used.
    prompt = chat_format.prompt(build_messages(member_id, name, None, [], multi=multi, style=style))
    rows = []
    for item in items:
        reply, value = item.get("reply"), int(item.get("value") or 0)
        if not reply or value == 0:
            continue
        completion = reply if reply.endswith(chat_format.eos_token) else reply + chat_format.eos_token
        rows.append({"prompt": prompt, "completion": completion, "value": value, "members": [member_id]})
    return rows
