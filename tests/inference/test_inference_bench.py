"""`doppel bench inference --quick` runs end to end and reports engine and raw figures side by side."""

from __future__ import annotations

import argparse

import pytest


@pytest.mark.slow
def test_quick_bench_reports_engine_next_to_raw(tune, base_gguf) -> None:
    from doppel.benchinference import inference

    settings = tune(n_ctx=512, n_threads=1)
    result = inference(settings, argparse.Namespace(quick=True))
    for label in ("base", "adapter"):
        row = result[label]
        assert row["raw"]["decode_tokens_per_s"] > 0 and row["engine"]["decode_tokens_per_s"] > 0
        assert row["engine"]["ttft_s"] > 0 and row["throughput_ratio"] > 0
    alt = result["alternating"]
    # Alternating personas restore their saved KV state instead of prefilling the whole prompt again.
    assert alt["engine_alternating"]["kv_restores"] >= 2
    assert set(result["targets"]) == {"engine_vs_raw_throughput", "alternating_vs_one_persona_ttft"}
    assert (settings.cache_dir / "bench" / "bench_a.gguf").is_file()
