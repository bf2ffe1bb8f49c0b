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


# Heads whose logits are computed and backpropagated together in the memory-efficient
# order: as many as fit in this many logits per position (one 32k-vocabulary head, or
# every head of a byte model with V = 258). Peak memory stays that of one large-vocabulary
# head, while small-vocabulary heads share one matmul and one cross-entropy kernel.
LOGITS_PER_GROUP = 32768


@dataclass
class StepLoss:
    total: float  # Σ_i w_i · loss_i
    per_head: list[float]  # mean CE (nats per target) of each head


def _norm_unembed_nll(h: torch.Tensor, norm_weight: torch.Tensor, eps: float, unembedding: torch.Tensor,
                      vocab: int, targets: torch.Tensor) -> torch.Tensor:
    """Per-row NLL of softmax(W · rmsnorm(h)) (0 where the target is ignored). One
    function so that torch.compile can fuse the norm, the upcast and the log-sum-exp
    instead of materialising float32 copies of the logits."""
    logits = F.linear(F.rms_norm(h, (h.shape[-1],), norm_weight, eps), unembedding)
    # float32 for the softmax: bf16 logits lose too much precision in the log-sum-exp.
    return F.cross_entropy(upcast(logits).reshape(-1, vocab), targets, ignore_index=IGNORE, reduction="none")


_compiled_nll = None


def _nll_fn(compiled: bool):
    global _compiled_nll
    if not compiled:
        return _norm_unembed_nll
    if _compiled_nll is None:
        _compiled_nll = torch.compile(_norm_unembed_nll, dynamic=False)
    return _compiled_nll


def head_groups(n: int, vocab: int) -> list[tuple[int, int]]:
    g = max(1, LOGITS_PER_GROUP // vocab)
    return [(a, min(a + g, n)) for a in range(0, n, g)]


def _group_loss(model: MTPTransformer, a: int, b: int, z: torch.Tensor, y: torch.Tensor, compiled: bool):
    """Mean CE of heads a..b-1, as a (b-a,) tensor. (Through `model.head_group`, so that
    under FSDP the parameters it reads are gathered: see MTPTransformer.head_group.)"""
    targets = y[..., a:b].reshape(-1)
    nll = model.head_group(a, b, z, _nll_fn(compiled), model.cfg.vocab_size, targets)
    counts = (targets != IGNORE).view(-1, b - a).sum(0).clamp(min=1)
    return nll.view(-1, b - a).sum(0) / counts


def loss_and_backward(
    model: MTPTransformer,
    x: torch.Tensor,
    y: torch.Tensor,
    weights: list[float],
    mode: str = "memory_efficient",
    scale: float = 1.0,
    autocast: contextlib.AbstractContextManager | None = None,
    compiled: bool = False,
) -> StepLoss:
    """Computes the weighted multi-token loss of one micro-batch and accumulates
    `scale ×` its gradient into the parameters' .grad (scale = 1/accumulation steps)."""
    ctx = autocast or contextlib.nullcontext()
    n = len(weights)

    def weighted(losses: torch.Tensor, a: int, b: int) -> torch.Tensor:
        return (torch.tensor(weights[a:b], device=losses.device, dtype=losses.dtype) * losses).sum()

    if mode == "naive":
        with ctx:
            losses = _group_loss(model, 0, n, model.trunk(x), y, compiled)
            total = weighted(losses, 0, n)
        (total * scale).backward()
        return StepLoss(float(total.detach()), losses.detach().tolist())
    if mode != "memory_efficient":
        raise ValueError(f"unknown loss mode {mode!r}")
    with ctx:
        z = model.trunk(x)
    z_detached = z.detach().requires_grad_(True)
    per_head = []
    for a, b in head_groups(n, model.cfg.vocab_size):
        with ctx:
            losses = _group_loss(model, a, b, z_detached, y, compiled)
        # Backward now: this group's logits and their gradient are freed before the next.
        (weighted(losses, a, b) * scale).backward()
        per_head += losses.detach().tolist()
    z.backward(z_detached.grad)
    return StepLoss(sum(wi * l for wi, l in zip(weights, per_head)), per_head)


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
