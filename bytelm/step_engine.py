"""The device side of batched decoding: a static KV cache, the decoding step and the
prefill over static buffers, and the cache of their compiled forms and CUDA graphs.

- A step is one forward of fixed shape (b, k): each row's committed token and k-1 drafts
  at positions P..P+k-1. It verifies the drafts with head 1, drafts the next block from
  the last accepted position (bytelm.speculative), and leaves the next step's inputs on
  the device; the host reads back only (b, k+1) integers (`out`). Rejected drafts leave
  stale keys at positions the next step writes again before reading them (each step
  writes every position it reads beyond the accepted prefix), in the trunk's cache and,
  for transformer heads, in every head block's cache.
- A tree step (`tree`, bytelm/tree.py) is one forward of fixed shape (b, N) over each
  row's N candidate nodes instead: node j at cache slot P+j and position P+depth(j),
  attending to its ancestors; the accepted path's keys and values are then moved to
  P+1, P+2, ... (one gather per layer), and the host reads back the same (b, k+1)
  integers as after a chain step.
- A step reads only a prefix of the cache: its first Lb positions, Lb the smallest
  multiple of `cache_block` (capped at the cache length L) above the last position any
  active row writes in it. The caller knows every row's position, so choosing Lb costs no
  device sync. Positions past Lb hold nothing an active row may read (the mask hid them),
  so the outputs are those of a step over the whole cache; the attention's work, which is
  memory-bound on a GPU, follows the longest active row instead of L. Free and idle rows
  in the step (whose work is discarded) have their positions clamped into the prefix.
- A prefill writes right-padded prompts into some slots; pad positions write stale cache
  slots beyond the prompt that the first decoding steps overwrite before anything reads
  them. It yields each prompt's first token (and, with k heads, k-1 drafts).
- Static shapes make the step capturable: with `cuda_graphs=True` one CUDA graph is
  captured per (bucket of active rows, length bucket), lazily, the first time a step
  needs it (rows: 1, 2, 4, ... up to the batch size; the rows past b in a bucket are free
  slots whose work is discarded). Capturing runs warm-up steps; the step inputs they
  change are saved and restored, and the cache writes they make land at positions >= each
  row's committed position, which the next real step writes before reading (as it does
  after rejected drafts). Small prefills (a few prompts: launch-bound) are captured too,
  per (prompts, padded length); big ones run eagerly. `compile=True` runs the step and the
  small prefills through torch.compile (fused kernels; one compilation per shape) before
  capture, and `attention` chooses the step's attention kernel.
"""

from __future__ import annotations

import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from bytelm.errors import UserError
from bytelm.model import KVCache, MTPTransformer
from bytelm.speculative import Sampling, draft, next_token, verify, verify_tree, verify_tree_sampled
from bytelm.tree import Tree

# The attention of a decoding step: a scaled_dot_product_attention kernel with a boolean
# mask over the cache (auto: PyTorch's choice; or pinned), or FlexAttention ("flex"). With
# the boolean mask PyTorch may pick a kernel that costs several times more for 8 query
# positions than for 1, which is most of what a verify step would cost over a decode step
# (docs/decoding.md). Compiled, FlexAttention's decoding kernel splits the cache across
# thread blocks and handles up to 16 query positions per tile, so a verify step's attention
# costs what a decode step's does; uncompiled it is a slow reference that materialises
# the scores (use it with compile=True).
ATTENTION_BACKENDS = ("auto", "efficient", "math", "cudnn", "flex")

# A decoding step reads the cache's first Lb positions, Lb a multiple of this block (at
# most the cache length): the longest active row's position plus k, rounded up. Multiples
# of 256 rather than powers of two: a step reads at most 255 positions more than it needs
# (under 13% once rows are 2k long), where powers of two can read twice as many (rows just
# past 2,048 in a 4,096 cache would read all of it). 256 is a multiple of the key tiles of
# the attention kernels (64, 128), so a bucket ends on a tile. The price is more shapes:
# L/256 length buckets (16 for L = 4096) times the row buckets, but graphs are captured
# lazily and a run only visits the pairs its longest row passes through (a graph costs a
# few steps to capture; with compile=True each pair is a compilation, where a coarser
# block, e.g. 1024, bounds the count).
CACHE_BLOCK = 256

