"""How much memory a LoRA job needs, from the base's shape and the job's config: arithmetic only.

The pre-flight (parent side) refuses a job that cannot fit; the trainer child reports the same estimate next to
its measured peak (`trainer.meter`). Both import this module, which depends on nothing but its own constants.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

GIB = 1024**3
MIB = 1024**2
# Python, torch, transformers, TRL and the tokenizer in the trainer child before the first weight.
RUNTIME_OVERHEAD = int(0.5 * GIB)
# Floats per token of the one block being recomputed and differentiated at a time in training (over hidden and MLP
# width; fitted to `doppel bench memory`, where a checkpointed step's growth is mostly the head and the kept block
# inputs) and of one block's forward in evaluation (no gradients).
ACT_H, ACT_INTER = 8, 4
EVAL_H, EVAL_INTER = 8, 3
LOADING_COPIES = 1.6  # converting a GGUF base: the float weights and the transient copies transformers makes
HEAD_COPIES = 4
VOCAB_SLACK = 0.25  # a chunk's logits, their log-softmax, its gradient, the statistics' softmax
LLAMA_BUFFERS = 96 * MIB
EMBEDDER = 400 * MIB
# Bytes of float32 logits one chunk of positions may take in the LM head (training and perplexity): the head's
# memory is then fixed by the vocabulary, not by how many reply tokens a batch holds (Qwen's 151,936-token
# vocabulary makes 2,048 positions 1.2 GB a copy).
HEAD_CHUNK_BYTES = 128 * MIB


def head_chunk(vocab: int) -> int:
    """Positions per chunk of the LM head: HEAD_CHUNK_BYTES of float32 logits."""
    return max(16, HEAD_CHUNK_BYTES // (4 * max(1, vocab)))


# all-MiniLM-L6-v2 through sentence-transformers, its torch buffers and the classifier


def estimate_memory(shape: Any, config: Any, device: str) -> int:
    """Bytes a LoRA job needs at its peak: the larger of its training and its evaluation (`memory_breakdown`)."""
    return memory_breakdown(shape, config, device)["peak"]


def memory_breakdown(shape: Any, config: Any, device: str) -> dict[str, int]:
    """Bytes of the job's phases and its peak; none of it depends on the community's size.

    CPU (measured per phase by `doppel bench memory`, BENCHMARKS.md): the process's runtime, the float32 weights
    once, the LoRA weights with their gradients and two Adam moments, and the largest of: a training micro-batch
    (every block's input kept, one block's intermediates recomputed at a time, the LM head a chunk of positions at
    a time: `trainer.lmhead`), the held-out perplexity batch (no gradients, one block at a time, the head in
    chunks), llama.cpp generating from the base GGUF (mapped file + KV cache), or the sentence embedder.
    CUDA (not measured here: no GPU was available): 4-bit or bf16 weights on the device, activations in bf16.
    """
    cuda = device.startswith("cuda")
    if cuda:
        return _cuda_breakdown(shape, config)
    parts = memory_parts(shape, config)
    training = parts["runtime"] + parts["weights"] + parts["lora"] + parts["train_batch"]
    evaluation = parts["runtime"] + parts["weights"] + parts["lora"] + parts["eval_extra"]
    out = {"training": training, "evaluation": evaluation, "peak": max(training, evaluation)}
    if str(getattr(config, "base_model", "")).endswith(".gguf"):
        # A GGUF base is dequantized once into a float folder (cached): its tensors and their float copies.
        out["loading"] = parts["runtime"] + int(LOADING_COPIES * parts["weights"])
        out["peak"] = max(out["peak"], out["loading"])
    return out


def _dims(shape: Any) -> tuple[int, int, int, int, int]:
    """(hidden, layers, vocab, MLP width, key/value width) of a base; the MLP width from the parameter count."""
    h, layers, vocab = max(shape.hidden, 1), max(shape.layers, 1), max(shape.vocab, 1)
    per_layer = max(0.0, (shape.params - vocab * h) / layers)
    # Attention holds q and o (h x h each) and grouped k / v (taken as h x h/4 each: 2.5 h^2 in all).
    inter = max(h, int((per_layer - 2.5 * h * h) / (3 * h)))
    kv = max(1, h // 4)
    return h, layers, vocab, inter, kv


def lora_params(shape: Any, config: Any) -> int:
    """Trainable LoRA parameters: r x (in + out) for every targeted projection of every block."""
    h, layers, _, inter, kv = _dims(shape)
    sizes = {
        "q_proj": 2 * h,
        "k_proj": h + kv,
        "v_proj": h + kv,
        "o_proj": 2 * h,
        "gate_proj": h + inter,
        "up_proj": h + inter,
        "down_proj": h + inter,
    }
    per_layer = sum(sizes.get(t, h + inter) for t in config.target_modules)
    return int(layers * config.lora_r * per_layer)


def memory_parts(shape: Any, config: Any, tokens: int = 0) -> dict[str, int]:
    """The CPU job's items in bytes: runtime, weights, LoRA state, a training micro-batch, evaluation's extra.

    `tokens`: the tokens of a micro-batch; 0 takes the bound (micro-batch x max_length), as pre-flight must.
    """
    h, layers, vocab, inter, kv = _dims(shape)
    b, s = config.micro_batch_size, config.max_length
    t = tokens or b * s
    weights = shape.params * 4
    lora = lora_params(shape, config) * 16  # float32 weight, gradient and two Adam moments
    kept = layers * t * h * 4  # each block's input, kept for its recomputation
    one_block = t * (ACT_H * h + ACT_INTER * inter) * 4
    if not getattr(config, "gradient_checkpointing", True):
        kept, one_block = layers * one_block, 0
    head = HEAD_COPIES * head_chunk(vocab) * vocab * 4 + 3 * t * h * 4
    # Measured beyond the items above, growing with the vocabulary (Qwen's 151,936 more than SmolLM2's 49,152):
    # allocator and autograd slack around the tied embedding / head, not traced to one tensor yet.
    slack = VOCAB_SLACK * vocab * h * 4
    train_batch = kept + one_block + head + slack
    eb = max(1, int(getattr(config, "eval_batch_size", 4) or 4))
    te = eb * s
    ppl = te * (EVAL_H * h + EVAL_INTER * inter) * 4 + 3 * head_chunk(vocab) * vocab * 4 + eb * s * s
    extra = ppl
    gguf = _gguf_bytes(config)
    if getattr(config, "eval_samples", 4) > 0 and gguf:
        n_ctx = 2048
        llama = gguf + 2 * layers * n_ctx * 2 * kv * 2 + 512 * vocab * 4 + LLAMA_BUFFERS
        extra = max(extra, llama)
    if getattr(config, "eval_fidelity", True) and gguf:
        extra = max(extra, EMBEDDER)
    return {
        "runtime": RUNTIME_OVERHEAD,
        "weights": int(weights),
        "lora": int(lora),
        "train_batch": int(train_batch),
        "eval_extra": int(extra),
    }


def floor_bytes(shape: Any, config: Any, tokens: int) -> int:
    """What training cannot do without: the weights once, the LoRA state, one micro-batch of `tokens`' activations."""
    parts = memory_parts(shape, config, tokens)
    return parts["weights"] + parts["lora"] + parts["train_batch"]


def _cuda_breakdown(shape: Any, config: Any) -> dict[str, int]:
    # The CPU items with the device's number formats: NF4 (~0.56 bytes a parameter with its scales) or bf16
    # weights, bf16 activations; llama.cpp and the embedder of the evaluation run in host memory, beside it.
    parts = memory_parts(shape, config)
    weights = int(shape.params * (0.56 if config.quantize_4bit else 2))
    train_batch = parts["train_batch"] // 2
    ppl_only = memory_parts(shape, dataclasses.replace(config, eval_samples=0, eval_fidelity=False))
    training = parts["runtime"] + weights + parts["lora"] + train_batch
    evaluation = parts["runtime"] + weights + parts["lora"] + ppl_only["eval_extra"] // 2
    return {"training": training, "evaluation": evaluation, "peak": max(training, evaluation)}


def _gguf_bytes(config: Any) -> int:
    for candidate in (getattr(config, "base_gguf", ""), getattr(config, "base_model", "")):
        if str(candidate).endswith(".gguf"):
            try:
                return Path(str(candidate)).stat().st_size
            except OSError:
                continue
    return 0
