"""The arithmetic of one decoding step: pick tokens, draft, verify (greedy and sampled).

Self-speculative decoding is blockwise parallel decoding (Stern et al. 2018) with the
model's own heads as drafters (Gloeckle et al. 2024, §2 "Inference"). Between two steps a
row holds its last committed token c, at position P, and k-1 drafts d_1..d_{k-1} for the
positions P+1..P+k-1; the drafts came from heads 2..k at position P-1, so they have not
seen c. One forward over [c, d_1, ..., d_{k-1}] at positions P..P+k-1 gives head 1's
distribution p_j over position P+j (j = 1..k), which verifies d_j, and heads 2..k at every
position, which draft the next block from wherever the accepted prefix ends.

Everything here is tensor code without a host synchronisation or a data-dependent shape,
so that a decoding step can be captured in a CUDA graph. Randomness comes in as uniforms
`u` in [0, 1), drawn by the caller; sampling is by inverse CDF, so a step is a pure
function of its inputs.

Exactness of speculative sampling (Leviathan et al. 2023; Chen et al. 2023): a draft d ~ q
is accepted with probability min(1, p(d)/q(d)), otherwise a token is drawn from the
normalised max(0, p - q); the result is distributed as p whatever q is, as long as q is
the distribution the draft was really drawn from. Here q_j is head j+1's distribution (at
the same temperature and top-p) at position P-1, and the k-1 drafts are drawn
independently of one another. Given that d_1..d_{j-1} were accepted, d_j is still an
independent draw from q_j, so the test of d_j against p_j (which conditions on c and
d_1..d_{j-1}) again yields an exact sample of position P+j; the first rejection ends the
block with a draw from the residual, and a block with every draft accepted ends with a
draw from p_k. Greedy decoding is the limit: p is a point mass on head 1's argmax, a draft
is accepted iff it equals it, and the output is token for token that of plain greedy
decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bytelm.model import upcast


@dataclass(frozen=True)
class Sampling:
    """How a head's logits become a distribution: temperature 0 is greedy (argmax)."""

    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def probs(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """Softmax at the temperature, cut to the top-p nucleus and renormalised, over the
    last dim (float32, or float64 for a float64 model)."""
    p = torch.softmax(upcast(logits) / s.temperature, dim=-1)
    if s.top_p < 1:
        sorted_p, order = p.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p: a token stays when the mass
        # before it is still below top_p (so the most likely token always stays).
        drop = sorted_p.cumsum(-1) - sorted_p >= s.top_p
        p = p.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        p = p / p.sum(-1, keepdim=True)
    return p


def sample(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One draw per row from non-negative, unnormalised `weights` (..., V) by inverse CDF
    with uniforms u (...) in [0, 1). A token of weight 0 is never drawn."""
    cdf = weights.cumsum(-1)
    x = (u.to(cdf.dtype) * cdf[..., -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, x, right=True).squeeze(-1)
    return idx.clamp_max(weights.shape[-1] - 1)


def next_token(logits: torch.Tensor, s: Sampling, u: torch.Tensor | None) -> torch.Tensor:
    """Head 1's token from its logits (..., V): argmax, or a draw with uniforms u (...)."""
    if s.greedy:
        return logits.argmax(-1)
    return sample(probs(logits, s), u)


def draft(logits: torch.Tensor, s: Sampling, u: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Drafts from heads 2..k: logits (b, k-1, V) -> tokens (b, k-1) and, when sampling,
    the distributions q (b, k-1, V) they were drawn from (verification needs them)."""
    if s.greedy:
        return logits.argmax(-1), None
    q = probs(logits, s)
    return sample(q, u), q


def verify(
    logits: torch.Tensor, tokens: torch.Tensor, q: torch.Tensor | None, s: Sampling, u: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks the drafts of one block against head 1.

    logits: head 1 at the k input positions (b, k, V); tokens: the inputs [c, d_1..d_{k-1}]
    (b, k); q: the drafts' distributions (b, k-1, V) when sampling; u: uniforms (b, k),
    k-1 for the acceptance tests and one for the token that ends the block.

    Returns (emitted (b, k), n_accepted (b,)): the row's new tokens are emitted[:, :a+1]
    with a = n_accepted, i.e. the accepted drafts d_1..d_a and then head 1's own token
    (its correction at the first rejected draft, or its next token after the last draft).
    """
    b, k, V = logits.shape
    drafts = tokens[:, 1:]
    if s.greedy:
        g = logits.argmax(-1)  # g[:, j] is head 1's choice for the position after input j
        accepted = drafts == g[:, :-1]
        n_acc = accepted.long().cumprod(-1).sum(-1)
        return g, n_acc  # g[:, j] == d_{j+1} for every accepted j, so g is the output
    p = probs(logits, s)
    p_d = p[:, :-1].gather(-1, drafts[..., None]).squeeze(-1)
    q_d = q.gather(-1, drafts[..., None]).squeeze(-1)
    accepted = u[:, :-1].to(p.dtype) * q_d < p_d  # u < p/q, i.e. probability min(1, p/q)
    n_acc = accepted.long().cumprod(-1).sum(-1)
    # The block's last token: from max(0, p_a - q_a) after a rejection at draft a+1, from
    # p_k when every draft was accepted (q padded with a zero row for that case).
    at = n_acc.view(b, 1, 1).expand(b, 1, V)
    p_a = p.gather(1, at).squeeze(1)
    q_a = torch.cat([q, q.new_zeros(b, 1, V)], dim=1).gather(1, at).squeeze(1)
    residual = (p_a - q_a).clamp_min(0)
    # An all-zero residual (p == q up to rounding) means no draft could be rejected; keep
    # the draw well defined anyway.
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_a)
    last = sample(residual, u[:, -1])
    emitted = torch.cat([drafts, last[:, None]], dim=1).scatter(1, n_acc[:, None], last[:, None])
    return emitted, n_acc


# ----------------------------------------------------------------------------- trees
#
# A tree step (bytelm/tree.py) verifies N nodes per row in one forward: node 0 is the
# committed token c, node j > 0 a candidate for the position depth[j] after c, drafted by
# head depth[j]+1 as its rank[j]-th choice at the step's drafting position. The tree's
# shape comes as tensors: parent (N,), depth (N,), ancestors (N, N) bool (ancestors[j, i]:
# i is j or an ancestor of j), path (N, D+1) (path[j, d]: j's ancestor at depth d, j
# itself past its depth) and children (N, R) (children[j, r]: j's child of rank r, or -1).
#
# Sampling over a tree is exact by recursive rejection (SpecInfer's multi-step
# speculative sampling): at an accepted node, its children are tested in rank order, each
# a draft from a point mass (a candidate is a deterministic function of the context), so
# child t is accepted with probability r(t)/Σr, r being the residual: head 1's
# distribution at the node, less the children already rejected (max(0, r - δ_t) after a
# rejection of t, renormalised). Each test leaves the token distributed as r, so the
# first accepted child, or a draw from the final residual when every child was rejected,
# is distributed as head 1's distribution at the node: the sequence is a sample of the
# model. A node without children (or past the tree) ends the step with a plain draw.


def verify_tree(logits: torch.Tensor, tokens: torch.Tensor, parent: torch.Tensor, depth: torch.Tensor,
                ancestors: torch.Tensor, path: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy verification of a tree: logits (b, N, V) of head 1 at the nodes, tokens (b, N).

    Returns (emitted (b, D+1), n_accepted (b,), best (b,)): the deepest node whose whole
    path is accepted (a node is accepted when it is head 1's choice at its parent; siblings
    are distinct tokens, so at most one per depth is), the number of candidates on its
    path, and the tokens emitted[:, :n+1]: those candidates, then head 1's choice at best.
    """
    g = logits.argmax(-1)  # g[:, j]: head 1's choice after node j
    ok = tokens == g[:, parent]
    ok[:, 0] = True
    path_ok = (ok[:, None, :] | ~ancestors).all(-1)  # (b, N)
    best = torch.where(path_ok, depth, -1).argmax(-1)
    return g.gather(1, path[best]), depth[best], best


def verify_tree_sampled(logits: torch.Tensor, tokens: torch.Tensor, s: Sampling, u: torch.Tensor, depth: torch.Tensor,
                        path: torch.Tensor, children: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recursive rejection sampling over a tree (see above): logits (b, N, V) of head 1 at
    the nodes, tokens (b, N), uniforms u (b, D·R + 1). Returns what `verify_tree` does."""
    b, N, V = logits.shape
    D, R = path.shape[1] - 1, children.shape[1]
    p = probs(logits, s)
    rows = torch.arange(b, device=logits.device)
    cur = torch.zeros(b, dtype=torch.long, device=logits.device)
    alive = torch.ones(b, dtype=torch.bool, device=logits.device)
    residual = p[:, 0]
    for d in range(D):
        taken = torch.zeros_like(alive)
        nxt = cur
        for r in range(R):
            child = children[cur, r]
            c = child.clamp_min(0)
            t = tokens[rows, c]
            w = residual[rows, t]
            test = alive & ~taken & (child >= 0)
            accept = test & (u[:, d * R + r].to(p.dtype) * residual.sum(-1) < w)
            reject = test & ~accept
            residual = residual.scatter(1, t[:, None], torch.where(reject, 0.0, w).to(p.dtype)[:, None])
            nxt = torch.where(accept, c, nxt)
            taken = taken | accept
        alive = alive & taken
        cur = torch.where(alive, nxt, cur)
        residual = torch.where(alive[:, None], p[rows, cur], residual)
    # Rounding can leave no mass outside the rejected children; the node's own
    # distribution keeps the draw defined.
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p[rows, cur])
    last = sample(residual, u[:, -1])
    n_acc = depth[cur]
    along = tokens.gather(1, path[cur][:, 1:])  # the accepted candidates, then padding
    emitted = torch.cat([along, last[:, None]], dim=1).scatter(1, n_acc[:, None], last[:, None])
    return emitted, n_acc, cur
