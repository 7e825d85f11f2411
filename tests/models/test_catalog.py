"""The base-model catalog: the default base first, user-added GGUFs checked and hashed once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from core.settings import bundled_base_gguf
from models.catalog import Catalog, template_for_path
from models.errors import ModelFileError, UnknownBaseModelError


def test_base_models_bundled_and_user_added(settings: Any, tmp_path: Path) -> None:
    bundled = bundled_base_gguf()
    if bundled is None:
        pytest.skip("bundled base model not installed")
    catalog = Catalog(settings)
    default = catalog.base()
    assert default.name == settings.model.base_name and default.source == "bundled"
    added = catalog.add_base("second", bundled, template="chatml")
    assert added.sha256 and len(added.sha256) == 64
    assert [b.name for b in catalog.bases()] == [settings.model.base_name, "second"]
    assert catalog.base("second").path == str(bundled.resolve())
    # The engine serves a GGUF by path and finds the template chosen at add-base through it.
    assert template_for_path(settings, bundled)[0] == added.template
    with pytest.raises(UnknownBaseModelError, match="known: smollm2-135m, second"):
        catalog.base("nope")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(ModelFileError, match="not a readable GGUF"):
        catalog.add_base("junk", junk)
