"""Tiny random models (llama, qwen2, qwen3, gemma2, gemma3, phi3) + a byte-level BPE tokenizer, as HF folder and GGUF."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainer.export_gguf import BaseInfo, gguf_tensor_name, permute_for_gguf

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# ChatML, as SmolLM2 uses it: the turn ends with <|im_end|> then a newline.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = [
    "You are Ada, a member of this Discord community, chatting in #general.",
    "Write Ada's next message in their own voice: same tone, length, spelling and emoji.",
    "system user assistant continue respond as member style voice",
    "hey everyone whats up, anyone around for a game tonight? lol",
    "omg yes!!! that build is sooo good, i love it :) haha",
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "I think we should meet at 7pm, does that work for you? Let me know.",
    "nah that's not it, try restarting the server and check the logs first",
    "Thanks a lot, this is really helpful! See you tomorrow.",
    "0123456789 ... ,,, !!! ??? @name #channel :D xD <3",
]


@dataclass(frozen=True)
class TinyModel:
    """Where the tiny model was written."""

    hf_dir: Path
    gguf_path: Path


def build_tokenizer(vocab_size: int = 512) -> Any:
    """Train a byte-level BPE tokenizer (GPT-2 regex pre-tokenizer) and wrap it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


ARCHS = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")


def _config(arch: str, vocab_size: int, hidden: int, layers: int, heads: int, kv_heads: int) -> Any:
    """A transformers config of `arch`, sized like the tiny llama, with what makes each architecture itself."""
    import transformers

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    head_dim = hidden // heads
    if arch == "llama":
        return transformers.LlamaConfig(**common, tie_word_embeddings=True)
    if arch == "qwen2":  # q/k/v carry biases
        return transformers.Qwen2Config(**common, tie_word_embeddings=True)
    if arch == "qwen3":  # q/k norms, and a head size that is not hidden/heads
        return transformers.Qwen3Config(**common, head_dim=2 * head_dim, tie_word_embeddings=True)
    if (
        arch == "gemma2"
    ):  # norms store w-1, embeddings scaled by sqrt(hidden), soft-capped logits, sliding window
        return transformers.Gemma2Config(
            **common,
            head_dim=head_dim,
            query_pre_attn_scalar=head_dim,
            sliding_window=512,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            tie_word_embeddings=True,
        )
    if arch == "gemma3":  # as gemma2 plus q/k norms, local/global layers with their own rope bases
        return transformers.Gemma3TextConfig(
            **common,
            head_dim=head_dim,
            query_pre_attn_scalar=head_dim,
            sliding_window=512,
            tie_word_embeddings=True,
        )
    if arch == "phi3":  # fused qkv and gate_up projections, untied output
        return transformers.Phi3Config(
            **common, tie_word_embeddings=False, original_max_position_embeddings=1024
        )
    raise ValueError(f"no tiny model for architecture {arch!r} (known: {', '.join(ARCHS)})")


def build_model(
    vocab_size: int,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    arch: str = "llama",
) -> Any:
    """A random causal LM of `arch` small enough to train in seconds on one CPU core."""
    import torch
    from transformers import AutoModelForCausalLM

    if arch == "gemma3":
        layers = max(layers, 6)  # llama.cpp's gemma3 pattern: 5 sliding-window layers, then a global one
    config = _config(arch, vocab_size, hidden, layers, heads, kv_heads)
    if arch.startswith("gemma"):
        config._attn_implementation = "eager"  # sdpa would ignore gemma2's attention soft-capping
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Larger-than-default init gives peaked logits, so greedy decoding is not decided by float noise. Other
    # architectures' norms and biases are perturbed too, so a wrong norm offset or a dropped bias shows up in
    # the GGUF's outputs (the llama stays as it always was: other tests' expectations are tuned on it).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
            elif arch != "llama" and name.endswith("bias"):
                p.normal_(0.0, 0.05)
            elif arch != "llama" and "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.float().eval()


def _rope_theta(config: Any) -> tuple[float, float | None]:
    """(global rope base, sliding-window layers' base or None), from transformers 5 `rope_parameters`."""
    params = getattr(config, "rope_parameters", None) or {}
    if not isinstance(params, dict):
        return float(getattr(config, "rope_theta", 10000.0)), None
    full = params.get("full_attention", params)
    local = params.get("sliding_attention", {}).get("rope_theta")
    return float(full.get("rope_theta", getattr(config, "rope_theta", 10000.0))), (
        float(local) if local is not None else None
    )


