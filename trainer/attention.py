"""Padding-free attention without a varlen kernel: one causal SDPA call per packed example.

Padding-free batches concatenate a micro-batch into one row. With SDPA, transformers keeps the examples apart with a
block-diagonal mask over the whole row, so attention costs (sum of lengths)^2 instead of the sum of squares, and the
mask keeps SDPA off its causal fast path. Flash-attention's varlen kernel does the right thing on CUDA; this does the
same with plain SDPA wherever that kernel is missing (CPUs, GPUs without flash-attn).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

NAME = "doppel_segments"


def segment_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each example of a packed row (`cu_seq_lens_q` from TRL's collator); else plain SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_seq_lens = kwargs.pop("cu_seq_lens_q", None)
    for name in ("cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx"):
        kwargs.pop(name, None)
    # Only a single packed row whose keys are its queries (training, no cache) is split; anything else is SDPA's.
    if cu_seq_lens is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    bounds = [int(b) for b in cu_seq_lens.tolist()]
    parts = [
        sdpa_attention_forward(
            module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, is_causal=True, **kwargs
        )[0]
        for a, b in zip(bounds[:-1], bounds[1:], strict=False)
        if b > a
    ]
    return torch.cat(parts, dim=1), None


def register() -> None:
    """Make `doppel_segments` an attention implementation transformers can select (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, segment_attention)
    # The mask still serves the fallback (padded batches, evaluation); a packed row's mask goes unused.
    AttentionMaskInterface.register(NAME, sdpa_mask)


@contextlib.contextmanager
def segments_for(model: Any, enabled: bool) -> Iterator[None]:
    """Train `model` with per-example attention over packed rows, restoring its own implementation afterwards."""
    previous = getattr(model.config, "_attn_implementation", None)
    if not enabled or previous not in ("sdpa", "eager", None):
        yield
        return
    register()
    model.set_attn_implementation(NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous or "sdpa")
