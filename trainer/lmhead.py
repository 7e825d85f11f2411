"""The SFT loss off-GPU: the LM head projects only the positions that carry a label.

TRL's fused LM head scores only labelled positions where Triton runs (CUDA, XPU); elsewhere it scores every
position of the batch against the whole vocabulary, in torch, with its entropy and top-1 statistics. Persona rows are
mostly context (a reply is ~15% of the tokens), so on a CPU that spent a third of each step in the head, on positions
whose loss is thrown away. `SFTTrainer` here keeps TRL's path where Triton runs and takes the compact one elsewhere.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from trl import SFTTrainer
from trl.kernels.chunked_logprob import _use_triton

from jobspec.memory import head_chunk

# Configs that change the logits after the projection: those models keep TRL's own head, which applies them.
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


def compact_loss_applies(model: Any, device: torch.device) -> bool:
    """Whether the compact head serves this model on this device (no Triton, no logit transform)."""
    if _use_triton(device):
        return False
    text_config = model.config.get_text_config()
    if getattr(text_config, "output_router_logits", False):  # MoE: TRL's path adds the router's aux loss
        return False
    return all(getattr(text_config, name, None) is None for name in _LOGIT_TRANSFORMS)


def _chunk_loss(
    lm_head: Any, hidden: torch.Tensor, wanted: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits = lm_head(hidden).float()
    loss_sum = F.cross_entropy(logits, wanted, reduction="sum")
    with torch.no_grad():
        log_p = torch.log_softmax(logits, dim=-1)
        entropy = -(log_p.exp() * log_p).sum()
        correct = (logits.argmax(-1) == wanted).sum()
    return loss_sum, entropy, correct


def _head_loss(
    lm_head: Any, hidden: torch.Tensor, labels: torch.Tensor, num_items_in_batch: Any
) -> dict[str, Any]:
    from torch.utils.checkpoint import checkpoint

    targets = labels[:, 1:]
    mask = targets != -100
    # Boolean indexing keeps the graph connected even when nothing is labelled: the loss is then a differentiable 0.
    picked = hidden[:, :-1][mask]
    wanted = targets[mask]
    size = head_chunk(int(lm_head.weight.shape[0]))
    loss_sum = picked.sum() * 0.0
    entropy = torch.zeros((), device=picked.device)
    correct = torch.zeros((), dtype=torch.long, device=picked.device)
    for start in range(0, picked.shape[0], size):
        # Each chunk's logits are recomputed in the backward pass instead of kept: one chunk's at a time.
        part = checkpoint(
            _chunk_loss,
            lm_head,
            picked[start : start + size],
            wanted[start : start + size],
            use_reentrant=False,
        )
        loss_sum = loss_sum + part[0]
        entropy = entropy + part[1]
        correct = correct + part[2]
    count = mask.sum()
    denominator = count if num_items_in_batch is None else num_items_in_batch
    return {
        "loss": loss_sum / torch.as_tensor(denominator).clamp(min=1),
        "count": count,
        "entropy_sum": entropy,
        "correct": correct,
    }


class PersonaSFTTrainer(SFTTrainer):
    """TRL's SFTTrainer, with the compact LM-head loss where TRL's own would score every position."""

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """The loss of one micro-batch; TRL's where Triton runs, the compact one elsewhere."""
        device = inputs["input_ids"].device
        if return_outputs or not model.training or not compact_loss_applies(model, device):
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        labels = inputs["labels"]
        backbone_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        hidden = causal_lm.get_decoder()(**backbone_inputs, use_cache=False).last_hidden_state
        out = _head_loss(causal_lm.get_output_embeddings(), hidden, labels, num_items_in_batch)
        loss = out["loss"]
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        # The same metrics TRL logs, so the job's logs read the same on either path.
        valid = int(out["count"])
        metrics = self._metrics["train"]
        metrics["entropy"].append(float(out["entropy_sum"]) / valid if valid else 0.0)
        metrics["mean_token_accuracy"].append(int(out["correct"]) / valid if valid else 0.0)
        if "attention_mask" in inputs:
            self._total_train_tokens += int(inputs["attention_mask"].sum())
        else:
            self._total_train_tokens += int(inputs["position_ids"].size(1))
        metrics["num_tokens"] = [self._total_train_tokens]
        return loss
