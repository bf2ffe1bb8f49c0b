"""The multi-token loss L = Σ_i w_i · CE(head_i(z_t), x_{t+i}) and its two orders.

Targets come from the shard reader (`y[b, t, i] = x_{t+i+1}`, or -100 where the target
lies in another document), so no head ever learns across a document boundary.

`memory_efficient` is the paper's order (§2, Fig. 2): forward the trunk once, detach its
output z, then for each head forward → loss → backward at once into z's gradient, so only
one head's logits (B·T·V floats) are alive at a time; finally one backward through the
trunk with the accumulated gradient. `naive` builds one graph with every head's logits.
Both give the same loss and the same gradients (tests/test_model_loss.py).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

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
    per_head: list[float]  # mean CE (nats per target) of each head; nan for a head the step skipped


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


def head_groups(n: int, vocab: int, weights: list[float] | None = None) -> list[tuple[int, int]]:
    """Ranges [a, b) of heads whose logits are computed together: runs of consecutive
    heads with a nonzero weight (all n heads without `weights`), cut to fit
    LOGITS_PER_GROUP. A zero-weight head is in none."""
    g = max(1, LOGITS_PER_GROUP // vocab)
    live = [weights is None or weights[i] != 0 for i in range(n)]
    out, i = [], 0
    while i < n:
        if not live[i]:
            i += 1
            continue
        j = i
        while j < n and live[j] and j - i < g:
            j += 1
        out.append((i, j))
        i = j
    return out


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
    `scale ×` its gradient into the parameters' .grad (scale = 1/accumulation steps).
    Heads of weight 0 are skipped: neither their logits nor their backward are computed
    (sequential heads: those before the last nonzero weight still give their state to
    the next head)."""
    if mode not in ("memory_efficient", "naive"):
        raise ValueError(f"unknown loss mode {mode!r}")
    ctx = autocast or contextlib.nullcontext()
    n = len(weights)
    per_head = [math.nan] * n
    groups = head_groups(n, model.cfg.vocab_size, weights)
    if model.heads.sequential:
        groups = [(i, i + 1) for a, b in groups for i in range(a, b)]  # each head has its own state

    def weighted(losses: torch.Tensor, a: int, b: int) -> torch.Tensor:
        return (torch.tensor(weights[a:b], device=losses.device, dtype=losses.dtype) * losses).sum()

    def total() -> float:
        return sum(weights[i] * per_head[i] for a, b in groups for i in range(a, b))

    if not groups:
        return StepLoss(0.0, per_head)
    if mode == "naive":
        with ctx:
            z = model.trunk(x)
            if model.heads.sequential:
                inputs = dict(model.head_inputs(z, y, groups[-1][1]))
                losses = torch.cat([_group_loss(model, a, b, inputs[a], y, compiled) for a, b in groups])
            else:
                losses = torch.cat([_group_loss(model, a, b, z, y, compiled) for a, b in groups])
            live = [i for a, b in groups for i in range(a, b)]
            loss = (torch.tensor([weights[i] for i in live], device=losses.device, dtype=losses.dtype) * losses).sum()
        (loss * scale).backward()
        for i, v in zip(live, losses.detach().tolist()):
            per_head[i] = v
        return StepLoss(float(loss.detach()), per_head)
    with ctx:
        z = model.trunk(x)
    z_detached = z.detach().requires_grad_(True)
    if model.heads.sequential:
        _sequential_backward(model, z_detached, y, weights, groups, scale, ctx, compiled, per_head)
    else:
        for a, b in groups:
            with ctx:
                losses = _group_loss(model, a, b, z_detached, y, compiled)
            # Backward now: this group's logits and their gradient are freed before the next.
            (weighted(losses, a, b) * scale).backward()
            per_head[a:b] = losses.detach().tolist()
    if z_detached.grad is not None:
        z.backward(z_detached.grad)
    return StepLoss(total(), per_head)


def _sequential_backward(model, z, y, weights, groups, scale, ctx, compiled, per_head) -> None:
    """The memory-efficient order for sequential heads: each depth's state is computed
    from the previous depth's, detached, and each head's loss is backpropagated into its
    state at once (its logits freed before the next head); then the depths are
    backpropagated from the last to the first, each adding its input's gradient to the
    depth before it, and the caller backpropagates z's into the trunk. Only one head's
    logits are alive at a time; the depth modules' activations stay until their backward
    (as the trunk's blocks' do)."""
    depths = []  # (state with its graph, the same state detached)
    h = z
    for a, _ in groups:
        while len(depths) < a:  # depths up to head a (zero-weight ones included: head a needs them)
            i = len(depths) + 1
            with ctx:
                out = model.head_depth(i, h, y[..., i - 1])
            h = out.detach().requires_grad_(True)
            depths.append((out, h))
        with ctx:
            loss = _group_loss(model, a, a + 1, h, y, compiled)
        (weights[a] * loss.sum() * scale).backward()
        per_head[a] = float(loss.detach())
    for out, state in reversed(depths):
        if state.grad is not None:
            out.backward(state.grad)


