"""Property: after any sequence of grant / revoke / import / new message / edit / delete / forget, no content of a
member without `train` consent is stored (messages, embeddings, keys) and stored content matches the model."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from consent.erasure import forget
from consent.service import ConsentService
from core.settings import Settings
from data.dce_import import import_exports
from data.records import Message
from data.store import Store
from doppel.erasure import erasure_parts

MEMBERS = ["400000000000000001", "400000000000000002", "400000000000000003"]
members = st.sampled_from(MEMBERS)
texts = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=30).filter(
    str.strip
)


class ConsentMachine(RuleBasedStateMachine):
    """Drives the real store and consent service; keeps a model of what may be stored."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="doppel-prop-"))
        self.loop = asyncio.new_event_loop()
        self.settings = Settings.load(env={"DOPPEL_HOME": str(self.tmp / "home")})
        self.store: Store = self.loop.run_until_complete(Store.open(self.settings))
        self.consent = ConsentService(self.store, erasure_parts())
        self.train: set[str] = set()
        self.model: dict[str, tuple[str, str]] = {}  # message id -> (author, content) expected in the store
        self.next_id = 1000
        self.exports = 0

    def run(self, coro):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.run(self.store.close())
        self.loop.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _new_id(self) -> str:
        self.next_id += 1
        return str(self.next_id)

    @rule(member=members)
    def grant(self, member: str) -> None:
        self.run(self.consent.grant([member], "train", "t", "button"))
        self.train.add(member)

    @rule(member=members)
    def revoke(self, member: str) -> None:
        self.run(self.consent.revoke([member], "train", "t", "button"))
        self.train.discard(member)
        self.model = {k: v for k, v in self.model.items() if v[0] != member}

    @rule(member=members)
    def forget(self, member: str) -> None:
        self.run(forget(self.store, self.settings, member, "t", "cli", parts=erasure_parts()))
        self.train.discard(member)
        self.model = {k: v for k, v in self.model.items() if v[0] != member}

    @rule(member=members, content=texts)
    def new_message(self, member: str, content: str) -> None:
        mid = self._new_id()
        stored = self.run(
            self.store.messages.add_many([Message(mid, "1", "2", "c", member, "n", 1.0, content)])
        )
        assert stored == (1 if member in self.train else 0)
        if member in self.train:
            self.model[mid] = (member, content)
            self.run(self.store.embeddings.put(member, "mini", [(mid, content.encode())]))

    @rule(batch=st.lists(st.tuples(members, texts), min_size=1, max_size=6), dup=st.booleans())
    def import_file(self, batch: list[tuple[str, str]], dup: bool) -> None:
        msgs = []
        for member, content in batch:
            msgs.append(
                {
                    "id": self._new_id(),
                    "type": "Default",
                    "timestamp": "2024-01-01T00:00:00.1+02:00",
                    "content": content,
                    "author": {"id": member, "name": "n", "isBot": False},
                }
            )
        if dup:
            msgs.append(dict(msgs[0]))
        self.exports += 1
        path = self.tmp / f"export-{self.exports}.json"
        path.write_text(json.dumps({"guild": {"id": "1"}, "channel": {"id": "2"}, "messages": msgs}))
        result = self.run(import_exports(self.store, [path]))
        f = result["files"][0]
        assert f["error"] is None
        for m in msgs:
            if m["author"]["id"] in self.train and m["id"] not in self.model:
                self.model[m["id"]] = (m["author"]["id"], m["content"])
        assert f["stored"] == sum(1 for m in msgs[: len(batch)] if m["author"]["id"] in self.train)

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data(), content=texts)
    def edit(self, data: st.DataObject, content: str) -> None:
        mid = data.draw(st.sampled_from(sorted(self.model)))
        assert self.run(self.store.messages.edit(mid, content, 9.0))
        self.model[mid] = (self.model[mid][0], content)

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        mid = data.draw(st.sampled_from(sorted(self.model)))
        assert self.run(self.store.messages.delete(mid))
        del self.model[mid]

    @invariant()
    def nothing_of_non_consenting_members(self) -> None:
        authors = self.run(self.store.messages.authors())
        assert authors <= self.train
        for member in set(MEMBERS) - self.train:
            assert self.run(self.store.embeddings.count(member)) == 0
            assert not self.run(self.store.keys.exists(member))

    @invariant()
    def stored_content_matches_model(self) -> None:
        stored = {}
        for member in MEMBERS:
            for m in self.run(self.store.messages.for_member(member)):
                stored[m.id] = (m.author_id, m.content)
        assert stored == self.model


TestConsentMachine = ConsentMachine.TestCase
TestConsentMachine.settings = hsettings(
    max_examples=25, stateful_step_count=12, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
