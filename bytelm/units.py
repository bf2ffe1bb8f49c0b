"""Numbers as people read them, and the hardware peak the suite measures against."""

from __future__ import annotations

import math

# Dense bf16 datasheet peak FLOP/s per GPU, by a name its device name contains: for MFU,
# and for a sweep's estimate of its training time. (H100 SXM: 989 too.)
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def human(x: float | None, unit: str = "") -> str:
    """1234567 -> '1.23M' (parameters, training bytes and FLOPs span many orders of
    magnitude); '–' for a missing or non-finite value."""
    if x is None or not math.isfinite(x):
        return "–"
    for div, suffix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}{unit}"
    return f"{x:.3g}{unit}"
