"""Scrubbing and normalising message text before training."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobspec.cleaning import (
    EMAIL,
    INVITE,
    PHONE,
    SECRET,
    Cleaner,
    is_link_only,
    normalize,
    render_mentions,
    scrub,
)

NAMES = {"111": "alice", "222": "bob"}


def test_user_mentions_render_as_names_and_unknown_ids_stay_anonymous() -> None:
    text = render_mentions("hey <@111> and <@!222>, also <@999>", NAMES)
    assert text == "hey @alice and @bob, also @someone"


def test_role_channel_emoji_and_mass_pings_are_neutralised() -> None:
    text = render_mentions("<@&42> see <#77> <a:party:123> @everyone @here <t:1700000000:R>", NAMES)
    assert "<@&" not in text and "<#" not in text and "<a:" not in text
    assert "@role" in text and "#channel" in text and ":party:" in text and "[time]" in text
    # The visible word survives but Discord no longer reads it as a ping.
    assert "@everyone" not in text and "@here" not in text and "everyone" in text


@pytest.mark.parametrize(
    ("raw", "placeholder", "gone"),
    [
        ("write to jane.doe+x@mail.example.org pls", EMAIL, "jane.doe"),
        ("call +44 20 7946 0958 tonight", PHONE, "7946"),
        ("call (555) 123-4567 tonight", PHONE, "4567"),
        ("bot token MTA1MjM0NTY3ODkwMTIzNDU2Nw.GAbcde.abcdefghijklmnopqrstuvwxyz0123", SECRET, "GAbcde"),
        ("my key sk-proj-abcdefghijklmnopqrstu12345", SECRET, "abcdefghij"),
        ("gh ghp_abcdefghijklmnopqrstuvwxyz0123456789", SECRET, "ghp_"),
        ("aws AKIAIOSFODNN7EXAMPLE", SECRET, "AKIA"),
        ("sha 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", SECRET, "9f86d08"),
        ("b64 dGhpcyBpcyBhIHNlY3JldCBrZXkgMTIzNDU2Nzg5MA==", SECRET, "dGhpcy"),
        ("join discord.gg/abcDEF or https://discord.com/invite/xyz123", INVITE, "abcDEF"),
    ],
)
def test_scrub_replaces_personal_data_and_secrets(raw: str, placeholder: str, gone: str) -> None:
    out = scrub(raw)
    assert placeholder in out
    assert gone not in out


@pytest.mark.parametrize(
    "kept",
    [
        "meet on 2024-01-15 12:30 ok",
        "i scored 1500 points in 2023",
        "antidisestablishmentarianismwithoutanydigitsinside",
        "see you at 10:30",
    ],
)
def test_scrub_leaves_ordinary_text_alone(kept: str) -> None:
    assert scrub(kept) == kept


def test_urls_lose_paths_and_queries_but_keep_the_host() -> None:
    out = scrub("look https://www.youtube.com/watch?v=secretid123 lol")
    assert out == "look https://www.youtube.com/… lol"


def test_link_only_attachment_only_and_empty_messages_are_dropped() -> None:
    cleaner = Cleaner(NAMES)
    assert cleaner.message("https://example.com/a/b") is None
    assert cleaner.message("  <https://example.com> ") is None
    assert cleaner.message("discord.gg/abc") is None
    assert cleaner.message("") is None
    assert cleaner.message("   \n ") is None
    assert cleaner.message("look at this https://example.com/x") == "look at this https://example.com/…"
    assert is_link_only("https://a.com/… https://b.org")


def test_whitespace_is_tidied_and_length_bounds_apply() -> None:
    cleaner = Cleaner(NAMES, min_chars=3, max_chars=10)
    assert cleaner.text("  a   b \r\n\n\n\n c  ") == "a b\n\nc"
    assert not cleaner.within_bounds("ab")
    assert cleaner.within_bounds("abc")
    assert not cleaner.within_bounds("x" * 11)
    clipped = cleaner.clip("x" * 50)
    assert len(clipped) == 10 and clipped.endswith("…")


def test_normalize_ignores_case_accents_punctuation_and_letter_repeats() -> None:
    assert normalize("LOOOOOL!!! Héllo") == normalize("lool hello")
    assert normalize("ok.") == normalize("OK")
    assert normalize("ok") != normalize("no")


@settings(max_examples=60, deadline=None)
@given(
    user=st.from_regex(r"[a-z]{1,8}(\.[a-z]{1,5})?", fullmatch=True),
    domain=st.from_regex(r"[a-z]{2,8}\.(com|org|net|io)", fullmatch=True),
    before=st.text(alphabet="abc xyz!?", max_size=20),
)
def test_no_email_survives_scrubbing(user: str, domain: str, before: str) -> None:
    out = scrub(f"{before} {user}@{domain} ")
    assert f"{user}@{domain}" not in out
    assert EMAIL in out
