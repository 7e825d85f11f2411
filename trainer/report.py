"""After training: held-out perplexity base vs adapter, sample generations through llama.cpp, the activation gate."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from jobspec.config import TrainConfig
from jobspec.verdict import gate
from trainer.evaluation import fidelity_report, perplexity
from trainer.meter import METER


def generate_llama_cpp(
    base_gguf: Path,
    adapter_gguf: Path | None,
    prompts: list[str],
    *,
    max_new_tokens: int,
    stop: list[str],
    seed: int,
    threads: int = 0,
    check: Callable[[], None] | None = None,
) -> list[str]:
    """Greedy replies from llama.cpp, with the exported adapter (proves the GGUF loads and steers) or without.

    `check` runs before each prompt and may raise (a stop ends the evaluation there).
    """
    from llama_cpp import Llama

    kwargs: dict[str, Any] = {"n_threads": threads} if threads else {}
    if adapter_gguf is not None:
        kwargs["lora_path"] = str(adapter_gguf)
    llm = Llama(model_path=str(base_gguf), n_ctx=2048, seed=seed, verbose=False, **kwargs)
    try:
        out = []
        for prompt in prompts:
            if check is not None:
                check()
            res = llm.create_completion(prompt, max_tokens=max_new_tokens, temperature=0.0, stop=stop)
            out.append(str(res["choices"][0]["text"]).strip())  # type: ignore[index]
        return out
    finally:
        llm.close()


def evaluate(
    model: Any,
    tokenizer: Any,
    cfg: TrainConfig,
    data: Any,
    *,
    adapter_gguf: Path | None,
    base_gguf: Path | None,
    check: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Metrics for meta.json: perplexities, generations, fidelity report (if available) and the gate decision.

    `check` runs between batches, prompts and phases and may raise: a stop (SIGTERM) must not wait for the
    whole evaluation, which takes minutes on a CPU; the adapter it evaluates is already saved.
    """
    check = check or (lambda: None)
    rows = list(data.heldout or [])
    if cfg.eval_max_examples:
        rows = rows[: cfg.eval_max_examples]
    metrics: dict[str, Any] = {"heldout_examples": len(rows)}
    if rows:
        METER.enter("perplexity")

        # Scored at the length the adapter was trained at (older context dropped first, as in training): a batch
        # of held-out rows then needs no more than a training micro-batch of the same size.
        def score() -> float:
            return round(perplexity(model, tokenizer, rows, cfg.eval_batch_size, cfg.max_length, check), 4)

        metrics["ppl_adapter"] = score()
        with model.disable_adapter():
            metrics["ppl_base"] = score()
    samples: list[dict[str, str]] = []
    base_replies: list[str] = []
    if rows and cfg.eval_samples > 0 and adapter_gguf is not None and base_gguf is not None:
        from core.chatformat import ChatFormat
        from jobspec.jobdata import job_format

        picked = rows[: cfg.eval_samples]
        # Stop where the job's own format ends a turn (a base without a template was trained in the default one).
        fmt = job_format(cfg) or (ChatFormat.from_tokenizer(tokenizer) if tokenizer.chat_template else None)
        stop = fmt.stop if fmt is not None else [tokenizer.eos_token]
        prompts = [r["prompt"] for r in picked]
        gen: dict[str, Any] = {
            "max_new_tokens": cfg.eval_max_new_tokens,
            "stop": stop,
            "seed": cfg.seed,
            "threads": cfg.threads,
            "check": check,
        }
        METER.enter("generation")
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
    check()
    if cfg.eval_fidelity and samples:
        METER.enter("fidelity")
        metrics["fidelity"] = fidelity_report(
            [s["generated"] for s in samples],
            [s["target"] for s in samples],
            base=base_replies,
            attribution_rows=data.attribution or None,
            member_id=cfg.member_id or None,
            seed=cfg.seed,
        )
    active, reason = gate(metrics)
    metrics["active"] = bool(active)
    metrics["gate_reason"] = str(reason)
    return metrics
