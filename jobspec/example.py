"""One training example of the job-folder contract: a member's reply with its rendered prompt and completion."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Example:
    """One reply of a member with its rendered prompt and completion."""

    member_id: str
    channel_id: str
    messages: tuple[dict[str, str], ...]
    target: str
    prompt: str
    completion: str
    members: tuple[str, ...]
    ts: float
    reactions: int = 0
    weight: float = 1.0
    context_key: str = ""
    last_context: str = ""

    def row(self) -> dict[str, Any]:
        """The JSON-lines row of the job-folder contract."""
        return {
            "prompt": self.prompt,
            "completion": self.completion,
            "target": self.target,
            "messages": list(self.messages),
            "members": list(self.members),
            "weight": self.weight,
            "ts": self.ts,
            "member": self.member_id,
            "reactions": self.reactions,
        }
