"""The loss-curve PNG of an adapter folder (matplotlib, headless Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def loss_png(
    path: Path,
    train: Sequence[tuple[int, float]],
    title: str = "",
    stages: Sequence[tuple[str, Sequence[tuple[int, float]]]] = (),
) -> None:
    """Plot training loss against step (plus optional later stages, e.g. KTO) and save as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    series = [("sft", train), *stages]
    for label, points in series:
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, label=label, linewidth=1.4)
    if not any(points for _, points in series):
        ax.text(0.5, 0.5, "no loss recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(str(path))
