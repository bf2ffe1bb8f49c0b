"""Batched generation with a static KV cache: plain and self-speculative decoding.

`generate(model, tokenizer, prompts, ...)` returns completions as text; `Decoder` is the
engine underneath, reusable across calls (the benchmark times it), and its `run` returns
token ids with statistics (forwards, tokens per forward, acceptance per draft depth).

How a batch is decoded
- Slots. The KV cache has one row per slot (`batch_size` of them). Prompts wait in a
  queue; a prompt enters a free slot through a prefill, which writes its keys and values
  and yields its first token (plus, with k heads, k-1 drafts). Each row keeps its own
  positions, so rows advance by different amounts (see `model.forward_cached`).
- Active rows are slots [0, b). When a row finishes (EOS, a stop sequence, its token
  budget or the context), queued prompts are prefilled into finished slots, in groups of
  at least `refill_min` on a GPU (where a prefill costs many graphed steps); once the
  queue is empty the last active row is moved into the hole instead (one copy of its
  cache row), so the batch shrinks and finished rows stop costing work. The whole batch
  is never re-padded.
- Prompts are right-padded for a batched prefill; pad positions write stale cache slots
  beyond the prompt that the first decoding steps overwrite before anything reads them.
- A step is one forward of fixed shape (b, k): the committed token and k-1 drafts at
  positions P..P+k-1. It verifies the drafts with head 1, drafts the next block with
  heads 2..k from the last accepted position (bytelm.speculative), and leaves the next
  step's inputs on the device; the host reads back only (b, k+1) integers. Rejected
  drafts leave stale keys at positions the next step writes again before reading them
  (each step writes every position it reads beyond the accepted prefix), in the trunk's
  cache and, for transformer heads, in every head block's cache.
- A step reads only a prefix of the cache: its first Lb positions, Lb the smallest
  multiple of `cache_block` (capped at the cache length L) above the last position any
  active row writes in it. The host knows every row's position (prompt length plus the
  accepted counts it reads back anyway), so choosing Lb costs no device sync. Positions
  past Lb hold nothing an active row may read (the mask hid them), so the outputs are
  those of a step over the whole cache; the attention's work, which is memory-bound on a
  GPU, follows the longest active row instead of L. Free and idle rows in the step (whose
  work is discarded) have their positions clamped into the prefix.
- Static shapes make the step capturable: with `cuda_graphs=True` one CUDA graph is
  captured per (bucket of active rows, length bucket), lazily, the first time a step
  needs it (rows: 1, 2, 4, ... up to the batch size; the rows past b in a bucket are
  free slots whose work is discarded). Capturing runs warm-up steps; the step inputs
  they change are saved and restored, and the cache writes they make land at positions
  >= each row's committed position, which the next real step writes before reading
  (as it does after rejected drafts). Small prefills (a few prompts: launch-bound) are
  captured too, per (prompts, padded length); big ones run eagerly. `compile=True` runs the
  step and the small prefills through torch.compile (fused kernels; one compilation per
  shape) before capture, and `attention` chooses the step's attention kernel.

Prompts start with the tokenizer's EOS id: in the shards every document follows the EOS
of the one before, so to the model a prompt after EOS is the start of a file.
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from bytelm.errors import UserError
from bytelm.model import KVCache, MTPTransformer
from bytelm.speculative import Sampling, draft, next_token, verify
from bytelm.tokenizers import Tokenizer

# The attention of a decoding step: a scaled_dot_product_attention kernel with a boolean
# mask over the cache (auto: PyTorch's choice; or pinned), or FlexAttention ("flex"). With
# the boolean mask, PyTorch 2.11 on an H200 picks a cuDNN kernel that is ~4x slower for 8
# query positions than for 1, which is most of what a verify step costs over a decode step
# (docs/decoding.md). Compiled, FlexAttention's decoding kernel splits the cache across
# thread blocks and handles up to 16 query positions per tile, so a verify step's attention
# costs what a decode step's does; uncompiled it is a slow reference that materialises
# the scores (use it with compile=True).
ATTENTION_BACKENDS = ("auto", "efficient", "math", "cudnn", "flex")

# A decoding step reads the cache's first Lb positions, Lb a multiple of this block (at
# most the cache length): the longest active row's position plus k, rounded up. Multiples
# of 256 rather than powers of two: a step reads at most 255 positions more than it needs
# (under 13% once rows are 2k long), where powers of two can read twice as many (rows just
# past 2,048 in a 4,096 cache, the case seen in HumanEval/MBPP sampling, would read all of
# it). 256 is a multiple of the key tiles of the attention kernels (64, 128), so a bucket
# ends on a tile. The price is more shapes: L/256 length buckets (16 for L = 4096) times
# the row buckets, but graphs are captured lazily and a run only visits the pairs its
# longest row passes through (a graph costs a few steps to capture; with compile=True
# each pair is a compilation, where a coarser block, e.g. 1024, bounds the count).
CACHE_BLOCK = 256

# With CUDA graphs, a prefill of r prompts is captured too (compiled first with
# compile=True) when r * T <= PREFILL_GRAPH_TOKENS, T being its longest prompt rounded up
# to a multiple of PREFILL_BLOCK (the prompts are right-padded to T, as in any batched
# prefill). Such short prefills are launch-bound: eagerly, a 513-byte prompt took ~10 ms
# on an H200 for a 100M model, 16% of a batch-1 speculative decoding's time and 0.1 of its
# efficiency (docs/decoding.md). Bigger prefills (refills of many rows at once) are
# compute-bound, and run eagerly at their exact shape: no graph per shape.
PREFILL_BLOCK = 128
PREFILL_GRAPH_TOKENS = 4096


# ----------------------------------------------------------------------------- cache views


class _SlotPrefix:
    """Slots [0, s) and positions [0, length) of one layer's KV cache, as a cache of its
    own (it has the `write` of `KVCache`). Views: a decoding step writes straight into the
    real cache, and its attention reads only those positions."""

    def __init__(self, kv: KVCache, s: int, length: int):
        self.k, self.v = kv.k[:s, :, :length], kv.v[:s, :, :length]
        self.rows = torch.arange(s, device=kv.k.device)[:, None]

    def write(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        self.k[self.rows, :, positions] = k.transpose(1, 2).to(self.k.dtype)
        self.v[self.rows, :, positions] = v.transpose(1, 2).to(self.v.dtype)
        return self.k, self.v


class _SlotSet:
    """Any slots of one layer's KV cache, for a prefill: the prompt's keys and values go
    into those slots, and attention reads only the first `length` positions."""

    def __init__(self, kv: KVCache, slots: torch.Tensor, length: int):
        self.kv, self.slots, self.length = kv, slots, length

    def write(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        rows = self.slots[:, None]
        self.kv.k[rows, :, positions] = k.transpose(1, 2).to(self.kv.k.dtype)
        self.kv.v[rows, :, positions] = v.transpose(1, 2).to(self.kv.v.dtype)
        return self.kv.k[self.slots, :, : self.length], self.kv.v[self.slots, :, : self.length]


@dataclass
class _CacheView:
    """What the model reads of a cache (`ModelCache`'s fields), over some of its rows."""

    trunk: list
    heads: list | None
    max_len: int


# ----------------------------------------------------------------------------- results


@dataclass
class DecodeStats:
    """Counters of one `Decoder.run`. A forward is one batched model call; a row forward
    is one row's part in it (its prefill, or one step)."""

    heads: int
    batch_size: int
    sequences: int = 0
    tokens: int = 0  # generated tokens, each row's final EOS included
    bytes: int | None = 0  # UTF-8 bytes of those tokens (None without a tokenizer)
    forwards: int = 0  # prefills + steps
    steps: int = 0  # decoding (verify) steps
    row_forwards: int = 0
    idle_row_steps: int = 0  # step rows spent on finished slots waiting for a group refill
    step_positions: int = 0  # cache positions the steps read per row (their length buckets), summed
    # accepted[j]: row steps in which drafts 1..j+1 were all accepted (j = 0..k-2)
    accepted: list[int] = field(default_factory=list)
    wall_s: float = 0.0
    prefill_s: float = 0.0  # prefills, read-back of their first tokens included
    step_s: float = 0.0  # steps, from launch to their outputs on the host
    capture_s: float = 0.0  # CUDA-graph captures (and compilations) this run triggered: in wall_s, not step_s

    @property
    def row_steps(self) -> int:
        return self.row_forwards - self.sequences

    @property
    def occupancy(self) -> float:
        """The mean share of the batch's slots doing live work in a step: 1 while every
        slot decodes; less once the queue is empty and the batch shrinks to its slowest
        rows (the tail), or while slots idle awaiting a group refill. A step costs about
        the same with fewer rows (it is launch- and weight-bound), so a batch's throughput
        follows tokens per forward times occupancy."""
        return self.row_steps / max(self.steps * self.batch_size, 1)

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / max(self.row_forwards, 1)

    @property
    def bytes_per_forward(self) -> float | None:
        return None if self.bytes is None else self.bytes / max(self.row_forwards, 1)

    @property
    def acceptance_by_depth(self) -> list[float]:
        """P(drafts 1..j all accepted) per step, j = 1..k-1; tokens per step is 1 + their sum."""
        return [a / max(self.row_steps, 1) for a in self.accepted]

    @property
    def conditional_acceptance_by_depth(self) -> list[float]:
        """P(draft j accepted | drafts before it accepted), j = 1..k-1."""
        reached = [self.row_steps] + self.accepted[:-1]
        return [a / r if r else 0.0 for a, r in zip(self.accepted, reached)]

    def merge(self, other: "DecodeStats") -> "DecodeStats":
        """The counters of two runs of the same decoder added up (an evaluation's chunks)."""
        if (other.heads, other.batch_size) != (self.heads, self.batch_size):
            raise ValueError("DecodeStats.merge: runs of different decoders")
        counters = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)
                    if f.name not in ("heads", "batch_size", "bytes", "accepted")}
        return DecodeStats(self.heads, self.batch_size, **counters,
                           bytes=None if self.bytes is None or other.bytes is None else self.bytes + other.bytes,
                           accepted=[a + b for a, b in zip(self.accepted, other.accepted)])

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in ("row_steps", "occupancy", "tokens_per_forward", "bytes_per_forward", "acceptance_by_depth",
                     "conditional_acceptance_by_depth"):
            d[name] = getattr(self, name)
        d["tokens_per_s"] = self.tokens / self.wall_s if self.wall_s else None
        d["bytes_per_s"] = self.bytes / self.wall_s if self.wall_s and self.bytes is not None else None
        d["ms_per_step"] = 1e3 * self.step_s / self.steps if self.steps else None
        return d