def spec_heads(n: int) -> list[int]:
    """The head counts k the speculative telemetry reports: 2, 4, ..., and n."""
    return sorted(set(range(2, n + 1, 2)) | {n}) if n > 1 else []


def accepted_lengths(right: torch.Tensor, byte_lengths: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The length of a greedy self-speculative step with k heads under teacher forcing, at
    every position, for k = 1..n: (tokens, bytes), each (..., n).

    right (..., n) bool: head i's greedy token at the position is the true x_{t+i} (an
    ignored target is not right). A step drafts x_{t+2..t+k} with heads 2..k and keeps
    the drafts up to the first wrong one, plus head 1's token: 1 + the number of
    consecutive right heads 2, 3, ... up to k, in tokens; in bytes, those tokens' UTF-8
    bytes (the true text's, which the kept tokens are)."""
    kept = torch.cat([torch.ones_like(right[..., :1]), right[..., 1:].long().cumprod(-1).bool()], dim=-1)
    blen = byte_lengths[y.clamp(min=0)] * kept
    return kept.long().cumsum(-1), blen.cumsum(-1)


@dataclass
class HeadStats:
    """Sums over an evaluation set, per head (0-based index)."""

    nll: list[float]  # nats
    correct: list[int]
    targets: list[int]
    target_bytes: list[int]  # UTF-8 bytes of text the targets stand for
    # speculative telemetry: positions with a next-token target, and the sums over them of
    # a greedy self-speculative step's length with k = 1..n heads (accepted_lengths)
    spec_positions: int = 0
    spec_tokens: list[int] = field(default_factory=list)
    spec_bytes: list[int] = field(default_factory=list)

    @classmethod
    def zeros(cls, n: int) -> "HeadStats":
        return cls([0.0] * n, [0] * n, [0] * n, [0] * n, 0, [0] * n, [0] * n)

    def metrics(self, prefix: str = "val") -> dict[str, float]:
        out: dict[str, float] = {}
        for i in range(len(self.nll)):
            h = i + 1
            out[f"{prefix}/loss/head_{h}"] = self.nll[i] / max(self.targets[i], 1)
            out[f"{prefix}/bpb/head_{h}"] = self.nll[i] / math.log(2) / max(self.target_bytes[i], 1)
            out[f"{prefix}/acc/head_{h}"] = self.correct[i] / max(self.targets[i], 1)
        for k in spec_heads(len(self.nll)):
            out[f"{prefix}/spec/accepted_tokens_k{k}"] = self.spec_tokens[k - 1] / max(self.spec_positions, 1)
            out[f"{prefix}/spec/accepted_bytes_k{k}"] = self.spec_bytes[k - 1] / max(self.spec_positions, 1)
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
    """Adds one batch's per-head NLL, accuracy and byte counts to `stats`, and the
    speculative telemetry (accepted_lengths) over its positions with a next-token target.

    Bits per byte (docs/architecture.md, metric names): summed NLL over ln 2 over the UTF-8 bytes of the targets.
    For a byte model every target is one byte (EOS: zero bytes); for a token model each
    target counts the bytes of its token. So the two arms compare on the same text."""
    ctx = autocast or contextlib.nullcontext()
    with ctx:
        z = model.trunk(x)
        inputs = list(model.head_inputs(z, y, len(stats.nll)))
    right = []
    for i, h in inputs:
        with ctx:
            logits = upcast(model.head_logits(i, h))
        t = y[..., i]
        valid = t != IGNORE
        nll = F.cross_entropy(logits.flatten(0, 1), t.flatten(), ignore_index=IGNORE, reduction="sum")
        right.append((logits.argmax(-1) == t) & valid)
        stats.nll[i] += float(nll)
        stats.correct[i] += int(right[-1].sum())
        stats.targets[i] += int(valid.sum())
        stats.target_bytes[i] += int(byte_lengths[t.clamp(min=0)][valid].sum())
    tokens, nbytes = accepted_lengths(torch.stack(right, dim=-1), byte_lengths, y[..., : len(right)])
    first = y[..., 0] != IGNORE
    stats.spec_positions += int(first.sum())
    for k, (a, b) in enumerate(zip(tokens[first].sum(0).tolist(), nbytes[first].sum(0).tolist())):
        stats.spec_tokens[k] += int(a)
        stats.spec_bytes[k] += int(b)
