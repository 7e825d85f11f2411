"""How much memory a LoRA job needs, from the base's shape and the job's config: arithmetic only.

The pre-flight (parent side) refuses a job that cannot fit; the trainer child reports the same estimate next to
its measured peak. Both import this module, which depends on nothing but the trainer's own constants.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

GIB = 1024**3
MIB = 1024**2
# Python, torch and tokenizer overhead of a training process before the first tensor.
RUNTIME_OVERHEAD = int(1.2 * GIB)


def estimate_memory(shape: Any, config: Any, device: str) -> int:
    """Bytes a LoRA job needs at its peak: the larger of its training and its evaluation (`memory_breakdown`)."""
    return memory_breakdown(shape, config, device)["peak"]


def memory_breakdown(shape: Any, config: Any, device: str) -> dict[str, int]:
    """Bytes of the job's two phases and its peak; none of it depends on the community's size.

    Training: frozen weights + LoRA state + activations + logits + runtime overhead. CPU: fp32 weights, no
    checkpointing. CUDA: 4-bit weights when `quantize_4bit`, bf16 activations, and gradient checkpointing keeps
    roughly one layer's activations alive instead of all of them.
    Evaluation: the same weights, held-out perplexity batches (their logits dominate), llama.cpp generating from
    the base GGUF (mapped file + KV cache + logits), the sentence embedder and the attribution classifier, whose
    size is fixed by its panel (`trainer.attribution`), not by how many members the server has.
    """
    from trainer.attribution import N_FEATURES, PANEL_OTHERS

    cuda = device.startswith("cuda")
    b, s = config.micro_batch_size, config.max_length
    h, layers, vocab = max(shape.hidden, 1), max(shape.layers, 1), max(shape.vocab, 1)
    heads = max(shape.heads, 1)
    weight_bytes = 0.56 if cuda and config.quantize_4bit else (2 if cuda else 4)
    act_bytes = 2 if cuda else 4
    weights = shape.params * weight_bytes
    # LoRA on the attention and MLP projections: ~ r * (in + out) per matrix, weights + grads + two Adam moments.
    lora = layers * len(config.target_modules) * config.lora_r * (h + 4 * h) * 4 * 4
    per_layer = b * s * h * 34 * act_bytes / 2 + 5 * b * heads * s * s * act_bytes / 2
    kept_layers = 2 if (cuda and config.gradient_checkpointing) else layers
    activations = per_layer * kept_layers
    logits = 3 * b * s * vocab * 4  # logits, their softmax and gradient, in fp32 for the loss
    training = int(weights + lora + activations + logits + RUNTIME_OVERHEAD)
    eb = max(1, int(getattr(config, "eval_batch_size", 4) or 4))
    # No gradients: one layer's activations at a time, plus the logits and their fp32 copy for the loss.
    ppl = eb * s * h * 8 * act_bytes + 2 * eb * s * vocab * 4
    evaluation = weights + lora + ppl + RUNTIME_OVERHEAD
    if not cuda:  # on a GPU host these run in host memory, beside the device's budget
        gguf = _gguf_bytes(config)
        n_ctx = 2048
        kv = (
            2 * layers * n_ctx * h * 2
        )  # f16 K and V for every layer (an upper bound with grouped-query heads)
        llama = gguf + kv + 512 * vocab * 4 + 64 * MIB
        embedder = 160 * MIB if getattr(config, "eval_fidelity", True) else 0
        classifier = 3 * (PANEL_OTHERS + 1) * N_FEATURES * 8  # weights, idf and liblinear's working copy
        evaluation += llama + embedder + classifier
    evaluation = int(evaluation)
    return {"training": training, "evaluation": evaluation, "peak": max(training, evaluation)}


def _gguf_bytes(config: Any) -> int:
    for candidate in (getattr(config, "base_gguf", ""), getattr(config, "base_model", "")):
        if str(candidate).endswith(".gguf"):
            try:
                return Path(str(candidate)).stat().st_size
            except OSError:
                continue
    return 0
