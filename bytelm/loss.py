"""The multi-token loss L = Σ_i w_i · CE(head_i(z_t), x_{t+i}) and its two orders.

Targets come from the shard reader (`y[b, t, i] = x_{t+i+1}`, or -100 where the target
lies in another document), so no head ever learns across a document boundary.

`memory_efficient` is the paper's order (§2, Fig. 2): forward the trunk once, detach its
output z, then for each head forward → loss → backward at once into z's gradient, so only
one head's logits (B·T·V floats) are alive at a time; finally one backward through the
trunk with the accumulated gradient. `naive` builds one graph with every head's logits.
Both give the same loss and the same gradients (tests/test_loss.py).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bytelm.model import MTPTransformer, upcast

IGNORE = -100


@dataclass
class StepLoss:
    total: float  # Σ_i w_i · loss_i
    per_head: list[float]  # mean CE (nats per target) of each head


def _head_ce(model: MTPTransformer, i: int, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model.head_logits(i, z)
    # float32 for the softmax: bf16 logits lose too much precision in the log-sum-exp.
    return F.cross_entropy(upcast(logits).flatten(0, 1), y[..., i].flatten(), ignore_index=IGNORE)


def loss_and_backward(
    model: MTPTransformer,
    x: torch.Tensor,
    y: torch.Tensor,
    weights: list[float],
    mode: str = "memory_efficient",
    scale: float = 1.0,
    autocast: contextlib.AbstractContextManager | None = None,
) -> StepLoss:
    """Computes the weighted multi-token loss of one micro-batch and accumulates
    `scale ×` its gradient into the parameters' .grad (scale = 1/accumulation steps)."""
    ctx = autocast or contextlib.nullcontext()
    n = len(weights)
    if mode == "naive":
        with ctx:
            z = model.trunk(x)
            losses = [_head_ce(model, i, z, y) for i in range(n)]
            total = sum(w * l for w, l in zip(weights, losses))
        (total * scale).backward()
        return StepLoss(float(total.detach()), [float(l.detach()) for l in losses])
    if mode != "memory_efficient":
        raise ValueError(f"unknown loss mode {mode!r}")
    with ctx:
        z = model.trunk(x)
    z_detached = z.detach().requires_grad_(True)
    per_head = []
    for i in range(n):
        with ctx:
            loss_i = _head_ce(model, i, z_detached, y)
        # Backward now: head i's logits and their gradient are freed before head i+1.
        (loss_i * (weights[i] * scale)).backward()
        per_head.append(float(loss_i.detach()))
    z.backward(z_detached.grad)
    return StepLoss(sum(w * l for w, l in zip(weights, per_head)), per_head)


@dataclass
class HeadStats:
    """Sums over an evaluation set, per head (0-based index)."""

    nll: list[float]  # nats
    correct: list[int]
    targets: list[int]
    target_bytes: list[int]  # UTF-8 bytes of text the targets stand for

    @classmethod
    def zeros(cls, n: int) -> "HeadStats":
        return cls([0.0] * n, [0] * n, [0] * n, [0] * n)

    def metrics(self, prefix: str = "val") -> dict[str, float]:
        out: dict[str, float] = {}
        for i in range(len(self.nll)):
            h = i + 1
            out[f"{prefix}/loss/head_{h}"] = self.nll[i] / max(self.targets[i], 1)
            out[f"{prefix}/bpb/head_{h}"] = self.nll[i] / math.log(2) / max(self.target_bytes[i], 1)
            out[f"{prefix}/acc/head_{h}"] = self.correct[i] / max(self.targets[i], 1)
        out[f"{prefix}/loss"] = out[f"{prefix}/loss/head_1"]
        out[f"{prefix}/bpb"] = out[f"{prefix}/bpb/head_1"]
        return out


@torch.no_grad()
def accumulate_head_stats(
    model: MTPTransformer,
    x: torch.Tensor,
    y: torch.Tensor,
    byte_lengths: torch.Tensor,
    stats: HeadStats,
    autocast: contextlib.AbstractContextManager | None = None,
) -> None:
    """Adds one batch's per-head NLL, accuracy and byte counts to `stats`.

    Bits per byte (DESIGN.md): summed NLL over ln 2 over the UTF-8 bytes of the targets.
    For a byte model every target is one byte (EOS: zero bytes); for a token model each
    target counts the bytes of its token. So the two arms compare on the same text."""
    ctx = autocast or contextlib.nullcontext()
    with ctx:
        z = model.trunk(x)
    for i in range(len(stats.nll)):
        with ctx:
            logits = upcast(model.head_logits(i, z))
        t = y[..., i]
        valid = t != IGNORE
        nll = F.cross_entropy(logits.flatten(0, 1), t.flatten(), ignore_index=IGNORE, reduction="sum")
        stats.nll[i] += float(nll)
        stats.correct[i] += int(((logits.argmax(-1) == t) & valid).sum())
        stats.targets[i] += int(valid.sum())
        stats.target_bytes[i] += int(byte_lengths[t.clamp(min=0)][valid].sum())
