"""The transformers callback every recipe uses: progress events, cancellation within a step, the OOM test hook."""

from __future__ import annotations

import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from core.hostshare import ServingPause, ThreadGovernor
from jobspec.config import TrainConfig
from jobspec.errors import StepAbandoned
from jobspec.events import Emitter


def host_share(cfg: TrainConfig) -> dict[str, Any]:
    """JobCallback's share of the host: its thread governor, and its pause for persona replies (when enabled)."""
    folder = Path(cfg.share_dir) if cfg.share_dir else None
    governor = ThreadGovernor(folder, cfg.threads, adapt=cfg.adapt_threads)
    return {
        "governor": governor,
        # The engine's CPU while the trainer sleeps is not contention: left out of what the governor measures,
        # so the steps between replies get the cores back instead of sizing themselves to the replies.
        "pause": ServingPause(folder, meter=governor.meter)
        if folder is not None and cfg.yield_to_serving
        else None,
    }


GATE_ATTR = "_doppel_layer_gate"


class LayerGate:
    """What runs after each transformer block, forward and backward: the serving pause, and a cancelled step's end.

    A step takes seconds (about 8 s for SmolLM2-135M on 2 cores), longer than a stop may wait (`docker stop`: 10 s
    for the whole process). The weights change only when the optimizer steps, which no hook runs inside, so at any
    hook the model is exactly the last finished step's: the rest of the step can be dropped and that step saved.
    """

    def __init__(self, pause: ServingPause | None = None) -> None:
        self.pause = pause
        self.cancel: threading.Event | None = None
        # Only inside trainer.train(): the evaluation after training runs through the same hooks and is not a step.
        self.armed = False

    def stopping(self) -> bool:
        """Whether the current step is to be abandoned."""
        return self.armed and self.cancel is not None and self.cancel.is_set()

    def wait(self) -> None:
        """Between two blocks: end the step when cancelled, else step aside while a persona reply is made."""
        if self.stopping():
            raise StepAbandoned("cancelled mid-step")
        if self.pause is not None:
            self.pause.wait(until=self.stopping)
            if self.stopping():
                raise StepAbandoned("cancelled mid-step")


def pause_between_layers(model: Any, pause: ServingPause | LayerGate) -> list[Any]:
    """Hooks that call `pause.wait()` after each transformer block, forward and backward; returns their handles."""
    import torch

    def backward(grad: Any) -> None:
        pause.wait()  # returns None: the gradient is untouched

    def forward(module: Any, args: Any, output: Any) -> None:
        pause.wait()
        first = output[0] if isinstance(output, (tuple, list)) and output else output
        if isinstance(first, torch.Tensor) and first.requires_grad:
            first.register_hook(backward)

    blocks = [child for m in model.modules() if isinstance(m, torch.nn.ModuleList) for child in m]
    return [block.register_forward_hook(forward) for block in blocks]


def peak_mem_mb() -> float:
    """Peak accelerator memory on CUDA, else the process's peak resident set, in MiB."""
    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is KiB on Linux but bytes on macOS.
    return round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1)