def _norm_shift(arch: str, hf_name: str) -> float:
    # Gemma's RMSNorm multiplies by (1 + w); llama.cpp multiplies by w, so the converter stores w + 1.
    return 1.0 if arch in ("gemma2", "gemma3") and hf_name.endswith("norm.weight") else 0.0


def write_gguf(
    model: Any,
    tokenizer: Any,
    path: Path,
    *,
    dtype: str = "f32",
    name: str = "tiny",
    chat_template: bool = True,
) -> None:
    """Write a HF model + byte-level BPE tokenizer as a GGUF: keys, names, permutation and norms as the converter.

    `chat_template=False` leaves the template out, as in a pretrained (non-instruct) model's GGUF.
    """
    import gguf

    cfg = model.config
    info = BaseInfo.from_hf_config(cfg)
    arch = info.arch
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    if (
        arch != "llama"
    ):  # the converter writes these when config.json names a head_dim (the tiny llama's does not)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch in ("llama", "phi3"):
        w.add_rope_dimension_count(head_dim)
    theta, local_theta = _rope_theta(cfg)
    w.add_rope_freq_base(theta)
    if local_theta is not None:
        w.add_rope_freq_base_swa(local_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch in ("gemma2", "gemma3") and cfg.sliding_window:
        w.add_sliding_window(cfg.sliding_window)
    if getattr(cfg, "attn_logit_softcapping", None):
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
    if getattr(cfg, "final_logit_softcapping", None):
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    if arch == "phi3":
        w.add_rope_scaling_orig_ctx_len(cfg.original_max_position_embeddings)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    # transformers loads a qwen2 folder's tokenizer as Qwen2Tokenizer whatever was saved (its own split regex,
    # digits one by one); llama.cpp's "qwen2" pre-tokenizer is that regex, so both sides tokenize alike.
    pre = "qwen2" if arch == "qwen2" else "gpt-2"
    _add_tokenizer(w, tokenizer, cfg.vocab_size, chat_template=chat_template, pre=pre)
    state = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    for hf_name, data in state.items():
        if hf_name == "lm_head.weight" and (cfg.tie_word_embeddings or arch == "gemma2"):
            continue  # llama.cpp reuses token_embd when output.weight is absent (gemma2 always does)
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        data = permute_for_gguf(hf_name, data, info) + _norm_shift(arch, hf_name)
        # 1-D tensors (norms) stay f32, as llama.cpp's converter keeps them.
        out = data.astype(np.float16) if dtype == "f16" and data.ndim > 1 else data.astype(np.float32)
        w.add_tensor(gguf_tensor_name(hf_name, info), np.ascontiguousarray(out))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


write_llama_gguf = write_gguf  # the name it had when only llama was built


def _add_tokenizer(
    w: Any, tokenizer: Any, vocab_size: int, *, chat_template: bool = True, pre: str = "gpt-2"
) -> None:
    import gguf

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab: dict[str, int] = state["model"]["vocab"]
    for added in state.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    by_id = {i: t for t, i in vocab.items()}
    specials = set(tokenizer.all_special_tokens)
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)  # "gpt-2": the GPT-2 split regex, the same as the HF ByteLevel pre-tokenizer's
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)
    w.add_add_bos_token(False)
    if chat_template and tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)


def build_tiny(
    dest: Path,
    *,
    seed: int = 0,
    dtype: str = "f32",
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    arch: str = "llama",
    chat_template: bool = True,
) -> TinyModel:
    """Write the tiny model to `dest/hf` (transformers folder) and `dest/tiny.gguf`.

    `chat_template=False`: a "pretrained" base, neither the GGUF nor the HF tokenizer carries a template.
    """
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    if not chat_template:
        tokenizer.chat_template = None
    model = build_model(
        len(tokenizer), hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, seed=seed, arch=arch
    )
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    hf_dir = dest / "hf"
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    gguf_path = dest / "tiny.gguf"
    write_gguf(model, tokenizer, gguf_path, dtype=dtype)
    return TinyModel(hf_dir=hf_dir, gguf_path=gguf_path)
