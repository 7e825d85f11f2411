"""Bring your own base model: `add-base` checks the whole path up front; a base without a chat template trains and
chats with one recorded format; HF weights must be the same model as the GGUF they are served on."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import supervision as fx


@pytest.fixture(scope="module")
def plain_base(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A tiny "pretrained" llama: neither its GGUF nor its HF tokenizer carries a chat template."""
    import torch

    from trainer.tinymodel import build_tiny

    torch.set_num_threads(1)
    return build_tiny(tmp_path_factory.mktemp("plain"), chat_template=False)


@pytest.fixture(scope="module")
def other_base(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Another architecture (qwen3), to show a GGUF and HF folder that are not the same model."""
    from trainer.tinymodel import build_tiny

    return build_tiny(tmp_path_factory.mktemp("qwen3"), arch="qwen3")


def doppel(
    home: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    full = {
        **os.environ,
        "DOPPEL_HOME": str(home),
        "DOPPEL_TRAINING__MIN_FREE_DISK_MB": "1",
        "DOPPEL_TRAINING__HEARTBEAT_S": "0.5",
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "doppel", *args], capture_output=True, text=True, env=full, timeout=timeout
    )


def last_json(done: subprocess.CompletedProcess[str]) -> Any:
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_default_chat_format_of_a_gguf_without_template(plain_base: Any, tmp_path: Path) -> None:
    from core.chatformat import CHATML_TEMPLATE, PLAIN_TEMPLATE, ChatFormat

    fmt = ChatFormat.from_gguf(plain_base.gguf_path)
    # The tiny vocabulary has <|im_start|> and <|im_end|>: ChatML, ended by <|im_end|>.
    assert (fmt.template, fmt.eos_token, fmt.source) == (CHATML_TEMPLATE, "<|im_end|>", "default:chatml")
    plain = ChatFormat.from_vocab(["<unk>", "<s>", "</s>", "a"], 2, 1)
    assert (plain.template, plain.eos_token, plain.source) == (PLAIN_TEMPLATE, "</s>", "default:plain")
    msgs = [{"role": "system", "content": "You are Ada."}, {"role": "user", "content": "Bo: hi"}]
    assert plain.prompt(msgs) == "System:\nYou are Ada.</s>\nUser:\nBo: hi</s>\nAssistant:\n"
    assert plain.completion(msgs, "hey :)") == "hey :)</s>"
    with pytest.raises(ValueError, match="ChatML template needs"):
        ChatFormat.from_vocab(["<unk>", "<s>", "</s>"], 2, 1, template="chatml")
    with pytest.raises(ValueError, match="no end-of-sequence token"):
        ChatFormat.from_vocab(["<unk>", "a"], None, None)


def test_add_base_refuses_what_cannot_work(
    doppel_home: Path, plain_base: Any, other_base: Any, tmp_path: Path
) -> None:
    import gguf

    # An architecture the export does not cover: refused at add-base with the reason, not at training time.
    w = gguf.GGUFWriter(str(tmp_path / "moe.gguf"), "qwen3moe")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", __import__("numpy").zeros((4, 8), dtype="float32"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    done = doppel(doppel_home, "personas", "add-base", "moe", str(tmp_path / "moe.gguf"))
    assert (
        done.returncode == 2 and "architecture 'qwen3moe' is not supported: mixture-of-experts" in done.stderr
    )
    assert "Traceback" not in done.stderr
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    done = doppel(doppel_home, "personas", "add-base", "junk", str(tmp_path / "junk.gguf"))
    assert done.returncode == 2 and "not a readable GGUF" in done.stderr
    # A template file that does not render is refused now, not when the first dataset is built.
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}{{ m['content'] }}", encoding="utf-8")
    done = doppel(
        doppel_home,
        "personas",
        "add-base",
        "broken",
        str(plain_base.gguf_path),
        "--template",
        str(tmp_path / "broken.jinja"),
    )
    assert done.returncode == 2 and "does not render a turn" in done.stderr, done.stdout
    done = doppel(doppel_home, "personas", "add-base", "x", str(plain_base.gguf_path), "--template", "nope")
    assert done.returncode == 2 and "neither a template name" in done.stderr
    # HF weights of another model than the GGUF: said so, nothing registered.
    done = doppel(
        doppel_home,
        "personas",
        "add-base",
        "mixed",
        "--hf",
        str(other_base.hf_dir),
        "--gguf",
        str(plain_base.gguf_path),
    )
    assert done.returncode == 2 and "are not the same model: architecture 'qwen3'" in done.stderr
    assert not (doppel_home / "base_models.json").exists()


def test_add_base_hf_and_gguf_of_the_same_model(doppel_home: Path, plain_base: Any, tmp_path: Path) -> None:
    import shutil

    added = last_json(
        doppel(
            doppel_home,
            "personas",
            "add-base",
            "tinyhf",
            "--hf",
            str(plain_base.hf_dir),
            "--gguf",
            str(plain_base.gguf_path),
            "--json",
        )
    )
    assert (
        added["hf_path"] == str(plain_base.hf_dir.resolve()) and added["template_source"] == "default:chatml"
    )
    # Same architecture and shape, another vocabulary: a tokenizer.json whose token 300 is something else.
    other = tmp_path / "hf-other"
    shutil.copytree(plain_base.hf_dir, other)
    state = json.loads((other / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = state["model"]["vocab"]
    token = next(t for t, i in vocab.items() if i == 300)
    vocab["zzz-not-there"] = vocab.pop(token)
    (other / "tokenizer.json").write_text(json.dumps(state), encoding="utf-8")
    done = doppel(
        doppel_home, "personas", "add-base", "bad", "--hf", str(other), "--gguf", str(plain_base.gguf_path)
    )
    assert done.returncode == 2 and "vocabulary differs at 1 token(s), first id 300" in done.stderr
    listed = last_json(doppel(doppel_home, "personas", "bases", "--json"))["bases"]
    row = next(b for b in listed if b["name"] == "tinyhf")
    assert row["ready"] and row["architecture"] == "llama" and row["params"] > 0


@pytest.mark.timeout(600)
def test_base_without_template_trains_and_chats_with_the_recorded_format(
    doppel_home: Path, settings: Any, plain_base: Any
) -> None:
    """add-base (plain role-tagged turns chosen), train a few steps, chat: serving uses meta.json's format."""
    from core.chatformat import PLAIN_TEMPLATE
    from core.settings import Settings
    from inference.engine import Engine

    asyncio.run(fx.seed_member(settings))
    serve = {"DOPPEL_MODEL__BASE_GGUF": str(plain_base.gguf_path)}  # the engine serves this GGUF
    added = last_json(
        doppel(
            doppel_home,
            "personas",
            "add-base",
            "pretrained",
            str(plain_base.gguf_path),
            "--hf",
            str(plain_base.hf_dir),
            "--template",
            "plain",
            "--json",
            env=serve,
        )
    )
    assert added["template_source"] == "chosen:plain"
    sets = []
    for key, value in fx.tiny_overrides(plain_base).items():
        if key not in (
            "max_steps",
            "base_model",
            "base_gguf",
            "base_name",
        ):  # the registered base decides those
            sets += ["--set", f"{key}={json.dumps(value)}"]
    done = doppel(
        doppel_home,
        "train",
        fx.PERSONA_ID,
        "--base",
        "pretrained",
        "--max-steps",
        "4",
        *sets,
        "--json",
        env=serve,
    )
    result = last_json(done)
    assert result["job"]["status"] == "succeeded", result
    adapter_dir = next((doppel_home / "adapters" / fx.PERSONA_ID).iterdir())
    meta = json.loads((adapter_dir / "meta.json").read_text(encoding="utf-8"))
    recorded = meta["chat_format"]
    assert recorded["template"] == PLAIN_TEMPLATE and recorded["source"] == "chosen:plain"
    assert recorded["eos_token"] == "<|im_end|>"
    assert meta["base_model"]["path"] == str(plain_base.hf_dir.resolve())  # trained on the HF weights
    assert meta["base_model"]["gguf"] == str(plain_base.gguf_path.resolve())

    async def serving_format() -> dict[str, str]:
        served = Settings.load(env={"DOPPEL_HOME": str(doppel_home), **serve})
        async with Engine(served) as engine:
            assert engine.base is not None
            return engine.base.format.to_dict()

    assert asyncio.run(serving_format()) == recorded
    chat = doppel(
        doppel_home,
        "chat",
        fx.PERSONA_ID,
        "--mode",
        "adapter",
        "--message",
        "hey, around tonight?",
        "--temperature",
        "0",
        "--json",
        env=serve,
    )
    reply = last_json(chat)
    assert isinstance(reply, dict) and "Traceback" not in chat.stderr


def test_registry_and_exporter_agree_on_architectures() -> None:
    from core import ggufinfo
    from models import bases
    from trainer import export_gguf
    from trainer.tinymodel import ARCHS

    # One declaration in the core serves both; every supported architecture has its parity test.
    assert bases.SUPPORTED_ARCHS is ggufinfo.SUPPORTED_ARCHS and bases.SUPPORTED_ARCHS == ARCHS
    assert bases.HF_TO_GGUF_ARCH is export_gguf.HF_TO_GGUF_ARCH is ggufinfo.HF_TO_GGUF_ARCH
