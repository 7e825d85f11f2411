"""The base models adapters are trained on and served over: the default (configured or bundled) and the GGUFs
added with `doppel personas add-base`, listed in DOPPEL_HOME/base_models.json (this module is its one owner)."""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from core.settings import Settings
from models.errors import RegistryError, UnknownBaseModelError

BASES_FILE = "base_models.json"


@dataclass(frozen=True)
class BaseModel:
    """A GGUF base model that adapters are trained on and served over (and optionally HF weights to train on)."""

    name: str
    path: str
    source: str  # bundled | config | user
    sha256: str | None = None
    added_at: float | None = None
    template: str | None = (
        None  # chosen at add-base (name or Jinja text); None: the GGUF's own or the default
    )
    template_source: str | None = None
    hf_path: str | None = None  # HF weights trained on instead of the dequantized GGUF

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Catalog:
    """The base models: the default one first, then the user-added ones by name."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def _bases_path(self) -> Path:
        return self.settings.home / BASES_FILE

    def _user_bases(self) -> dict[str, dict[str, Any]]:
        path = self._bases_path()
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise RegistryError(f"{path}: unreadable ({exc}); fix or delete it") from None
        return dict(data) if isinstance(data, dict) else {}

    def bases(self) -> list[BaseModel]:
        """The default base (configured or bundled) first, then user-added ones by name."""
        found: list[BaseModel] = []
        try:
            default = self.settings.base_gguf_path()
            source = "config" if self.settings.model.base_gguf else "bundled"
            found.append(BaseModel(self.settings.model.base_name, str(default), source))
        except RegistryError:
            raise
        except Exception:
            pass
        for name, row in sorted(self._user_bases().items()):
            if name != self.settings.model.base_name:
                found.append(
                    BaseModel(
                        name=name,
                        path=row["path"],
                        source="user",
                        sha256=row.get("sha256"),
                        added_at=row.get("added_at"),
                        template=row.get("template"),
                        template_source=row.get("template_source"),
                        hf_path=row.get("hf_path"),
                    )
                )
        return found

    def describe(self, model: BaseModel) -> dict[str, Any]:
        """`doppel personas bases`: architecture, size, template source and whether the base is ready, with why not."""
        from models.bases import check_gguf

        row: dict[str, Any] = {
            **model.to_dict(),
            "architecture": None,
            "params": None,
            "file_bytes": None,
            "ready": False,
            "problem": None,
        }
        try:
            check = check_gguf(Path(model.path), model.template, model.template_source)
        except RegistryError as exc:
            row["problem"] = str(exc)
            return row
        row.update(
            architecture=check.shape.architecture,
            params=check.shape.params,
            file_bytes=check.shape.file_bytes,
            template_source=check.template_source,
            ready=True,
        )
        if model.hf_path and not (Path(model.hf_path) / "config.json").is_file():
            row.update(ready=False, problem=f"HF weights folder {model.hf_path} is gone")
        return row

    def base(self, name: str | None = None) -> BaseModel:
        """A base model by name (None: the default)."""
        wanted = name or self.settings.model.base_name
        for model in self.bases():
            if model.name == wanted:
                return model
        known = ", ".join(m.name for m in self.bases()) or "none"
        raise UnknownBaseModelError(f"no base model named {wanted!r} (known: {known})")

    def add_base(
        self, name: str, path: Path, *, template: str | None = None, hf: Path | None = None
    ) -> BaseModel:
        """Register a GGUF base model under `name`, validated up front (see models.bases); hashed once.

        `template`: `--template NAME|FILE` (ChatML / plain turns, or a Jinja file) for a GGUF whose own template
        is missing or unwanted. `hf`: a transformers folder of the same model, trained on instead of the GGUF.
        """
        from models.bases import check_gguf, check_same_model, template_argument

        if not name or "/" in name or name.startswith("."):
            raise RegistryError(f"invalid base model name {name!r}")
        if name == self.settings.model.base_name:
            raise RegistryError(f"{name!r} is the default base model's name; pick another")
        path = path.expanduser().resolve()
        chosen, source = template_argument(template)
        check = check_gguf(path, chosen, source)
        hf_path = None
        if hf is not None:
            hf = hf.expanduser().resolve()
            check_same_model(hf, path, check.shape)
            hf_path = str(hf)
        model = BaseModel(
            name,
            str(path),
            "user",
            file_sha256(path),
            time.time(),
            template=chosen,
            template_source=check.template_source,
            hf_path=hf_path,
        )
        data = self._user_bases()
        data[name] = {
            "path": model.path,
            "sha256": model.sha256,
            "added_at": model.added_at,
            "template": chosen,
            "template_source": check.template_source,
            "hf_path": hf_path,
            "architecture": check.shape.architecture,
            "params": check.shape.params,
        }
        write_json_atomic(self._bases_path(), data)
        return model


def template_for_path(settings: Settings, gguf: Path) -> tuple[str | None, str | None]:
    """(template, source) chosen at add-base for the base registered with this GGUF file; (None, None) if none.

    The inference engine serves a GGUF by path; this is how it finds the template the trainer was given.
    """
    path = settings.home / BASES_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except (OSError, json.JSONDecodeError):
        return None, None
    wanted = str(gguf.expanduser().resolve())
    for row in data.values() if isinstance(data, dict) else []:
        if isinstance(row, dict) and row.get("path") == wanted and row.get("template"):
            return str(row["template"]), row.get("template_source")
    return None, None


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temp file and a rename: a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
