"""``metrics.png``: the curves of a ``metrics.jsonl`` (loss, learning rate, throughput, top-1).

matplotlib (``pip install 'fastvit[train]'``) with the Agg backend, so it works on a headless node.
"""

from __future__ import annotations

__all__ = ["plot_metrics"]


def plot_metrics(records: list, path: str, title: str = "") -> str:
    """Draw ``records`` (``metrics.jsonl`` lines) into the PNG ``path``; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    (ax_loss, ax_lr), (ax_speed, ax_top1) = axes

    if steps:
        ax_loss.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1, alpha=0.7, label="steps")
    if epochs:
        ax_loss.plot([r["step"] for r in epochs], [r["loss"] for r in epochs], "o-", label="epoch mean")
    ax_loss.set(title="training loss", xlabel="step")
    ax_loss.legend(loc="best")

    lr_points = steps or epochs
    ax_lr.plot([r["step"] for r in lr_points], [r["lr"] for r in lr_points], color="tab:green")
    ax_lr.set(title="learning rate", xlabel="step")

    ax_speed.plot([r["step"] for r in lr_points], [r["img_per_s"] for r in lr_points], color="tab:orange")
    ax_speed.set(title="throughput (images/s, all ranks)", xlabel="step")

    top1 = [r for r in epochs if r.get("val_top1") is not None]
    if top1:
        ax_top1.plot([r["epoch"] for r in top1], [r["val_top1"] for r in top1], "o-", color="tab:red")
        ax_top1.set(title="validation top-1 (%)", xlabel="epoch")
    else:
        ax_top1.set_title("validation top-1: no --val-data")
        ax_top1.axis("off")
    for ax in (ax_loss, ax_lr, ax_speed, ax_top1):
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