# With CUDA graphs, a prefill of r prompts is captured too (compiled first with
# compile=True) when r * T <= PREFILL_GRAPH_TOKENS, T being its longest prompt rounded up
# to a multiple of PREFILL_BLOCK (the prompts are right-padded to T, as in any batched
# prefill). Such short prefills are launch-bound: run eagerly, a 513-byte prompt's prefill
# costs a 100M model a sizeable share of a batch-1 speculative decoding's time
# (docs/decoding.md). Bigger prefills (refills of many rows at once) are compute-bound,
# and run eagerly at their exact shape: no graph per shape.
PREFILL_BLOCK = 128
PREFILL_GRAPH_TOKENS = 4096


@dataclass
class CacheView:
    """What the model reads of a cache (`ModelCache`'s fields), over some of its rows."""

    trunk: list
    heads: list | None
    max_len: int


# ----------------------------------------------------------------------------- dynamo limits

# One compiled graph per (engine, row bucket, length bucket) is far more than dynamo's
# default limit of 8 recompilations (past the limit dynamo falls back to the eager step,
# which is slower but computes the same). The limits are raised while a compiling engine
# is open and restored when the last one closes, so the rest of the process keeps torch's
# defaults.
_DYNAMO_LIMITS = {"cache_size_limit": 1024, "accumulated_cache_size_limit": 4096}
_dynamo_saved: dict[str, int] = {}
_dynamo_users = 0


def _raise_dynamo_limits() -> None:
    global _dynamo_users
    config = torch._dynamo.config
    if _dynamo_users == 0:
        _dynamo_saved.update({name: getattr(config, name) for name in _DYNAMO_LIMITS})
        for name, value in _DYNAMO_LIMITS.items():
            setattr(config, name, max(value, _dynamo_saved[name]))
    _dynamo_users += 1


def _restore_dynamo_limits() -> None:
    global _dynamo_users
    _dynamo_users -= 1
    if _dynamo_users == 0:
        for name, value in _dynamo_saved.items():
            setattr(torch._dynamo.config, name, value)
        _dynamo_saved.clear()


# ----------------------------------------------------------------------------- drafting


def head_logits_at(model: MTPTransformer, z: torch.Tensor, spec, cache: CacheView, at: torch.Tensor,
                   first: int, k: int) -> torch.Tensor:
    """Logits (b, k-first, V) of heads first..k-1 (0-based) at input index `at` (b,).
    Transformer heads run over every position, since their caches need each one."""
    V = model.cfg.vocab_size
    if k == first:
        return z.new_zeros(z.shape[0], 0, V)
    idx = at.view(-1, 1, 1).expand(-1, 1, z.shape[-1])
    if not model.heads.attends:
        # All the heads at once on the one position (Heads.group: a single matmul for
        # unembed heads), logits laid out (row, head, V).
        h, unembedding = model.heads.group(first, k, z.gather(1, idx), spec)
        return F.linear(model.norm(h), unembedding).view(-1, k - first, V)
    out = []
    for i in range(first, k):
        h = model.heads.hidden(i, z, spec, cache.heads[i]).gather(1, idx)
        out.append(model.heads.unembed(i, model.norm(h)))
    return torch.cat(out, dim=1)


