"""A run's own figures, logged as artifacts of its MLflow run beside the JSON outputs:
validation bits per byte of every head over training (train), and speedup and bytes per
forward against the heads used (decode-bench). A study's figures comparing runs are the
report's (analysis/plots.py)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402

from bytelm.fileio import atomic_path  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


def val_bpb_by_head(rows: list[dict], n_future: int, path: Path) -> Path | None:
    """Validation bits per byte of each head against training bytes seen, from the
    metrics.jsonl rows of a run; None when it has no validation yet."""
    val = [r for r in rows if "val/bpb/head_1" in r and "train/bytes_seen" in r]
    if not val:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for h in range(1, n_future + 1):
        pts = [(r["train/bytes_seen"], r[f"val/bpb/head_{h}"]) for r in val if f"val/bpb/head_{h}" in r]
        ax.plot(*zip(*pts), marker="o", ms=3, label=f"head {h}" + (" (next byte/token)" if h == 1 else ""))
    ax.set_xlabel("training bytes of text seen")
    ax.set_ylabel("validation bits per byte")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def speedup_by_heads(rows: list[dict], prompts: str, path: Path) -> Path:
    """Speedup and bytes per forward against heads used, one line per batch size (the
    chains of decode-bench's rows; a flagged row is drawn hollow and named in the legend)."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    chains = [r for r in rows if r.get("decoder", "chain") == "chain"]
    for i, batch in enumerate(sorted({r["batch_size"] for r in chains})):
        sel = sorted((r for r in chains if r["batch_size"] == batch), key=lambda r: r["heads_used"])
        best = {}
        for r in sel:  # the fastest attention kernel's row per heads used
            if r["heads_used"] not in best or r["speedup"] > best[r["heads_used"]]["speedup"]:
                best[r["heads_used"]] = r
        sel = [best[k] for k in sorted(best)]
        for ax, key in zip(axes, ("speedup", "bytes_per_forward")):
            ax.plot([r["heads_used"] for r in sel], [r[key] for r in sel], color=f"C{i}", label=f"batch {batch}")
            bad = [r for r in sel if r.get("flags")]
            ax.plot([r["heads_used"] for r in sel if not r.get("flags")], [r[key] for r in sel if not r.get("flags")],
                    "o", color=f"C{i}")
            if bad:
                ax.plot([r["heads_used"] for r in bad], [r[key] for r in bad], "o", mfc="none", color=f"C{i}",
                        label=f"batch {batch}: flagged timing")
    for ax, title in zip(axes, ("speedup over plain decoding", "bytes per forward")):
        ax.set_xlabel("heads used")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].axhline(1.0, color="gray", lw=0.8, ls=":")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"self-speculative decoding, {prompts} prompts", fontsize=9)
    return _save(fig, path)
