"""A reply cut off by its token budget ends at a full sentence; one that ends by itself keeps every word."""

from __future__ import annotations

import pytest

from inference.cleaning import WholeSentences


def stream(text: str, chunk: int, cut: bool) -> tuple[str, str]:
    """(what was shown before the end, the whole reply) for `text` fed in chunks of `chunk` characters."""
    whole = WholeSentences()
    shown = "".join(whole.feed(text[i : i + chunk]) for i in range(0, len(text), chunk))
    return shown, shown + whole.finish(cut)


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_a_cut_reply_ends_at_its_last_full_sentence(chunk: int) -> None:
    text = "sure, reboot it. then check the logs! You're right about upgrading to"
    shown, reply = stream(text, chunk, cut=True)
    assert reply == "sure, reboot it. then check the logs!"
    assert shown == reply, "finished sentences are shown as they come"
    assert stream(text, chunk, cut=False)[1] == text, "a reply that ended by itself keeps every word"


@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_one_long_sentence_cut_ends_at_a_clause_or_a_whole_word(chunk: int) -> None:
    shown, reply = stream("you can add it to your sources, and you'll get the men", chunk, cut=True)
    assert shown == "" and reply == "you can add it to your sources"
    assert stream("upgrade to 15.04 with do-release-upgr", chunk, cut=True)[1] == "upgrade to 15.04 with"
    assert stream("ok.", chunk, cut=True)[1] == "ok.", "a sentence that ends right at the budget is whole"


def test_dots_inside_versions_and_addresses_are_not_sentence_ends() -> None:
    shown, reply = stream("see www.ubuntu.com for 15.04 and then", 100, cut=True)
    assert shown == "" and reply == "see www.ubuntu.com for 15.04 and"
    shown, reply = stream("it's 'fixed.' now run (this!) again", 100, cut=True)
    assert reply == "it's 'fixed.' now run (this!)"
    assert stream("first line\nsecond li", 2, cut=True)[1] == "first line"
