"""What the bot adapts to Discord, built once: the owners it calls (store, consent, jobs, registry, supervisor,
engine) and the few rules and queries of its own (live recording, uploads, the "ready to train" list)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from bot.errors import BadUpload
from core.chatformat import Utterance
from core.settings import Settings
from data.consents import TRAIN_HOLDERS
from data.records import Member, Message
from jobs.table import JobTable
from models.registry import Registry

if TYPE_CHECKING:
    from consent.erasure import ErasureParts
    from consent.service import ConsentService
    from data.store import Store
    from inference.places import LetGo, ServingPlace
    from inference.requests import GenParams, PersonaRequest
    from jobs.supervisor import Supervisor


class PersonaEngine(Protocol):
    """What the bot needs of the inference engine (`inference.engine.Engine`; a scripted one in tests)."""

    def reply(
        self, persona: PersonaRequest, context: Sequence[Utterance], params: GenParams | None = None
    ) -> AsyncIterator[str]: ...

    def forget(self, member_id: str) -> None: ...

    async def let_go(self, member_id: str, doomed: Callable[[str], bool]) -> LetGo: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class GuildConfig:
    """A server's recording switch, the admin's policy acknowledgement and its channel lists."""

    guild_id: str
    recording: bool = False
    acknowledged_by: str | None = None
    acknowledged_at: float | None = None
    allowed_channels: frozenset[str] = frozenset()
    persona_channels: frozenset[str] = frozenset()

    def records(self, channel_id: str) -> bool:
        """True when messages in `channel_id` may be recorded (recording on, acknowledged, channel allowed)."""
        return bool(self.recording and self.acknowledged_by and channel_id in self.allowed_channels)


@dataclass
class Services:
    """Store, consent, supervisor, engine, registry and jobs, built once and shared by every handler."""

    settings: Settings
    store: Store
    consent: ConsentService
    # The erasure parts and export sections, handed over by the composition root (`doppel.erasure`).
    erasure: ErasureParts
    supervisor: Supervisor | None = None
    engine: PersonaEngine | None = None
    registry: Registry = field(init=False)
    jobs: JobTable = field(init=False)
    _owned: list[Any] = field(default_factory=list, repr=False)
    # Called with a member id whenever the engine forgets them (in-memory copies elsewhere, e.g. joining-in habits).
    forgetters: list[Callable[[str], None]] = field(default_factory=list, repr=False)
    # This process as a serving place: erasures from other processes (a shell's `doppel forget`) reach the engine.
    place: ServingPlace | None = None

    def __post_init__(self) -> None:
        # The owners of `adapters` and `jobs`: the bot reads and writes those tables through them only.
        self.registry = Registry(self.store, self.settings)
        self.jobs = JobTable(self.store)

    @classmethod
    async def open(
        cls,
        settings: Settings,
        erasure: ErasureParts,
        *,
        with_engine: bool = True,
        with_supervisor: bool = True,
    ) -> Services:
        """Open the real services for `doppel run` (imports stay lazy so tests can build lighter sets)."""
        from consent.service import ConsentService
        from data.store import Store

        store = await Store.open(settings)
        services = cls(
            settings=settings, store=store, consent=ConsentService(store, erasure), erasure=erasure
        )
        services._owned.append(store)
        retriever = None
        if with_engine:
            from inference.retrieval import Retriever

            # Serves the 'retrieval' and 'adapter+retrieval' persona modes from the member's messages; the supervisor
            # builds a new persona's index with it as the adapter is published (one embedding model in memory).
            retriever = Retriever(store, settings)
        if with_supervisor:
            from jobs.supervisor import Supervisor

            services.supervisor = Supervisor(store, settings, serving=retriever)
            await services.supervisor.start()
            services._owned.append(services.supervisor)
        if with_engine:
            from inference.server import make_engine

            # [inference] backend picks llama.cpp in this process or a persona server.
            engine = make_engine(settings, retriever=retriever)
            await engine.start()
            services.engine = engine
            services._owned.append(engine)
            await services.serve_as_place()
        return services

    async def serve_as_place(self) -> None:
        """Register this process's engine as a serving place (closed before the engine: newest first)."""
        import os

        from inference.places import ServingPlace

        where = self.settings.inference
        what = "in process" if where.backend == "process" else f"a client of {where.server_url}"
        self.place = ServingPlace(
            self.store, "engine", f"the bot's persona engine ({what}, pid {os.getpid()})", self
        )
        await self.place.start()
        self._owned.append(self.place)

    async def let_go(self, member_id: str, doomed: Callable[[str], bool]) -> LetGo:
        """An erasure from any process: the engine lets go of the member's adapters, the bot of its copies."""
        from inference.places import LetGo

        answer = (
            await self.engine.let_go(member_id, doomed) if self.engine is not None else LetGo(False, True)
        )
        for forget in self.forgetters:
            forget(member_id)
        return answer

    async def close(self) -> None:
        """Close what `open` started, newest first."""
        while self._owned:
            await self._owned.pop().close()

    # -- guild settings ---------------------------------------------------------------------------------------
    async def guild_config(self, guild_id: str) -> GuildConfig:
        """The server's settings (defaults: recording off, nothing allowed)."""
        raw = await self.store.guilds.get(guild_id)
        return GuildConfig(
            guild_id=guild_id,
            recording=bool(raw.recording_enabled),
            acknowledged_by=raw.acknowledged_by,
            acknowledged_at=raw.acknowledged_at,
            allowed_channels=frozenset(str(c) for c in raw.channel_allowlist),
            persona_channels=frozenset(str(c) for c in raw.persona_channels),
        )

    async def update_guild(self, guild_id: str, **changes: Any) -> GuildConfig:
        """Apply `changes` (GuildConfig field names) to the server's settings and return the result."""
        names = {"recording": "recording_enabled", "allowed_channels": "channel_allowlist"}
        await self.store.guilds.set(guild_id, **{names.get(k, k): v for k, v in changes.items()})
        return await self.guild_config(guild_id)

    # -- consent and member data ------------------------------------------------------------------------------
    async def scopes(self, member_id: str) -> set[str]:
        """The member's current consent scopes."""
        return set(await self.consent.scopes(member_id))

    async def grant(self, member_id: str, scopes: Sequence[str], actor: str, channel: str) -> None:
        """Grant `scopes` (audited with `channel`)."""
        await self.consent.grant([member_id], list(scopes), actor=actor, channel=channel)

    async def revoke(self, member_id: str, scopes: Sequence[str], actor: str, channel: str) -> None:
        """Revoke `scopes` (audited with `channel`); losing `train` erases content, so in-memory copies go too."""
        try:
            await self.consent.revoke([member_id], list(scopes), actor=actor, channel=channel)
        finally:
            if "train" in scopes:
                self.drop_cached(member_id)

    def drop_cached(self, member_id: str) -> None:
        """Make the engine drop what it holds in memory about a member (retrieval vectors, saved KV states)."""
        if self.engine is not None:
            self.engine.forget(member_id)
        for forget in self.forgetters:
            forget(member_id)

    async def upsert_member(self, member: Member) -> None:
        """Remember a member's names and avatar."""
        await self.store.members.upsert(member)

    async def add_messages(self, messages: Sequence[Message]) -> int:
        """Store messages (duplicates ignored); returns how many were new."""
        result = await self.store.messages.add_many(list(messages))
        return int(result) if isinstance(result, int) else len(messages)

    async def edit_message(self, message_id: str, content: str, edited_at: float) -> None:
        """Mirror an edit of a stored message (no-op if it is not stored)."""
        await self.store.messages.edit(message_id, content, edited_at)

    async def delete_messages(self, message_ids: Sequence[str]) -> None:
        """Mirror deletions (ids that are not stored are ignored)."""
        for message_id in message_ids:
            await self.store.messages.delete(message_id)

    async def import_upload(self, upload: OwnExport, *, live: bool) -> dict[str, Any]:
        """Import a checked upload under the member's consent; a grant made here is withdrawn if nothing imported.

        Consent comes first because the importer stores only `train`-consenting authors; the grant is audited as
        'upload' (the export only) or, with `live`, as 'button' (the member also chose live recording).
        """
        from data.dce_import import import_exports

        member_id = upload.member_id
        before = await self.scopes(member_id)
        await self.grant(member_id, ["train"], actor=member_id, channel="button" if live else "upload")
        try:
            with tempfile.TemporaryDirectory(
                prefix="doppel-upload-"
            ) as tmp:  # outside DOPPEL_HOME, gone afterwards
                path = Path(tmp) / "own-messages.json"
                path.write_bytes(upload.data)
                report = await import_exports(self.store, [path], source="upload", upload_owner=member_id)
            total = report.get("total", {})
            if total.get("failed"):
                errors = [f.get("error") for f in report.get("files", []) if f.get("error")]
                raise BadUpload(f"that file could not be imported: {errors[0] if errors else 'unreadable'}")
        except BaseException:
            if "train" not in before:  # the consent was for this export: it must not outlive a failed import
                await self.revoke(member_id, ["train"], actor=member_id, channel="upload")
            raise
        return {
            "read": upload.read,
            "own": upload.own,
            "others_ignored": upload.read - upload.own,
            "stored": total.get("stored", 0),
            "duplicates": total.get("already_stored", 0) + total.get("duplicates", 0),
        }

    async def export_member(self, member_id: str) -> dict[str, Any]:
        """Everything stored about a member (the same export as `doppel export-data`)."""
        from consent.export import member_export

        return await member_export(self.store, member_id, self.erasure)

    async def forget(self, member_id: str, actor: str) -> dict[str, Any]:
        """Run the erasure cascade and return what was removed."""
        from consent.erasure import forget

        try:
            report = await forget(
                self.store, self.settings, member_id, actor=actor, channel="command", parts=self.erasure
            )
        finally:
            # Even a partly failed cascade must not leave the member's words in the engine's caches.
            self.drop_cached(member_id)
        return report.to_dict()

    async def count_messages(self, member_id: str) -> int:
        """How many consented messages are stored for a member."""
        return int(await self.store.messages.count(author_id=member_id))

    async def rated(self, message_id: str, rater_id: str) -> bool:
        """Whether `rater_id` already rated the persona reply `message_id` (survives restarts)."""
        row = await self.store.fetchone(
            "SELECT 1 FROM feedback WHERE message_id = ? AND rater_id = ? LIMIT 1", (message_id, rater_id)
        )
        return row is not None

    # -- personas and training --------------------------------------------------------------------------------
    async def persona_adapter(self, member_id: str) -> tuple[str, Path] | None:
        """The member's active adapter: its id and llama.cpp GGUF file, or None when none is servable."""
        active = await self.registry.active(member_id)
        if active is None or not active.path or not active.gguf_path.exists():
            return None
        return active.id, active.gguf_path

    async def trainable_members(self, limit: int | None = None, *, untrained: bool = False) -> dict[str, int]:
        """Members with `train` consent and at least `training.min_examples` stored messages, with their counts.

        Most messages first; `untrained` leaves out members with an active persona; `limit` caps the answer, which
        otherwise grows with the community.
        """
        skip = (
            " AND m.author_id NOT IN (SELECT member_id FROM adapters WHERE status = 'active' AND member_id IS NOT NULL)"
            if untrained
            else ""
        )
        rows = await self.store.fetchall(
            "SELECT m.author_id, COUNT(*) FROM messages m "
            f"WHERE m.author_id IN ({TRAIN_HOLDERS})" + skip + " GROUP BY m.author_id HAVING COUNT(*) >= ? "
            "ORDER BY COUNT(*) DESC, m.author_id" + (" LIMIT ?" if limit is not None else ""),
            (self.settings.training.min_examples, *((limit,) if limit is not None else ())),
        )
        return {str(r[0]): int(r[1]) for r in rows}

    async def trainable_count(self, *, untrained: bool = False) -> int:
        """How many members `trainable_members` would list without a limit."""
        skip = (
            " AND m.author_id NOT IN (SELECT member_id FROM adapters WHERE status = 'active' AND member_id IS NOT NULL)"
            if untrained
            else ""
        )
        row = await self.store.fetchone(
            "SELECT COUNT(*) FROM (SELECT m.author_id FROM messages m "
            f"WHERE m.author_id IN ({TRAIN_HOLDERS})" + skip + " GROUP BY m.author_id HAVING COUNT(*) >= ?)",
            (self.settings.training.min_examples,),
        )
        return int(row[0]) if row else 0

    async def member_names(self, member_ids: Sequence[str]) -> dict[str, str]:
        """Display names the store remembers for `member_ids` (one query per 500 ids, not one per member)."""
        ids = list(dict.fromkeys(str(m) for m in member_ids))
        names: dict[str, str] = {}
        for start in range(0, len(ids), 500):  # below SQLite's bound-parameter limit
            chunk = ids[start : start + 500]
            rows = await self.store.fetchall(
                f"SELECT id, display_name FROM members WHERE id IN ({','.join('?' * len(chunk))})",
                tuple(chunk),
            )
            names.update({str(r[0]): str(r[1]) for r in rows})
        return names

    async def chat_allowed(self, member_ids: Sequence[str]) -> set[str]:
        """Which of `member_ids` allowed chat with their persona (one query)."""
        return set(await self.store.with_scope("chat", [str(m) for m in member_ids]))

    def trainer(self) -> Supervisor:
        """The training supervisor (a bot started without one cannot train)."""
        if self.supervisor is None:
            raise RuntimeError("the bot was started without the training supervisor")
        return self.supervisor

    def reply(
        self, persona: PersonaRequest, context: Sequence[Utterance], params: GenParams
    ) -> AsyncIterator[str]:
        """Stream a persona's reply from the engine, after acting on any erasure another process made."""
        if self.engine is None:
            raise RuntimeError("the bot was started without a persona engine")
        return self._checked_reply(self.engine, persona, context, params)

    async def _checked_reply(
        self, engine: PersonaEngine, persona: PersonaRequest, context: Sequence[Utterance], params: GenParams
    ) -> AsyncIterator[str]:
        if self.place is not None:
            await self.place.sync()  # what erasure decided is read from the store when the reply is made
        stream = engine.reply(persona, context, params)
        try:
            async for chunk in stream:
                yield chunk
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()


