"""`doppel bench inference --quick` runs end to end and reports engine and raw figures side by side."""

from __future__ import annotations

import argparse

import pytest


@pytest.mark.slow
@pytest.mark.timeout(2700)  # may build llama-server first (about 8 minutes on 2 cores, once)
def test_quick_bench_reports_engine_next_to_raw(tune, base_gguf) -> None:
    from doppel.benchinference import inference
    from tests.helpers.llama_server import server_binary

    server_binary()  # built once (cached): the bench then runs the server backend beside the engine
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
    served = result["server"]
    for label in ("base", "adapter"):
        assert served[label]["server"]["ttft_s"] > 0 and served[label]["server"]["decode_chunks_per_s"] > 0
    assert served["alternating"]["server_alternating_ttft_s"] > 0
