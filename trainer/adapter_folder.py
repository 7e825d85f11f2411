"""The adapter folder (PEFT files, adapter.gguf, meta.json, loss.png), staged in a temp folder and renamed into place."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from jobspec.errors import ExportError
from trainer.export_gguf import BaseInfo, export_lora_gguf

REQUIRED = ("adapter_config.json", "adapter_model.safetensors", "adapter.gguf", "meta.json", "loss.png")


class StagedAdapter:
    """A half-built adapter folder next to its final place; `publish()` renames it in, `discard()` removes it."""

    def __init__(self, final: Path) -> None:
        self.final = final
        final.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))

    def save_peft(self, model: Any, info: BaseInfo, *, gguf_dtype: str = "f32") -> dict[str, Any]:
        """PEFT files, then the GGUF conversion of exactly those files."""
        model.save_pretrained(str(self.path), safe_serialization=True)
        return export_gguf(self.path, self.path / "adapter.gguf", info, gguf_dtype=gguf_dtype)

    def write_meta(self, meta: dict[str, Any]) -> None:
        """meta.json, with the creation time."""
        meta = {"created_at": round(time.time(), 3), **meta}
        (self.path / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")

    def publish(self, *, require_gguf: bool = True) -> Path:
        """Check the folder is complete and rename it over `final` (the old one, if any, is removed after).

        `require_gguf=False`: the GGUF conversion failed after training; the PEFT files are kept all the same.
        """
        required = REQUIRED if require_gguf else tuple(n for n in REQUIRED if n != "adapter.gguf")
        missing = [name for name in required if not (self.path / name).exists()]
        if missing:
            raise ExportError(f"adapter folder incomplete, missing {', '.join(missing)}")
        old: Path | None = None
        if self.final.exists():
            old = self.final.with_name(f".{self.final.name}.old-{int(time.time() * 1000)}")
            self.final.rename(old)
        self.path.rename(self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.final

    def discard(self) -> None:
        """Remove the staging folder (after a failure)."""
        shutil.rmtree(self.path, ignore_errors=True)


def export_gguf(
    adapter_dir: Path, out: Path, info: BaseInfo, *, gguf_dtype: str = "f32", simulate_failure: bool = False
) -> dict[str, Any]:
    """The GGUF conversion of a PEFT folder's files; any failure is one `ExportError` line (no half file is left)."""
    try:
        if simulate_failure:
            raise ExportError("GGUF export failed: simulated (simulate_export_failure)")
        return export_lora_gguf(adapter_dir, out, info, dtype=gguf_dtype)
    except ExportError:
        out.unlink(missing_ok=True)
        raise
    except Exception as exc:  # the gguf writer raises plain errors; the job must fail with one line
        out.unlink(missing_ok=True)
        raise ExportError(f"GGUF export failed: {type(exc).__name__}: {exc}") from None