@dataclass(frozen=True)
class OwnExport:
    """An uploaded export, checked and cut to the uploader's own messages, waiting for their consent (in memory)."""

    member_id: str
    data: bytes  # the export as JSON with only the member's messages
    read: int
    own: int
    channel: str


def only_author(raw: bytes, member_id: str) -> OwnExport:
    """Check a DCE export and keep only `member_id`'s messages (uploads are size-capped, so one json.loads is fine)."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadUpload(
            f"that file is not valid JSON ({exc.__class__.__name__}); export with format JSON"
        ) from None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("messages"), list)
        or not isinstance(data.get("channel"), dict)
    ):
        raise BadUpload("that JSON is not a DiscordChatExporter export (no channel and messages)")
    messages = data["messages"]
    own = [m for m in messages if isinstance(m, dict) and str((m.get("author") or {}).get("id")) == member_id]
    if not own:
        raise BadUpload(
            f"none of the {len(messages)} messages in that export is yours: only your own messages can be uploaded"
        )
    data["messages"] = own
    data["messageCount"] = len(own)
    channel = data["channel"]
    name = str(channel.get("name") or channel.get("id") or "?")
    encoded = json.dumps(data, ensure_ascii=False).encode("utf-8")
    return OwnExport(member_id=member_id, data=encoded, read=len(messages), own=len(own), channel=name)
