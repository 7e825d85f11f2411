"""After training: held-out perplexity base vs adapter, sample generations through llama.cpp, the activation gate."""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Any

from trainer.config import TrainConfig


def completion_nll(model: Any, tokenizer: Any, rows: list[dict[str, Any]], batch_size: int = 4) -> tuple[float, int]:
    """Summed negative log-likelihood of each row's completion given its prompt, and the number of tokens scored."""
    import torch

    device = next(model.parameters()).device
    total, count = 0.0, 0
    model.eval()
    for i in range(0, len(rows), max(batch_size, 1)):
        batch = rows[i : i + batch_size]
        seqs, starts = [], []
        for row in batch:
            p = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            c = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
            seqs.append(p + c)
            starts.append(len(p))
        width = max(len(s) for s in seqs)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        labels = torch.full((len(seqs), width), -100, dtype=torch.long)
        for j, (s, start) in enumerate(zip(seqs, starts, strict=True)):
            ids[j, : len(s)] = torch.tensor(s)
            mask[j, : len(s)] = 1
            labels[j, start : len(s)] = torch.tensor(s[start:])
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
        shift_labels = labels[:, 1:].reshape(-1).to(device)
        nll = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
        total += float(nll)
        count += int((shift_labels != -100).sum())
    return total, count


def perplexity(model: Any, tokenizer: Any, rows: list[dict[str, Any]], batch_size: int = 4) -> float:
    """Per-token perplexity of the completions (the member's real replies, end-of-turn token included)."""
    evaluation = _evaluation_module()
    if evaluation is not None and hasattr(evaluation, "perplexity"):
        return float(evaluation.perplexity(model, tokenizer, rows, batch_size))
    total, count = completion_nll(model, tokenizer, rows, batch_size)
    return math.exp(total / count) if count else float("nan")


def _evaluation_module() -> Any:
    # trainer.evaluation (the fidelity metrics) is optional here: the recipes still report perplexity without it.
    try:
        return importlib.import_module("trainer.evaluation")
    except ImportError:
        return None


def generate_llama_cpp(base_gguf: Path, adapter_gguf: Path | None, prompts: list[str], *, max_new_tokens: int,
                       stop: list[str], seed: int, threads: int = 0) -> list[str]:
    """Greedy replies from llama.cpp, with the exported adapter (proves the GGUF loads and steers) or without."""
    from llama_cpp import Llama

    kwargs: dict[str, Any] = {"n_threads": threads} if threads else {}
    if adapter_gguf is not None:
        kwargs["lora_path"] = str(adapter_gguf)
    llm = Llama(model_path=str(base_gguf), n_ctx=2048, seed=seed, verbose=False, **kwargs)
    try:
        out = []
        for prompt in prompts:
            res = llm.create_completion(prompt, max_tokens=max_new_tokens, temperature=0.0, stop=stop)
            out.append(str(res["choices"][0]["text"]).strip())  # type: ignore[index]
        return out
    finally:
        llm.close()


def evaluate(model: Any, tokenizer: Any, cfg: TrainConfig, data: Any, *, adapter_gguf: Path | None,
             base_gguf: Path | None) -> dict[str, Any]:
    """Metrics for meta.json: perplexities, generations, fidelity report (if available) and the gate decision."""
    rows = list(data.heldout or [])
    if cfg.eval_max_examples:
        rows = rows[: cfg.eval_max_examples]
    metrics: dict[str, Any] = {"heldout_examples": len(rows)}
    if rows:
        metrics["ppl_adapter"] = round(perplexity(model, tokenizer, rows, cfg.eval_batch_size), 4)
        with model.disable_adapter():
            metrics["ppl_base"] = round(perplexity(model, tokenizer, rows, cfg.eval_batch_size), 4)
    samples: list[dict[str, str]] = []
    base_replies: list[str] = []
    if rows and cfg.eval_samples > 0 and adapter_gguf is not None and base_gguf is not None:
        from doppel.chatformat import ChatFormat

        picked = rows[: cfg.eval_samples]
        stop = ChatFormat.from_tokenizer(tokenizer).stop if tokenizer.chat_template else [tokenizer.eos_token]
        prompts = [r["prompt"] for r in picked]
        gen: dict[str, Any] = {"max_new_tokens": cfg.eval_max_new_tokens, "stop": stop, "seed": cfg.seed, "threads": cfg.threads}
        replies = generate_llama_cpp(base_gguf, adapter_gguf, prompts, **gen)
        base_replies = generate_llama_cpp(base_gguf, None, prompts, **gen)
        samples = [
            {"target": str(r.get("target", "")), "generated": g, "base": b}
            for r, g, b in zip(picked, replies, base_replies, strict=True)
        ]
        metrics["generated_by"] = "llama.cpp"
    # Only generations leave this function: the real held-out replies are member content, which must not be
    # copied into meta.json or job events (the adapter folder lives outside the job folder's dataset).
    metrics["samples"] = [{"generated": x["generated"], "base": x["base"]} for x in samples]
    evaluation = _evaluation_module()
    if cfg.eval_fidelity and evaluation is not None and hasattr(evaluation, "fidelity_report") and samples:
        try:
            metrics["fidelity"] = evaluation.fidelity_report(
                [s["generated"] for s in samples], [s["target"] for s in samples], base=base_replies,
                attribution_rows=data.attribution or None, member_id=cfg.member_id or None, seed=cfg.seed,
            )
        except TypeError:
            metrics["fidelity"] = None  # a signature this recipe was not written against; perplexity still stands
    if evaluation is not None and hasattr(evaluation, "gate"):
        active, reason = evaluation.gate(metrics)
    else:
        active, reason = gate(metrics)
    metrics["active"] = bool(active)
    metrics["gate_reason"] = str(reason)
    return metrics


def gate(metrics: dict[str, Any]) -> tuple[bool, str]:
    """Fallback activation rule: the adapter must beat the base model's held-out perplexity."""
    base, adapter = metrics.get("ppl_base"), metrics.get("ppl_adapter")
    if base is None or adapter is None:
        return False, "no held-out examples to compare against the base model"
    if not (math.isfinite(base) and math.isfinite(adapter)):
        return False, "held-out perplexity is not finite"
    if adapter < base:
        return True, f"held-out perplexity {adapter:.2f} beats the base model's {base:.2f}"
    return False, f"held-out perplexity {adapter:.2f} does not beat the base model's {base:.2f}"
