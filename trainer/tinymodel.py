"""A tiny random llama + tiny byte-level BPE tokenizer, written as a HF folder and as a float GGUF llama.cpp loads."""

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


def build_model(vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                seed: int = 0) -> Any:
    """A random LlamaForCausalLM small enough to train in seconds on one CPU core."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Larger-than-default init gives peaked logits, so greedy decoding is not decided by float noise.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    return model.float().eval()


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


def write_llama_gguf(model: Any, tokenizer: Any, path: Path, *, dtype: str = "f32", name: str = "tiny") -> None:
    """Write a HF llama model + byte-level BPE tokenizer as a GGUF, with names/permutation as convert_hf_to_gguf.py."""
    import gguf

    cfg = model.config
    info = BaseInfo.from_hf_config(cfg)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    _add_tokenizer(w, tokenizer, cfg.vocab_size)
    state = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    for hf_name, data in state.items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        data = permute_for_gguf(hf_name, data, info)
        # 1-D tensors (norms) stay f32, as llama.cpp's converter keeps them.
        out = data.astype(np.float16) if dtype == "f16" and data.ndim > 1 else data.astype(np.float32)
        w.add_tensor(gguf_tensor_name(hf_name, info), np.ascontiguousarray(out))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _add_tokenizer(w: Any, tokenizer: Any, vocab_size: int) -> None:
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
    w.add_tokenizer_pre("gpt-2")  # the GPT-2 split regex, the same as the HF ByteLevel pre-tokenizer's
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)
    w.add_add_bos_token(False)
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)


def build_tiny(dest: Path, *, seed: int = 0, dtype: str = "f32", hidden: int = 64, layers: int = 2,
               heads: int = 4, kv_heads: int = 2) -> TinyModel:
    """Write the tiny model to `dest/hf` (transformers folder) and `dest/tiny.gguf`."""
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer), hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, seed=seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    hf_dir = dest / "hf"
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    gguf_path = dest / "tiny.gguf"
    write_llama_gguf(model, tokenizer, gguf_path, dtype=dtype)
    return TinyModel(hf_dir=hf_dir, gguf_path=gguf_path)