class JobCallback(TrainerCallback):
    """Reports progress as job events, ends the step when cancelled (see `train`), and can simulate a CUDA OOM once."""

    def __init__(
        self,
        emitter: Emitter,
        cancel: threading.Event,
        *,
        stage: str = "sft",
        oom_at_step: int = 0,
        oom_marker: Path | None = None,
        governor: ThreadGovernor | None = None,
        pause: ServingPause | None = None,
    ) -> None:
        self.emitter = emitter
        self.governor = governor
        self.pause = pause
        self.cancel = cancel
        self.stage = stage
        self.oom_at_step = oom_at_step
        self.oom_marker = oom_marker
        self.cancelled = False
        self.gate: LayerGate | None = None
        self._t0 = 0.0
        self._step0 = 0
        self._tokens0 = 0
        self._tokens_at_step = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._t0 = time.monotonic()
        self._step0 = state.global_step
        self._tokens0 = self._tokens_at_step = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        model = kwargs.get("model")
        if model is not None:
            # Inside each step, not only between steps: a step takes seconds, a reply's prefill or a stop's grace
            # a fraction of one. Once per model, and kept after training: the evaluation that follows yields the
            # same way (the gate is disarmed then: only a training step is ever abandoned).
            gate = getattr(model, GATE_ATTR, None)
            if gate is None:
                gate = LayerGate(self.pause)
                pause_between_layers(model, gate)
                setattr(model, GATE_ATTR, gate)
            elif gate.pause is None:
                gate.pause = self.pause
            else:
                self.pause = gate.pause
            gate.cancel = self.cancel
            gate.armed = True
            self.gate = gate

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.gate is not None:
            self.gate.armed = False

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.governor is None:
            return
        import torch

        # Serving and other jobs come and go: each step runs on the cores free now (the step itself yields to
        # them at once through the trainer's scheduling class; this keeps its threads from waiting on each other).
        threads = self.governor.choose()
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.oom_at_step and state.global_step == self.oom_at_step and not self._oom_fired():
            if self.oom_marker is not None:
                self.oom_marker.write_text(str(state.global_step), encoding="utf-8")
            import torch

            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated by simulate_oom_at_step)")
        self._tokens_at_step = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        if self.cancel.is_set():
            # Save so `--resume` continues from exactly here, then leave the loop at this step boundary.
            self.cancelled = True
            control.should_save = True
            control.should_training_stop = True

    def train(self, trainer: Any, **kwargs: Any) -> None:
        """`trainer.train(**kwargs)`, which a cancel ends at the next block, saved at the last finished step.

        `self.cancelled` then says so, as it does for a cancel seen at a step boundary.
        """
        try:
            trainer.train(**kwargs)
        except StepAbandoned:
            self.abandoned(trainer)
        finally:
            if self.gate is not None:
                self.gate.armed = False

    def abandoned(self, trainer: Any) -> None:
        """The step under way was dropped (`StepAbandoned`): save the last finished step, as `--resume` expects."""
        self.cancelled = True
        state = trainer.state
        folder = Path(trainer.args.output_dir) / f"checkpoint-{state.global_step}"
        if state.global_step == 0 or (folder / "trainer_state.json").exists():
            return  # nothing trained yet, or that step was saved already: a resume starts from there
        # The dropped step's micro-batches were counted as seen; the resume trains them again.
        state.num_input_tokens_seen = self._tokens_at_step
        # What the training loop itself calls at a save step (model, optimizer, scheduler, RNG, trainer state);
        # transformers has no public call that writes a resumable checkpoint.
        trainer._save_checkpoint(trainer.model, trial=None)

    def _oom_fired(self) -> bool:
        return self.oom_marker is not None and self.oom_marker.exists()

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        logs = logs or {}
        if "loss" not in logs:
            return
        elapsed = max(time.monotonic() - self._t0, 1e-6)
        done = max(state.global_step - self._step0, 1)
        tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0) - self._tokens0
        remaining = max(state.max_steps - state.global_step, 0)
        extra = {
            k: v
            for k, v in logs.items()
            if k.startswith(("rewards/", "kl", "logps/")) and isinstance(v, float)
        }
        self.emitter.emit(
            "progress",
            stage=self.stage,
            step=state.global_step,
            total=state.max_steps,
            loss=round(float(logs["loss"]), 5),
            lr=logs.get("learning_rate"),
            tokens_per_s=round(tokens / elapsed, 1) if tokens else None,
            eta_s=round(elapsed / done * remaining, 1),
            peak_mem_mb=peak_mem_mb(),
            threads=self._threads(),
            tokens_seen=int(getattr(state, "num_input_tokens_seen", 0) or 0),
            paused_s=round(self.pause.paused_s, 2) if self.pause is not None else None,
            **extra,
        )

    def _threads(self) -> int:
        import torch

        return int(torch.get_num_threads())


def loss_points(log_history: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, loss) pairs from a trainer's log history (it includes the steps before a resume)."""
    seen: dict[int, float] = {}
    for entry in log_history:
        if "loss" in entry and "step" in entry:
            seen[int(entry["step"])] = float(entry["loss"])
    return sorted(seen.items())


def last_checkpoint(checkpoints: Path) -> Path | None:
    """The newest `checkpoint-N` folder that has its trainer state, or None."""
    if not checkpoints.is_dir():
        return None
    found = [
        p
        for p in checkpoints.iterdir()
        if p.is_dir()
        and p.name.startswith("checkpoint-")
        and p.name[11:].isdigit()
        and (p / "trainer_state.json").exists()
    ]
    return max(found, key=lambda p: int(p.name[11:]), default=None)


class CountingCollator:
    """Wraps a data collator to count real vs padded tokens: the padding fraction the batching achieves."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.real = 0
        self.padded = 0

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        batch = self.inner(features)
        mask = batch.get("attention_mask")
        ids = batch["input_ids"]
        self.padded += int(ids.numel())
        self.real += int(mask.sum()) if mask is not None else int(ids.numel())
        return batch

    @property
    def padding_fraction(self) -> float:
        """Share of the tokens in the batches that were padding."""
        return round(1.0 - self.real / self.padded, 4) if self.padded else 0.0
