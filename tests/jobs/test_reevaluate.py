"""Evaluating a saved adapter again: with the config it was trained with, in the prompt style it was trained in."""

from __future__ import annotations

import pytest

from core.chatformat import DEFAULT_STYLE
from jobs.reevaluate import evaluation_config
from jobspec.errors import EvaluationError

TRAINED = {"base_model": "m.gguf", "member_id": "1", "max_steps": 7, "simulate_eval_failure": "crash"}


def test_an_adapter_is_evaluated_in_the_prompt_style_it_was_trained_in() -> None:
    plain = evaluation_config("a1", {"training_config": {**TRAINED, "prompt_style": "plain"}})
    assert plain.prompt_style == "plain" and plain.max_steps == 7
    assert plain.simulate_eval_failure == "", "the original job's test hooks do not fire again"
    legacy = evaluation_config("a2", {"training_config": dict(TRAINED)})
    assert legacy.prompt_style == "persona" != DEFAULT_STYLE, "recorded before the field: the persona prompt"
    later = evaluation_config("a3", {"training_config": {**TRAINED, "a_field_from_a_later_release": 1}})
    assert later.max_steps == 7
    with pytest.raises(EvaluationError, match="adapter a4 has no training configuration"):
        evaluation_config("a4", {})