def parallel_drafts(model: MTPTransformer, z: torch.Tensor, spec, cache: CacheView, at: torch.Tensor,
                    token: torch.Tensor, k: int, sampling: Sampling, u: torch.Tensor | None,
                    rows: torch.Tensor, inputs: torch.Tensor, prefill: bool):
    """Drafts from heads that all read the trunk output: heads 2..k at input index `at`
    (b,) give tokens (b, k-1) for the k-1 positions after the committed `token` (b,), and
    their distributions when sampling (see `speculative.draft`)."""
    return draft(head_logits_at(model, z, spec, cache, at, 1, k), sampling, u)


class SequentialDrafter:
    """Drafts with sequential heads (model.head_type=sequential): module j reads module
    j-1's state and the token before its own, so the k-1 drafts come one module after
    another, each from the last accepted position q: module 1 reads the trunk's state at q
    and the token head 1 just emitted (x_{q+1}), module j the state of module j-1 and
    module j-1's draft.

    A module's cache entry at position t holds what training computes there only once
    x_{t+j} is committed, which for t > q+1-j it is not yet: those entries, written with
    drafts, are computed again by the next step. So each step runs every module over a
    window of 2k-2 positions that starts k-2 before the step's first position (from 0 near
    the start), with the trunk states kept in `states` (B, L, d) and the tokens in `seq`
    (B, L + k): committed through x_{q+1}, drafts after. A prefill runs the modules over
    the prompt. Rows, inputs and positions come from the step (or prefill) that calls it."""

    def __init__(self, model: MTPTransformer, batch_size: int, max_len: int, k: int, device):
        self.width = 2 * k - 2
        self.states = torch.zeros(batch_size, max_len, model.cfg.d_model, dtype=model.tok_emb.weight.dtype, device=device)
        self.seq = torch.zeros(batch_size, max_len + k, dtype=torch.long, device=device)

    def __call__(self, m: MTPTransformer, z, spec, cache: CacheView, at, token, k, sampling, u, rows, inputs, prefill):
        r, pos = rows[:, None], spec.positions
        self.states[r, pos] = z.to(self.states.dtype)
        self.seq[r, pos] = inputs
        q = pos.gather(1, at[:, None])  # (b, 1): the last accepted position
        self.seq[r, q + 1] = token[:, None]
        if prefill:  # the modules run over the prompt, as the trunk did
            window, wspec = pos, spec
        else:
            start = (pos[:, :1] - (k - 2)).clamp_min(0)
            window = (start + torch.arange(self.width, device=pos.device)).clamp_max(cache.max_len - 1)
            wspec = m.attention_spec(self.width, window, cache.max_len, flex=spec.block_mask is not None,
                                     flex_split_kv=(spec.flex_options or {}).get("SPLIT_KV", 0))
        h = self.states[r, window]
        at_q = (q - window[:, :1]).expand(-1, h.shape[-1])[:, None]  # q's index in the window
        drafts, dists = [], []
        for j in range(1, k):
            h = m.head_depth(j, h, self.seq[r, window + j], wspec, cache)
            logits = m.head_logits(j, h.gather(1, at_q))
            d, dist = draft(logits, sampling, None if u is None else u[:, j - 1 : j])
            self.seq[r, q + 1 + j] = d
            drafts.append(d)
            dists.append(dist)
        return torch.cat(drafts, dim=1), None if sampling.greedy else torch.cat(dists, dim=1)

    def move(self, src: int, dst: int) -> None:
        self.states[dst] = self.states[src]
        self.seq[dst] = self.seq[src]


# A head type drafts through a callable (model, z, spec, cache, at, token, k, sampling, u,
# rows, inputs, prefill) -> (drafts (b, k-1), q (b, k-1, V) or None): `at` the index of
# the last accepted input, `token` the token head 1 emitted there, `rows` the cache rows
# and `inputs` the tokens z was computed from. Heads that read the trunk output in
# parallel draft with `parallel_drafts`; sequential heads, one module per drafted token,
# with a SequentialDrafter, which keeps state of its own (the engine's `move` moves it).
def drafter_for(model: MTPTransformer, batch_size: int, max_len: int, k: int, device) -> Callable:
    if model.heads.sequential and k > 1:
        return SequentialDrafter(model, batch_size, max_len, k, device)
    return parallel_drafts


