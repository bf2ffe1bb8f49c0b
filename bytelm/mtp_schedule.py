"""Head-weight schedules (`train.mtp_schedule`): each head's loss weight at each step.

    w_i(s) = loss_weights_i · f_i(s) · (extra_scale if i > 1 else 1)

s is the number of optimizer steps done before the step (0 for the first), S = ⌊share ·
train.steps⌋ the span of the schedule, and f_i(s):

- `constant`: 1.
- `forward` / `reverse`: the stages k_0, k_1, ..., k_{m-1} (heads 1..k_j are trained in
  stage j; default forward 1, 2, ..., n and reverse n, ..., 2, 1) are m equal stages of the
  span: stage j runs from step ⌊j·S/m⌋ to the next stage's start, and the last stage's
  count holds from S on. f_i = 1 for i <= k_j, else 0. Aynetdinov & Akbik (ACL 2025) train
  forward and reverse curricula over the number of heads in equal stages
  (docs/training.md says which settings reproduce which variant).
- `linear` / `cosine`: head 1's f is 1; the other heads' f goes from `start` at step 0 to
  `end` at step S (linearly, or along half a cosine) and stays at `end`.

The weights depend on the step alone, so a resumed run continues its schedule exactly. A
zero weight removes the head from the step: the loss computes neither its logits nor its
backward (bytelm/loss.py), and its parameters, which get no gradient, stay as they are and
stay in the checkpoint.
"""

from __future__ import annotations

import math

from bytelm.config import TrainConfig


def stages(t: TrainConfig, n: int) -> list[int]:
    """The head counts of a forward or reverse schedule's stages."""
    s = t.mtp_schedule
    if s.stages:
        return list(s.stages)
    return list(range(1, n + 1)) if s.kind == "forward" else list(range(n, 0, -1))


def span(t: TrainConfig) -> int:
    return math.floor(t.mtp_schedule.share * t.steps)


def extra_factor(t: TrainConfig, step: int) -> float:
    """A ramp's factor for heads 2..n at `step`."""
    s, S = t.mtp_schedule, span(t)
    if step >= S:
        return s.end  # exactly `end`, with no rounding from start + (end - start)
    p = step / S
    if s.kind == "cosine":
        p = (1 - math.cos(math.pi * p)) / 2
    return s.start + (s.end - s.start) * p


def heads_in_stage(t: TrainConfig, n: int, step: int) -> int:
    """The number of heads a forward or reverse schedule trains at `step`."""
    ks, S = stages(t, n), span(t)
    m = len(ks)
    return ks[max(j for j in range(m) if j * S // m <= step)] if step < S else ks[-1]


def head_weights(t: TrainConfig, n: int, step: int) -> list[float]:
    """Loss weights of the n heads at optimizer step `step` (0-based)."""
    s = t.mtp_schedule
    base = list(t.loss_weights) or [1.0] * n
    if s.kind in ("forward", "reverse"):
        k = heads_in_stage(t, n, step)
        factors = [1.0 if i < k else 0.0 for i in range(n)]
    elif s.kind in ("linear", "cosine"):
        factors = [1.0] + [extra_factor(t, step)] * (n - 1)
    else:
        factors = [1.0] * n
    return [b * f * (s.extra_scale if i else 1.0) for i, (b, f) in enumerate(zip(base, factors))]
