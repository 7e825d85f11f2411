"""Job-folder fixtures (a pytest plugin of the root conftest): the tiny model (HF folder + GGUF) built once per session,
and a factory of job folders with a synthetic persona, for the trainer child's tests and the control plane's alike."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.supervision import tiny_overrides
from trainer.synthetic import PERSONA, PERSONA_ID, synthetic_rows


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tiny random llama + tokenizer: `.hf_dir` and `.gguf_path` (float32, llama.cpp-loadable)."""
    import torch

    from trainer.tinymodel import build_tiny

    torch.set_num_threads(1)
    return build_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_chat_format(tiny_model: Any) -> Any:
    from core.chatformat import ChatFormat

    return ChatFormat.from_gguf(tiny_model.gguf_path)


@pytest.fixture(scope="session")
def persona_rows() -> Callable[..., list[dict[str, Any]]]:
    """`persona_rows(n, seed, chat_format)`: synthetic persona rows (see trainer.synthetic)."""
    return synthetic_rows


@pytest.fixture
def make_job(tmp_path: Path, tiny_model: Any, tiny_chat_format: Any) -> Callable[..., Path]:
    """Write a job folder (config.json + dataset/) for the tiny model; keyword arguments override TrainConfig."""
    from jobspec.config import TrainConfig

    def make(
        name: str = "job",
        *,
        n_train: int = 24,
        n_heldout: int = 6,
        preference: bool = False,
        **overrides: Any,
    ) -> Path:
        job = tmp_path / name
        (job / "dataset").mkdir(parents=True)
        cfg = {
            **tiny_overrides(tiny_model),
            "member_id": PERSONA_ID,
            "persona_name": PERSONA,
            "eval_samples": 2,
            "eval_max_new_tokens": 12,
            "pref_steps": 3,
            "pref_learning_rate": 5e-3,
        }
        del cfg["eval_max_examples"]  # a job folder made here evaluates every held-out row it has
        cfg.update(overrides)
        TrainConfig.from_dict(cfg).to_json(job / "config.json")
        rows = synthetic_rows(n_train + n_heldout, seed=7, chat_format=tiny_chat_format)
        splits = {"train": rows[:n_train], "val": rows[n_train : n_train + 2], "heldout": rows[n_train:]}
        for split, split_rows in splits.items():
            with (job / "dataset" / f"{split}.jsonl").open("w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in split_rows)
        if preference:
            # Rows in jobs.dataset's preference shape: unpaired KTO signals and DPO pairs.
            bad = "Thank you for your message. I will respond formally." + tiny_chat_format.eos_token
            with (job / "dataset" / "preference.jsonl").open("w", encoding="utf-8") as fh:
                for r in rows[:12]:
                    for completion, label in ((r["completion"], True), (bad, False)):
                        fh.write(
                            json.dumps(
                                {
                                    "kind": "kto",
                                    "prompt": r["prompt"],
                                    "completion": completion,
                                    "label": label,
                                    "members": r["members"],
                                }
                            )
                            + "\n"
                        )
                    fh.write(
                        json.dumps(
                            {
                                "kind": "dpo",
                                "prompt": r["prompt"],
                                "chosen": r["completion"],
                                "rejected": bad,
                                "members": r["members"],
                            }
                        )
                        + "\n"
                    )
        lineage = sorted({m for r in rows[:n_train] for m in r["members"]})
        meta = {
            "member": PERSONA_ID,
            "lineage": lineage,
            "window": [rows[0]["ts"], rows[n_train - 1]["ts"]],
            "counts": {k: len(v) for k, v in splits.items()},
        }
        (job / "dataset" / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
        return job

    return make