@dataclass
class Generation:
    """Completion ids per prompt (EOS and everything after it left out; cut after the
    token that completes a stop sequence), why each row finished, and the counters."""

    tokens: list[list[int]]
    finish: list[str]
    stats: DecodeStats


class _Row:
    """One request: the ids generated so far and the rules that end it."""

    def __init__(self, limit: int, eos: int | None, stops: list[bytes], tokenizer: Tokenizer | None):
        self.limit, self.eos, self.stops, self.tokenizer = limit, eos, stops, tokenizer
        self.ids: list[int] = []
        self.n_tokens = 0  # ids + the final EOS
        self.finish: str | None = None
        self.text = bytearray()  # decoded bytes, kept only to find stop sequences

    def feed(self, new: list[int]) -> bool:
        """Appends a step's tokens up to the first finishing event; True when finished."""
        new = new[: self.limit - len(self.ids)]
        finish = "length" if len(self.ids) + len(new) == self.limit else None
        if self.eos is not None and self.eos in new:
            new, finish = new[: new.index(self.eos)], "eos"
        if self.stops and new:
            cut = self._stop_cut(new)
            if cut is not None:
                new, finish = new[:cut], "stop"
        self.ids += new
        self.n_tokens += len(new) + (finish == "eos")
        self.finish = finish
        return finish is not None

    def _stop_cut(self, new: list[int]) -> int | None:
        """How many of `new` to keep when one of them completes a stop sequence."""
        start = len(self.text)
        self.text += self.tokenizer.decode_bytes(new)
        ends = [i + len(s) for s in self.stops if (i := self.text.find(s, max(0, start - len(s) + 1))) >= 0]
        if not ends:
            return None
        end, pos = min(ends), start
        lengths = self.tokenizer.token_byte_lengths
        for n, t in enumerate(new, 1):
            pos += int(lengths[t])
            if pos >= end:
                del self.text[pos:]
                return n
        return len(new)


