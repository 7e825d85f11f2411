"""What the bot adapts to Discord, built once: the owners it hands out (store, consent, jobs, registry, supervisor,
engine) and the few rules of its own (server recording settings, uploads, the "ready to train" list, erasure reaching
this process's memory)."""

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


class Closing(Protocol):
    """What `Services.open` starts and `Services.close` stops (store, supervisor, engine, serving place)."""

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
    """The owners (store, consent, jobs, registry, supervisor, engine) every handler calls, and the bot's own rules."""

    settings: Settings
    store: Store
    consent: ConsentService
    # The erasure parts and export sections, handed over by the composition root (`doppel.erasure`).
    erasure: ErasureParts
    supervisor: Supervisor | None = None
    engine: PersonaEngine | None = None
    registry: Registry = field(init=False)
    jobs: JobTable = field(init=False)
    _owned: list[Closing] = field(default_factory=list, repr=False)
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

    # -- erasure reaches this process's memory ---------------------------------------------------------------
    async def revoke(self, member_id: str, scopes: Sequence[str], actor: str, channel: str) -> None:
        """Revoke `scopes` (audited with `channel`); losing `train` erases content, so in-memory copies go too."""
        try:
            await self.consent.revoke([member_id], list(scopes), actor=actor, channel=channel)
        finally:
            if "train" in scopes:
                self.drop_cached(member_id)

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

    def drop_cached(self, member_id: str) -> None:
        """Make the engine drop what it holds in memory about a member (retrieval vectors, saved KV states)."""
        if self.engine is not None:
            self.engine.forget(member_id)
        for forget in self.forgetters:
            forget(member_id)

    # -- uploads ----------------------------------------------------------------------------------------------
    async def import_upload(self, upload: OwnExport, *, live: bool) -> dict[str, Any]:
        """Import a checked upload under the member's consent; a grant made here is withdrawn if nothing imported.

        Consent comes first because the importer stores only `train`-consenting authors; the grant is audited as
        'upload' (the export only) or, with `live`, as 'button' (the member also chose live recording).
        """
        from data.dce_import import import_exports

        member_id = upload.member_id
        before = await self.consent.scopes(member_id)
        await self.consent.grant(
            [member_id], ["train"], actor=member_id, channel="button" if live else "upload"
        )
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

    # -- personas and training --------------------------------------------------------------------------------
    async def trainable_members(self, limit: int | None = None, *, untrained: bool = False) -> dict[str, int]:
        """The "ready to train" list: members with `train` consent and at least `training.min_examples` stored
        messages, with their counts, most first; `untrained` leaves out members with an active persona."""
        skip = await self.registry.persona_members() if untrained else set[str]()
        return await self.store.messages.train_ready(
            self.settings.training.min_examples, excluding=skip, limit=limit
        )

    async def trainable_count(self, *, untrained: bool = False) -> int:
        """How many members `trainable_members` would list without a limit."""
        skip = await self.registry.persona_members() if untrained else set[str]()
        return await self.store.messages.count_train_ready(
            self.settings.training.min_examples, excluding=skip
        )

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
