"""Reading job folders: reaction weights become seeded oversampling."""

from __future__ import annotations

from typing import Any

from jobspec.jobdata import weighted_rows


def test_weights_oversample_in_expectation_and_reproducibly() -> None:
    rows = [{"prompt": f"p{i}", "completion": "c", "weight": 1.5 if i % 2 else 1.0} for i in range(2000)]
    out = weighted_rows(rows, seed=7)
    plain = sum(1 for r in out if r["weight"] == 1.0)
    heavy = sum(1 for r in out if r["weight"] == 1.5)
    assert plain == 1000  # weight 1.0: exactly once
    assert 1400 <= heavy <= 1600  # weight 1.5: 1.5 copies on average
    assert out == weighted_rows(rows, seed=7)
    assert out != weighted_rows(rows, seed=8)


def test_rows_without_weight_are_kept_once() -> None:
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    assert weighted_rows(rows, seed=1) == rows


def test_preference_rows_fit_max_length_by_dropping_old_context(
    tiny_model: Any, tiny_chat_format: Any
) -> None:
    from jobspec.jobdata import fit_pairs, fit_rows
    from trainer.basemodel import load_tokenizer
    from trainer.synthetic import synthetic_rows

    tokenizer = load_tokenizer(tiny_model.hf_dir)

    def length(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    row = max(
        synthetic_rows(40, seed=4, chat_format=tiny_chat_format, long_tail=True),
        key=lambda r: len(r["prompt"]),
    )
    system, *_, last = row["messages"]
    lines = last["content"].split("\n")
    assert len(lines) > 4  # other speakers' lines merged into one user turn, oldest first
    full = length(row["prompt"] + row["completion"])
    rejected = "no. " * 12 + tiny_chat_format.eos_token
    pair = {
        "prompt": row["prompt"],
        "chosen": row["completion"],
        "rejected": rejected,
        "messages": row["messages"],
    }
    longest = max(length(row["completion"]), length(rejected))
    limit = full - 40

    (signal,), lost = fit_rows(
        [
            {
                "prompt": row["prompt"],
                "completion": row["completion"],
                "label": True,
                "messages": row["messages"],
            }
        ],
        tokenizer,
        limit,
    )
    assert lost == 0 and signal["label"] is True and signal["completion"] == row["completion"]
    assert length(signal["prompt"] + signal["completion"]) <= limit < full
    assert (
        system["content"] in signal["prompt"] and lines[-1] in signal["prompt"]
    )  # system prompt, newest line
    assert signal["prompt"].count(lines[0]) < row["prompt"].count(lines[0])  # the oldest line went first

    (fitted,), lost = fit_pairs([pair], tokenizer, limit)
    assert lost == 0 and (fitted["chosen"], fitted["rejected"]) == (row["completion"], rejected)
    assert length(fitted["prompt"]) + longest <= limit  # both replies fit under the shortened prompt
    assert "completion" not in fitted
    # A limit below the system prompt and the last turn cannot be met: the pair is dropped, not truncated.
    assert fit_pairs([pair], tokenizer, 8) == ([], 1)


def test_rows_are_refitted_in_the_jobs_own_format_not_the_tokenizers(tiny_model: Any) -> None:
    from core.chatformat import ChatFormat
    from jobspec.jobdata import fit_rows
    from trainer.basemodel import load_tokenizer
    from trainer.synthetic import synthetic_rows

    tokenizer = load_tokenizer(tiny_model.hf_dir)
    # As for a base trained in the default "plain" format chosen at add-base: not the tokenizer's own template.
    plain = ChatFormat.from_gguf(tiny_model.gguf_path, template="plain")
    own = ChatFormat.from_tokenizer(tokenizer)
    row = max(synthetic_rows(40, seed=4, chat_format=plain, long_tail=True), key=lambda r: len(r["prompt"]))
    marker = own.prompt([{"role": "user", "content": "x"}]).split("x")[0]
    assert marker and marker not in row["prompt"], (
        "the two formats must differ for this test to mean anything"
    )
    full = len(tokenizer(row["prompt"] + row["completion"], add_special_tokens=False)["input_ids"])

    (fitted,), lost = fit_rows([row], tokenizer, full - 30, plain)
    assert lost == 0 and fitted["prompt"] != row["prompt"], "older context was dropped"
    assert fitted["prompt"] == plain.prompt(fitted["messages"]), "re-rendered in the job's format"
    assert marker not in fitted["prompt"]