# ----------------------------------------------------------------------------- the engine


class Decoder:
    """Plain (heads=1) or self-speculative (heads=k) decoding of many prompts in
    `batch_size` slots of one static KV cache of `max_len` positions.

    Sampling parameters are fixed per decoder (they are baked into the captured step).
    `attention` chooses the step's attention (ATTENTION_BACKENDS), `flex_split_kv` the
    split count of FlexAttention's decoding kernel (0: PyTorch's); `refill_min` is the
    smallest group of finished slots refilled with one prefill while prompts wait;
    `cache_block` is the granularity of the cache prefix a step reads (a block >= max_len:
    always the whole cache, as a reference).
    """

    def __init__(
        self,
        model: MTPTransformer,
        *,
        heads: int = 1,
        batch_size: int = 16,
        max_len: int | None = None,
        sampling: Sampling = Sampling(),
        cuda_graphs: bool = False,
        compile: bool = False,
        attention: str = "auto",
        refill_min: int | None = None,
        cache_block: int = CACHE_BLOCK,
        flex_split_kv: int = 0,
    ):
        n = model.n_future
        if not 1 <= heads <= n:
            raise UserError(f"{heads} heads asked for, but the model has {n} (model.n_future={n})")
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        if attention not in ATTENTION_BACKENDS:
            raise UserError(f"attention backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {attention!r}")
        if cache_block < 1:
            raise UserError(f"cache block must be >= 1 position, got {cache_block}")
        if flex_split_kv < 0:
            raise UserError(f"the FlexAttention split count must be >= 0 (0: PyTorch's choice), got {flex_split_kv}")
        self.flex_split_kv = flex_split_kv
        self.cache_block = cache_block
        self.attention = attention
        p = model.tok_emb.weight
        if compile and attention == "flex" and p.device.type != "cuda":
            # (Inductor's CPU FlexAttention kernel rejects the step's mask, whose positions
            # are computed in the step; uncompiled, flex runs its reference everywhere.)
            raise UserError("compiled FlexAttention decoding needs a CUDA device: drop --compile or use another --attention")
        if cuda_graphs and p.device.type != "cuda":
            raise UserError("CUDA graphs need the model on a CUDA device (--device cuda)")
        self.model, self.k, self.B, self.sampling = model, heads, batch_size, sampling
        # On a GPU a prefill costs several graphed steps even when it is captured itself,
        # so finished slots wait (idle, their step rows wasted) until an eighth of the batch
        # can be refilled at once; on a CPU a prefill costs what its tokens cost: refill at
        # once. An eighth (2 slots at batch 16) was the fastest of 1, 2 and 4 for the 30M
        # byte model with 8 heads on an H200 (docs/decoding.md); decode-bench --refill-min.
        self.refill_min = refill_min or (max(1, batch_size // 8) if p.device.type == "cuda" else 1)
        self.L = min(max_len or model.cfg.context, model.cfg.context)
        self.device, V = p.device, model.cfg.vocab_size
        prob_dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        with torch.inference_mode():
            self.cache = model.new_cache(batch_size, self.L)
            self.tokens = torch.zeros(batch_size, heads, dtype=torch.long, device=self.device)  # [c, drafts]
            self.pos = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # position of c
            self.q = None if sampling.greedy or heads == 1 else torch.zeros(batch_size, heads - 1, V, dtype=prob_dtype, device=self.device)
            self.u = torch.zeros(batch_size, 2 * heads, dtype=prob_dtype, device=self.device)
            self.out = torch.zeros(batch_size, heads + 1, dtype=torch.long, device=self.device)  # emitted, n_accepted
            # a prefill's inputs and output (static, for its graphs)
            self.pf_idx = torch.zeros(batch_size, self.L, dtype=torch.long, device=self.device)  # right-padded prompts
            self.pf_lens = torch.ones(batch_size, dtype=torch.long, device=self.device)
            self.pf_slots = torch.zeros(batch_size, dtype=torch.long, device=self.device)
            self.pf_u = torch.zeros(batch_size, heads, dtype=prob_dtype, device=self.device)
            self.pf_first = torch.zeros(batch_size, dtype=torch.long, device=self.device)
            self.offsets = torch.arange(heads, device=self.device)
        self.gen = torch.Generator(self.device)
        self._views: dict[tuple[int, int], _CacheView] = {}
        # The compiled step and prefill (None: eager). The eager ones are not stored as
        # bound methods: a decoder holding its own methods is a reference cycle, and its
        # KV cache (GBs at a large batch) would outlive it until Python's cyclic collector
        # ran (2026-11-30: six 100M arithmetic evaluations on one H200, each building a
        # decoder per number of operations, ran out of memory).
        self._compiled: tuple[Callable, Callable] | None = None
        if compile:
            # One compiled graph per (decoder, row bucket, length bucket): far more than
            # dynamo's default limit of 8 recompilations (past the limit dynamo falls back
            # to the eager step, which is slower but computes the same).
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 1024)
            torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 4096)
            self._compiled = (torch.compile(self._step, dynamic=False), torch.compile(self._prefill_body, dynamic=False))
        # Rows a step runs on: b itself in eager mode; with graphs, the smallest of these
        # buckets >= b (a graph has a fixed shape, so a few sizes cover every b).
        self._row_buckets = (sorted({min(1 << i, batch_size) for i in range(batch_size.bit_length() + 1)})
                             if cuda_graphs else None)
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (rows, length) -> graph, captured on first use
        self._prefill_graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (prompts, padded length) -> graph
        self._pool = torch.cuda.graph_pool_handle() if cuda_graphs else None
        self.capture_s = 0.0  # spent capturing graphs (and compiling for them), over the decoder's life

    @property
    def _step_fn(self) -> Callable:
        return self._compiled[0] if self._compiled else self._step

    @property
    def _prefill_fn(self) -> Callable:
        return self._compiled[1] if self._compiled else self._prefill_body

    # -- buckets and views -----------------------------------------------------------

    def _layers(self) -> list[KVCache]:
        return list(self.cache.trunk) + (list(self.cache.heads) if self.cache.heads is not None else [])

    def _prefix(self, s: int, length: int) -> _CacheView:
        if (s, length) not in self._views:
            c = self.cache
            heads = [_SlotPrefix(kv, s, length) for kv in c.heads] if c.heads is not None else None
            self._views[s, length] = _CacheView([_SlotPrefix(kv, s, length) for kv in c.trunk], heads, length)
        return self._views[s, length]

    def _bucket(self, b: int) -> int:
        """Rows a step runs on: b itself in eager mode, the bucket size >= b with graphs."""
        if self._row_buckets is None:
            return b
        return min(s for s in self._row_buckets if s >= b)

    def _length_bucket(self, length: int | None) -> int:
        """Cache positions a step reads when it must read the first `length` (None: all):
        the next multiple of cache_block, at most the cache length L."""
        if length is None:
            return self.L
        return min(self.L, -(-max(length, 1) // self.cache_block) * self.cache_block)

    # -- the model's pieces -----------------------------------------------------------

    def _logits_at(self, z, rope, cache, at: torch.Tensor, first: int) -> torch.Tensor:
        """Logits (b, k-first, V) of heads first..k-1 (0-based) at input index `at` (b,).
        Transformer heads run over every position, since their caches need each one."""
        m, k, V = self.model, self.k, self.model.cfg.vocab_size
        if k == first:
            return z.new_zeros(z.shape[0], 0, V)
        idx = at.view(-1, 1, 1).expand(-1, 1, z.shape[-1])
        if not m.heads.attends:
            # All the heads at once on the one position (Heads.group: a single matmul for
            # unembed heads), logits laid out (row, head, V).
            h, unembedding = m.heads.group(first, k, z.gather(1, idx), rope)
            return F.linear(m.norm(h), unembedding).view(-1, k - first, V)
        out = []
        for i in range(first, k):
            h = m.heads.hidden(i, z, rope, cache.heads[i]).gather(1, idx)
            out.append(m.heads.unembed(i, m.norm(h)))
        return torch.cat(out, dim=1)

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
        m, k, cache = self.model, self.k, self._prefix(s, length)
        tokens, u = self.tokens[:s], self.u[:s]
        # Positions past the prefix are clamped onto its last slot. For an active row
        # that happens only at the end of the cache (length = L: a row at the context
        # limit, whose extra tokens are discarded; no kept token reads that slot); the
        # other rows past it are free or idle slots, whose work is discarded and whose
        # cache rows are rewritten before they are read again.
        positions = (self.pos[:s, None] + self.offsets).clamp_max(length - 1)
        rope = m.rope(k, positions, length, flex=self.attention == "flex", flex_split_kv=self.flex_split_kv)
        z = m.trunk(tokens, rope, cache)
        logits = m.head_logits(0, z, rope, cache)
        if k == 1:
            tok = next_token(logits[:, 0], self.sampling, u[:, 0])
            self.out[:s, 0] = tok
            self.tokens[:s, 0] = tok
            self.pos[:s] += 1
            return
        emitted, n_acc = verify(logits, tokens, None if self.q is None else self.q[:s], self.sampling, u[:, :k])
        drafts, q = draft(self._logits_at(z, rope, cache, n_acc, first=1), self.sampling, u[:, k : 2 * k - 1])
        self.out[:s, :k] = emitted
        self.out[:s, k] = n_acc
        self.tokens[:s] = torch.cat([emitted.gather(1, n_acc[:, None]), drafts], dim=1)
        self.pos[:s] += n_acc + 1
        if self.q is not None:
            self.q[:s] = q

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
        m = self.model
        lens, at = self.pf_lens[:r], self.pf_slots[:r]
        c = self.cache
        cache = _CacheView(
            [_SlotSet(kv, at, T) for kv in c.trunk],
            [_SlotSet(kv, at, T) for kv in c.heads] if c.heads is not None else None,
            T,
        )
        positions = torch.arange(T, device=self.device).expand(r, T)
        rope = m.rope(T, positions, T)
        z = m.trunk(self.pf_idx[:r, :T], rope, cache)
        logits = self._logits_at(z, rope, cache, lens - 1, first=0)
        u = None if self.sampling.greedy else self.pf_u[:r]
        first = next_token(logits[:, 0], self.sampling, None if u is None else u[:, 0])
        drafts, q = draft(logits[:, 1:], self.sampling, None if u is None else u[:, 1:])
        self.tokens[at] = torch.cat([first[:, None], drafts], dim=1)
        self.pos[at] = lens
        if self.q is not None:
            self.q[at] = q
        self.pf_first[:r] = first

    def step(self, b: int, length: int | None = None) -> int:
        """One decoding step of the active slots [0, b) (its results are in `out`).
        `length`: 1 + the last position an active row writes in this step (the step
        reads the length bucket above it); None reads the whole cache. Returns the cache
        positions read."""
        s, lb = self._bucket(b), self._length_bucket(length)
        # The cache views are memoised here, outside the compiled step: made inside it,
        # the memo changed under torch.compile's guard on it and every (s, lb) compiled
        # twice (20-40 s each on an H200).
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

    def _move(self, src: int, dst: int) -> None:
        """Slot src's row (cache and step inputs) into slot dst."""
        for kv in self._layers():
            kv.k[dst] = kv.k[src]
            kv.v[dst] = kv.v[src]
        for t in (self.tokens, self.pos, self.q):
            if t is not None:
                t[dst] = t[src]
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

    # -- running ---------------------------------------------------------------------

    @torch.inference_mode()
    def run(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        tokenizer: Tokenizer | None = None,
        stop: Sequence[str] = (),
        seed: int = 0,
    ) -> Generation:
        """Decodes every prompt (token ids, at least one each). A row ends at the
        tokenizer's EOS, at a stop sequence (needs the tokenizer), after max_new_tokens, or
        when it fills the cache; with k heads it commits 1..k tokens per step."""
        if max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        for i, p in enumerate(prompts):
            if not 1 <= len(p) < self.L:
                raise UserError(
                    f"prompt {i} has {len(p)} tokens; it must have 1 to {self.L - 1} to leave room in the "
                    f"{self.L}-position cache (the model's context is {self.model.cfg.context})"
                )
        if stop and tokenizer is None:
            raise ValueError("stop sequences need the tokenizer")
        t0 = time.perf_counter()
        self.gen.manual_seed(seed)
        eos = tokenizer.eos_id if tokenizer is not None else None
        stops = [s.encode("utf-8") for s in stop if s]
        rows = [_Row(min(max_new_tokens, self.L - len(p)), eos, stops, tokenizer) for p in prompts]
        stats = DecodeStats(heads=self.k, batch_size=self.B, sequences=len(prompts), accepted=[0] * (self.k - 1))
        queue = deque(range(len(prompts)))
        slot_row: list[int | None] = []  # active slot -> request index (None: idle, awaiting a refill)
        idle: set[int] = set()
        # Host copy of each live slot's position (of its committed token, `self.pos`):
        # prompt length, plus the tokens committed by each step. It sizes the cache prefix
        # a step reads, without reading anything more back from the device.
        at = [0] * self.B

        def admit(slots: list[int]) -> list[int]:
            """Prefills queued prompts into these slots; returns the slots already done."""
            reqs = [queue.popleft() for _ in slots]
            t, captured = time.perf_counter(), self.capture_s
            first = self.prefill(slots, [list(prompts[r]) for r in reqs])
            stats.capture_s += self.capture_s - captured
            stats.prefill_s += time.perf_counter() - t - (self.capture_s - captured)
            stats.forwards += 1
            stats.row_forwards += len(slots)
            done = []
            for slot, r, tok in zip(slots, reqs, first):
                if slot == len(slot_row):
                    slot_row.append(r)
                slot_row[slot] = r
                at[slot] = len(prompts[r])
                if rows[r].feed([tok]):
                    done.append(slot)
            return done

        def retire(done: list[int]) -> None:
            """Finished slots go idle; idle slots are refilled from the queue in groups of
            at least `refill_min` (one batched prefill), or compacted away once the queue
            is empty (the last active row moves into the hole, highest hole first, so the
            row moved is never an idle one)."""
            for slot in done:
                slot_row[slot] = None
            idle.update(done)
            while idle:
                if queue and (len(idle) >= min(self.refill_min, len(queue)) or len(idle) == len(slot_row)):
                    slots = sorted(idle)[: len(queue)]
                    idle.difference_update(slots)
                    finished = admit(slots)
                    for slot in finished:
                        slot_row[slot] = None
                    idle.update(finished)
                    continue
                if not queue:
                    for slot in sorted(idle, reverse=True):
                        last = len(slot_row) - 1
                        if slot != last:
                            self._move(last, slot)
                            slot_row[slot] = slot_row[last]
                            at[slot] = at[last]
                        slot_row.pop()
                    idle.clear()
                break

        retire(admit(list(range(min(self.B, len(prompts))))))
        k = self.k
        while slot_row:
            b = len(slot_row)
            # The step writes positions P..P+k-1 of each live row (clamped to the cache).
            length = min(self.L, max((at[i] for i, r in enumerate(slot_row) if r is not None), default=0) + k)
            t, captured = time.perf_counter(), self.capture_s
            stats.step_positions += self.step(b, length)
            out = self.out[:b].tolist()
            stats.capture_s += self.capture_s - captured
            stats.step_s += time.perf_counter() - t - (self.capture_s - captured)
            stats.forwards += 1
            stats.steps += 1
            stats.row_forwards += b - len(idle)
            stats.idle_row_steps += len(idle)
            done = []
            for slot, r in enumerate(slot_row):
                if r is None:
                    continue
                o = out[slot]
                n = 1 if k == 1 else o[k] + 1
                at[slot] += n
                for j in range(n - 1):
                    stats.accepted[j] += 1
                if rows[r].feed(o[:n]):
                    done.append(slot)
            retire(done)

        stats.tokens = sum(r.n_tokens for r in rows)
        if tokenizer is not None:
            lengths = tokenizer.token_byte_lengths
            stats.bytes = int(sum(int(lengths[r.ids].sum()) if r.ids else 0 for r in rows))
        else:
            stats.bytes = None
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        stats.wall_s = time.perf_counter() - t0
        return Generation([r.ids for r in rows], [r.finish for r in rows], stats)


# ----------------------------------------------------------------------------- text API


def cast_for_inference(model: MTPTransformer, dtype: torch.dtype) -> MTPTransformer:
    """The model's weights in dtype (bfloat16 on a GPU); the rotary tables stay float32
    (bf16 angles would be off by whole degrees at large positions)."""
    cos, sin = model.rope_cos, model.rope_sin
    model = model.to(dtype)
    model.rope_cos, model.rope_sin = cos, sin
    return model


def cache_length(model: MTPTransformer, longest_prompt: int, max_new_tokens: int, heads: int) -> int:
    """Cache positions a decoder needs for prompts of up to `longest_prompt` tokens and
    `max_new_tokens` new ones with k = `heads` (a step writes k positions), at most the
    model's context."""
    return min(model.cfg.context, longest_prompt + max_new_tokens + heads)


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """A prompt as the model sees it: the start of a document, i.e. after an EOS."""
    return [tokenizer.eos_id] + list(tokenizer.encode(text))


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """Text up to the earliest stop sequence in it."""
    cuts = [i for s in stop if s and (i := text.find(s)) >= 0]
    return text[: min(cuts)] if cuts else text


def generate_ids(
    model: MTPTransformer,
    tokenizer: Tokenizer | None,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: Sequence[str] = (),
    heads: int = 1,
    seed: int = 0,
    batch_size: int = 16,
    cuda_graphs: bool = False,
    compile: bool = False,
) -> Generation:
    """Token-level generation from prompt ids: ids, finish reasons and statistics."""
    if not prompts:
        return Generation([], [], DecodeStats(heads=heads, batch_size=batch_size, accepted=[0] * (heads - 1)))
    try:
        sampling = Sampling(temperature, top_p)
    except ValueError as e:
        raise UserError(str(e)) from None
    max_len = cache_length(model, max(len(p) for p in prompts), max_new_tokens, heads)
    decoder = Decoder(
        model, heads=heads, batch_size=min(batch_size, len(prompts)), max_len=max_len,
        sampling=sampling, cuda_graphs=cuda_graphs, compile=compile,
    )
    return decoder.run(prompts, max_new_tokens, tokenizer=tokenizer, stop=stop, seed=seed)


def generate(
    model: MTPTransformer,
    tokenizer: Tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: Sequence[str] = (),
    heads: int = 1,
    seed: int = 0,
    batch_size: int = 16,
) -> list[str]:
    """Completions of the prompts (prompt excluded), each cut at its first stop sequence.

    A row ends at EOS, at a stop sequence or after max_new_tokens. temperature 0 is greedy
    decoding; heads > 1 decodes self-speculatively with heads 2..heads as drafters: the
    greedy output is the same as with heads=1, and sampling keeps head 1's distribution.
    """
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    gen = generate_ids(
        model, tokenizer, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        stop=stop, heads=heads, seed=seed, batch_size=batch_size,
    )
    return [cut_at_stop(tokenizer.decode(t), stop) for t in gen.tokens]