# ----------------------------------------------------------------------------- the engine


class StepEngine:
    """The KV cache of `batch_size` slots × `max_len` positions for a model decoding with
    k = `heads` heads, and the step and prefill that run on it (see the module's doc).

    `step(b, length)` runs one step on slots [0, b) (results in `out`), `prefill(slots,
    prompts)` fills slots, `move(src, dst)` copies a row. Sampling parameters are fixed
    (they are baked into the captured step). `attention` chooses the step's attention
    (ATTENTION_BACKENDS), `flex_split_kv` the split count of FlexAttention's decoding kernel
    (0: PyTorch's); `cache_block` is the granularity of the cache prefix a step reads (a
    block >= max_len: always the whole cache, as a reference). `close()` (or leaving a
    `with` block) gives back the global torch.compile limits a compiling engine raised.
    """

    def __init__(
        self,
        model: MTPTransformer,
        *,
        heads: int,
        batch_size: int,
        max_len: int,
        sampling: Sampling,
        cuda_graphs: bool = False,
        compile: bool = False,
        attention: str = "auto",
        cache_block: int = CACHE_BLOCK,
        flex_split_kv: int = 0,
        tree: Tree | None = None,
    ):
        if attention not in ATTENTION_BACKENDS:
            raise UserError(f"attention backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {attention!r}")
        if cache_block < 1:
            raise UserError(f"cache block must be >= 1 position, got {cache_block}")
        if flex_split_kv < 0:
            raise UserError(f"the FlexAttention split count must be >= 0 (0: PyTorch's choice), got {flex_split_kv}")
        p = model.tok_emb.weight
        if compile and attention == "flex" and p.device.type != "cuda":
            # (Inductor's CPU FlexAttention kernel rejects the step's mask, whose positions
            # are computed in the step; uncompiled, flex runs its reference everywhere.)
            raise UserError("compiled FlexAttention decoding needs a CUDA device: drop --compile or use another --attention")
        if cuda_graphs and p.device.type != "cuda":
            raise UserError("CUDA graphs need the model on a CUDA device (--device cuda)")
        self.model, self.k, self.B, self.L, self.sampling = model, heads, batch_size, max_len, sampling
        self.attention, self.cache_block, self.flex_split_kv = attention, cache_block, flex_split_kv
        self.drafter = drafter_for(model, batch_size, self.L, heads, p.device)
        self.tree = tree
        if tree is not None:
            tree.check_heads(heads)
            if self.drafter is not parallel_drafts:
                raise UserError(f"tree decoding needs heads that all read the trunk output; {model.cfg.head_type} "
                                "heads draft one after another: decode with a chain")
        self.device, V = p.device, model.cfg.vocab_size
        prob_dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        with torch.inference_mode():
            if tree is None:
                self.cache = model.new_cache(batch_size, self.L)
                self.tokens = torch.zeros(batch_size, heads, dtype=torch.long, device=self.device)  # [c, drafts]
                self.u = torch.zeros(batch_size, 2 * heads, dtype=prob_dtype, device=self.device)
            else:
                # A row at the end of the context still writes all its nodes: into scratch slots.
                self.cache = model.new_cache(batch_size, self.L, scratch=tree.nodes - 1)
                self.tokens = torch.zeros(batch_size, tree.nodes, dtype=torch.long, device=self.device)  # [c, nodes]
                self.u = torch.zeros(batch_size, tree.depth * tree.width + 1, dtype=prob_dtype, device=self.device)
                t = dict(device=self.device)
                self.t_parent = torch.tensor(tree.parent(), **t)
                self.t_depth = torch.tensor(tree.depths(), **t)
                self.t_ancestors = torch.tensor(tree.ancestors(), **t)
                self.t_path = torch.tensor(tree.path_table(), **t)
                self.t_children = torch.tensor(tree.children(), **t)
                # node j's candidate in the (head, rank) list of a drafting position
                self.t_candidate = torch.tensor([(d - 1) * tree.width + r for d, r in zip(tree.depths(), tree.ranks())][1:], **t)
            self.pos = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # position of c
            self.q = (None if sampling.greedy or heads == 1 or tree is not None else
                      torch.zeros(batch_size, heads - 1, V, dtype=prob_dtype, device=self.device))
            self.out = torch.zeros(batch_size, heads + 1, dtype=torch.long, device=self.device)  # emitted, n_accepted
            # a prefill's inputs and output (static, for its graphs)
            self.pf_idx = torch.zeros(batch_size, self.L, dtype=torch.long, device=self.device)  # right-padded prompts
            self.pf_lens = torch.ones(batch_size, dtype=torch.long, device=self.device)
            self.pf_slots = torch.zeros(batch_size, dtype=torch.long, device=self.device)
            self.pf_u = torch.zeros(batch_size, heads, dtype=prob_dtype, device=self.device)
            self.pf_first = torch.zeros(batch_size, dtype=torch.long, device=self.device)
            self.offsets = torch.arange(heads, device=self.device)
            self.rows = torch.arange(batch_size, device=self.device)
        self.gen = torch.Generator(self.device)
        self._views: dict[tuple[int, int], CacheView] = {}
        # The compiled step and prefill (None: eager). The eager ones are not stored as
        # bound methods: an engine holding its own methods is a reference cycle, and its
        # KV cache (GBs at a large batch) would outlive it until Python's cyclic collector
        # ran, where a caller building one engine after another needs it freed at once.
        self._compiled: tuple[Callable, Callable] | None = None
        self._close = None
        if compile:
            _raise_dynamo_limits()
            self._close = weakref.finalize(self, _restore_dynamo_limits)
            self._compiled = (torch.compile(self._step, dynamic=False), torch.compile(self._prefill_body, dynamic=False))
        # Rows a step runs on: b itself in eager mode; with graphs, the smallest of these
        # buckets >= b (a graph has a fixed shape, so a few sizes cover every b).
        self._row_buckets = (sorted({min(1 << i, batch_size) for i in range(batch_size.bit_length() + 1)})
                             if cuda_graphs else None)
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (rows, length) -> graph, captured on first use
        self._prefill_graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (prompts, padded length) -> graph
        self._pool = torch.cuda.graph_pool_handle() if cuda_graphs else None
        self.capture_s = 0.0  # spent capturing graphs (and compiling for them), over the engine's life

    def close(self) -> None:
        """Gives back what the engine changed outside itself (torch.compile's limits)."""
        if self._close is not None:
            self._close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def width(self) -> int:
        """Cache slots a step writes per row, from its committed token's position on."""
        return self.k if self.tree is None else self.tree.nodes

    @property
    def cache_len(self) -> int:
        """Cache slots per row: L, plus a tree's scratch slots."""
        return self.cache.max_len

    @property
    def _step_fn(self) -> Callable:
        return self._compiled[0] if self._compiled else self._step

    @property
    def _prefill_fn(self) -> Callable:
        return self._compiled[1] if self._compiled else self._prefill_body

    def seed(self, seed: int) -> None:
        self.gen.manual_seed(seed)

    # -- buckets and views -----------------------------------------------------------

    def _layers(self) -> list[KVCache]:
        return list(self.cache.trunk) + (list(self.cache.heads) if self.cache.heads is not None else [])

    def _prefix(self, s: int, length: int) -> CacheView:
        if (s, length) not in self._views:
            c = self.cache
            heads = [kv.rows(s, length) for kv in c.heads] if c.heads is not None else None
            self._views[s, length] = CacheView([kv.rows(s, length) for kv in c.trunk], heads, length)
        return self._views[s, length]

    def bucket(self, b: int) -> int:
        """Rows a step runs on: b itself in eager mode, the bucket size >= b with graphs."""
        if self._row_buckets is None:
            return b
        return min(s for s in self._row_buckets if s >= b)

    def length_bucket(self, length: int | None) -> int:
        """Cache positions a step reads when it must read the first `length` (None: all):
        the next multiple of cache_block, at most the cache's slots."""
        L = self.cache_len
        if length is None:
            return L
        return min(L, -(-max(length, 1) // self.cache_block) * self.cache_block)

    # -- the step ----------------------------------------------------------------------

    def _step(self, s: int, length: int) -> None:
        """One decoding step on slots [0, s) over cache positions [0, length): reads
        tokens/pos/q/u, writes out and the next step's tokens/pos/q, all in place (static
        buffers, so it can be captured)."""
        if self.attention in ("auto", "flex"):
            return self._step_body(s, length)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {"efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH,
                   "cudnn": SDPBackend.CUDNN_ATTENTION}[self.attention]
        with sdpa_kernel([backend]):
            return self._step_body(s, length)

    def _step_body(self, s: int, length: int) -> None:
        if self.tree is not None:
            return self._tree_step_body(s, length)
        m, k, cache = self.model, self.k, self._prefix(s, length)
        tokens, u = self.tokens[:s], self.u[:s]
        # Positions past the prefix are clamped onto its last slot. For an active row
        # that happens only at the end of the cache (length = L: a row at the context
        # limit, whose extra tokens are discarded; no kept token reads that slot); the
        # other rows past it are free or idle slots, whose work is discarded and whose
        # cache rows are rewritten before they are read again.
        positions = (self.pos[:s, None] + self.offsets).clamp_max(length - 1)
        spec = m.attention_spec(k, positions, length, flex=self.attention == "flex", flex_split_kv=self.flex_split_kv)
        z = m.trunk(tokens, spec, cache)
        logits = m.head_logits(0, z, spec, cache)
        if k == 1:
            tok = next_token(logits[:, 0], self.sampling, u[:, 0])
            self.out[:s, 0] = tok
            self.tokens[:s, 0] = tok
            self.pos[:s] += 1
            return
        emitted, n_acc = verify(logits, tokens, None if self.q is None else self.q[:s], self.sampling, u[:, :k])
        last = emitted.gather(1, n_acc[:, None])
        drafts, q = self.drafter(m, z, spec, cache, n_acc, last[:, 0], k, self.sampling, u[:, k : 2 * k - 1],
                                 self.rows[:s], tokens, False)
        self.out[:s, :k] = emitted
        self.out[:s, k] = n_acc
        self.tokens[:s] = torch.cat([last, drafts], dim=1)
        self.pos[:s] += n_acc + 1
        if self.q is not None:
            self.q[:s] = q

    def _tree_step_body(self, s: int, length: int) -> None:
        """A tree step: every node of each row's tree in one forward (bytelm/tree.py),
        the deepest accepted path kept, its keys and values moved to the positions after
        the committed token (one gather per layer), the next tree drafted from its end."""
        m, cache, N, D = self.model, self._prefix(s, length), self.tree.nodes, self.tree.depth
        tokens = self.tokens[:s]
        # Free and idle rows' roots are clamped into the prefix (a live row's nodes fit:
        # the length bucket is above its last slot). Positions past the context are those
        # of nodes whose tokens are never kept.
        root = self.pos[:s].clamp_max(length - N)
        positions = (root[:, None] + self.t_depth).clamp_max(m.cfg.context - 1)
        spec = m.attention_spec(N, positions, length, flex=self.attention == "flex",
                                flex_split_kv=self.flex_split_kv, ancestors=self.t_ancestors)
        z = m.trunk(tokens, spec, cache)
        logits = m.head_logits(0, z, spec, cache)
        if self.sampling.greedy:
            emitted, n_acc, best = verify_tree(logits, tokens, self.t_parent, self.t_depth, self.t_ancestors, self.t_path)
        else:
            emitted, n_acc, best = verify_tree_sampled(logits, tokens, self.sampling, self.u[:s], self.t_depth,
                                                       self.t_path, self.t_children)
        candidates = self._tree_candidates(z, spec, cache, best)
        self._keep_path(cache, root, best)
        self.out[:s, : D + 1] = emitted
        self.out[:s, self.k] = n_acc
        self.tokens[:s] = torch.cat([emitted.gather(1, n_acc[:, None]), candidates], dim=1)
        self.pos[:s] += n_acc + 1

    def _tree_candidates(self, z, spec, cache: CacheView, at: torch.Tensor) -> torch.Tensor:
        """The tree's candidates (b, N-1) after input index `at` (b,): each node's rank of
        its head's choices there."""
        tree = self.tree
        logits = head_logits_at(self.model, z, spec, cache, at, 1, tree.depth + 1)  # (b, D, V)
        ranked = logits.topk(tree.width, dim=-1).indices.flatten(1)  # (b, D·R)
        return ranked[:, self.t_candidate]

    def _keep_path(self, cache: CacheView, root: torch.Tensor, best: torch.Tensor) -> None:
        """The accepted path's keys and values, at slots root + path[best], to the slots
        root, root+1, ...: every layer's cache compacted once. Slots past the accepted
        depth receive copies that the next step overwrites before reading."""
        path = root[:, None] + self.t_path[best]  # (b, D+1)
        dst = root[:, None] + torch.arange(path.shape[1], device=path.device)
        rows = torch.arange(path.shape[0], device=path.device)[:, None]
        for view in list(cache.trunk) + list(cache.heads or []):
            for t in (view.k, view.v):
                t[rows, :, dst] = t[rows, :, path]

    def step(self, b: int, length: int | None = None) -> int:
        """One decoding step of the active slots [0, b) (its results are in `out`).
        `length`: 1 + the last position an active row writes in this step (the step
        reads the length bucket above it); None reads the whole cache. Returns the cache
        positions read."""
        s, lb = self.bucket(b), self.length_bucket(length)
        # The cache views are memoised here, outside the compiled step: made inside it,
        # the memo would change under torch.compile's guard on it and every (s, lb) would
        # compile twice.
        self._prefix(s, lb)
        if self._row_buckets is not None and (s, lb) not in self._graphs:
            self._capture(self._graphs, (s, lb), self._step_fn)
        if not self.sampling.greedy:
            self.u[:s].uniform_(generator=self.gen)
        if self._row_buckets is not None:
            self._graphs[s, lb].replay()
        else:
            self._step_fn(s, lb)
        return lb

    # -- the prefill -------------------------------------------------------------------

    def prefill(self, slots: list[int], prompts: list[list[int]]) -> list[int]:
        """Writes the prompts into the given slots' caches; returns their first tokens and
        leaves [first token, drafts] as the slots' next step inputs."""
        r, T = len(prompts), max(map(len, prompts))
        padded = min(self.L, -(-T // PREFILL_BLOCK) * PREFILL_BLOCK)
        graphed = self._row_buckets is not None and r * padded <= PREFILL_GRAPH_TOKENS
        T = padded if graphed else T
        idx = torch.zeros(r, T, dtype=torch.long)  # right-padded with token 0
        for i, p in enumerate(prompts):
            idx[i, : len(p)] = torch.tensor(p)
        self.pf_idx[:r, :T] = idx.to(self.device)
        self.pf_lens[:r] = torch.tensor([len(p) for p in prompts])
        self.pf_slots[:r] = torch.tensor(slots)
        if not self.sampling.greedy:
            self.pf_u[:r] = torch.rand(r, self.k, generator=self.gen, device=self.device, dtype=self.pf_u.dtype)
        if graphed:
            if (r, T) not in self._prefill_graphs:
                self._capture(self._prefill_graphs, (r, T), self._prefill_fn)
            self._prefill_graphs[r, T].replay()
        else:
            self._prefill_body(r, T)
        return self.pf_first[:r].tolist()

    def _prefill_body(self, r: int, T: int) -> None:
        """The prefill of the r prompts in pf_idx[:r, :T] into slots pf_slots[:r]: static
        buffers in, static buffers out, so it can be captured."""
        m, k = self.model, self.k
        lens, at = self.pf_lens[:r], self.pf_slots[:r]
        c = self.cache
        cache = CacheView(
            [kv.rows(at, T) for kv in c.trunk],
            [kv.rows(at, T) for kv in c.heads] if c.heads is not None else None,
            T,
        )
        positions = torch.arange(T, device=self.device).expand(r, T)
        spec = m.attention_spec(T, positions, T)
        z = m.trunk(self.pf_idx[:r, :T], spec, cache)
        u = None if self.sampling.greedy else self.pf_u[:r]
        last = lens - 1
        first = next_token(head_logits_at(m, z, spec, cache, last, 0, 1)[:, 0], self.sampling,
                           None if u is None else u[:, 0])
        if self.tree is not None:
            drafts, q = self._tree_candidates(z, spec, cache, last), None
        else:
            drafts, q = self.drafter(m, z, spec, cache, last, first, k, self.sampling, None if u is None else u[:, 1:],
                                     at, self.pf_idx[:r, :T], True)
        self.tokens[at] = torch.cat([first[:, None], drafts], dim=1)
        self.pos[at] = lens
        if self.q is not None:
            self.q[at] = q
        self.pf_first[:r] = first

    # -- rows, captures ------------------------------------------------------------------

    def move(self, src: int, dst: int) -> None:
        """Slot src's row (cache and step inputs) into slot dst."""
        for kv in self._layers():
            kv.k[dst] = kv.k[src]
            kv.v[dst] = kv.v[src]
        for t in (self.tokens, self.pos, self.q):
            if t is not None:
                t[dst] = t[src]
        if isinstance(self.drafter, SequentialDrafter):
            self.drafter.move(src, dst)
        self.pos[src] = 0

    @contextmanager
    def _preserved_inputs(self):
        """Runs steps that must leave no trace (the warm-up before a capture, possibly in
        the middle of a run): the step's buffers (tokens, pos, q, out, u) are restored in
        place afterwards. The cache is not: a step over slots [0, s) writes each row's
        cache only at positions >= its committed token's position P (or, past the prefix,
        onto its last slot, which for a row of a live request is >= P as well), and the
        next real step writes P..P+k-1 before reading them, as after rejected drafts;
        free and idle rows are rewritten by their next prefill. A prefill's warm-ups write
        only the slots that prefill fills (the same values it then writes)."""
        buffers = [t for t in (self.tokens, self.pos, self.q, self.out, self.u) if t is not None]
        saved = [t.clone() for t in buffers]
        try:
            yield
        finally:
            for t, v in zip(buffers, saved):
                t.copy_(v)

    def _capture(self, graphs: dict, key: tuple[int, int], fn) -> None:
        """graphs[key]: the CUDA graph of fn(*key), a step (rows, cache length) or a
        prefill (prompts, padded length). The graphs share one memory pool (they are
        replayed one at a time, on one stream, and keep nothing of their own between
        replays: every input and output is a static buffer)."""
        t0 = time.perf_counter()
        with torch.inference_mode(), self._preserved_inputs():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):  # warm-up: compilation, cuBLAS workspaces, autotuning
                    fn(*key)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                fn(*key)  # recorded, not run: it changes nothing
            graphs[key] = graph
        torch.cuda.synchronize()
        self.capture_s += time.perf_counter() - t0
