"""The model: a decoder-only transformer trunk and n future-token heads.

Read top to bottom: norms and rotary embeddings, attention with an optional static KV
cache, the SwiGLU block, the head types, and the model that ties them together.

The factorisation is the paper's (Gloeckle et al. 2024, §2): a shared trunk maps the
context x_{<=t} to z_t, head i maps z_t to a distribution over x_{t+i} (i = 1..n). Head 1
is the ordinary next-token head; heads 2..n are the drafters of self-speculative decoding.
Every head reads the same trunk output (parallel heads). The final RMSNorm is shared.

Head types (`model.head_type`), each one class behind `Heads`:
- `transformer`: one transformer block per head, shared unembedding (the paper's default
  for tokens). With `match_params` the trunk gives up n-1 blocks (paper §3).
- `linear`: one d×d linear map per head, shared unembedding (paper Table S4).
- `unembed`: no per-head layer, one unembedding per head, an (n·V × d) output matrix (the
  paper's choice for byte models, cheap because V is small).
- `sequential`: DeepSeek-V3's MTP modules (§2.2). Head 1 reads z; head i > 1 is a module
  that takes RMSNorm(head i-1's state) ‖ RMSNorm(Emb(x_{t+i-1})), projects 2d → d and runs
  one transformer block, so each head sees the one before it and the true token between
  them (under teacher forcing; a drafted one when decoding). Shared unembedding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from bytelm.config import ModelConfig, trunk_layers


# ----------------------------------------------------------------------------- pieces


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(max_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ang = torch.outer(torch.arange(max_len, dtype=torch.float64), inv)
    return ang.cos().float(), ang.sin().float()


def upcast(t: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16/fp16 are upcast; float64 stays float64)."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, hd); cos/sin broadcastable to (B, 1, T, hd/2). Rotates pairs (x1, x2)
    taken from the two halves of the head dimension (the GPT-NeoX layout)."""
    x1, x2 = upcast(x).chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.type_as(x)


@dataclass
class AttentionSpec:
    """What every attention layer of one forward needs to know about the positions it
    computes: their rotary tables, where their keys and values go in the cache, and which
    keys each query reads (with which kernel).

    Without a cache the positions are 0..T-1 and attention is plain causal. With a cache,
    each row b has its own positions (B, T), its keys and values are written to cache
    `slots` (B, T) (the positions themselves, except in a tree step, where the nodes of one
    depth share a position but not a slot), and each query reads the cached keys its rule
    allows: a boolean `mask` (B, 1, T, L) for scaled_dot_product_attention, or the same
    rule as a FlexAttention `block_mask` with its kernel options."""

    cos: torch.Tensor
    sin: torch.Tensor
    positions: torch.Tensor | None = None
    slots: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    block_mask: BlockMask | None = None
    flex_options: dict | None = None  # FlexAttention kernel options (None: PyTorch's choices)


def cache_block_mask(positions: torch.Tensor, cache_len: int, sees=None, block: int = 128) -> BlockMask:
    """The FlexAttention block mask of "query (b, q) reads the cached keys at positions <=
    positions[b, q]" over `cache_len` keys, for a query block of up to `block` positions
    per row whose positions do not decrease along q (a decoding step's). A rule `sees`
    (FlexAttention's mask_mod) that lets every query read the keys up to the row's first
    position and none past its last one (a tree step's, over its slots) replaces it.

    Built from the positions directly: with p_first <= p_last the row's first and last
    query positions, key block j (keys block*j .. block*(j+1)-1) is full, every query
    reading every key, when block*(j+1)-1 <= p_first; partial, the rule applied key by key,
    up to the block holding p_last; skipped after it. `create_block_mask` finds the same
    blocks to read by evaluating the rule on every (query, key) pair of the padded
    block × cache grid, a reduction that costs a noticeable share of a batch-16 step on a
    GPU. It calls no block full when T < block, counting the query
    block's padding as queries that see nothing; here the padding's outputs are discarded,
    so full blocks skip the rule. Checked against it: tests/test_model_loss.py."""
    B, T = positions.shape
    if T > block:
        raise ValueError(f"cache_block_mask covers one query block of at most {block} positions, got {T}")
    n = -(-cache_len // block)
    full = torch.div(positions[:, 0] + 1, block, rounding_mode="floor")  # blocks 0..full-1 are full
    seen = torch.div(positions[:, -1], block, rounding_mode="floor") + 1  # blocks full..seen-1 are partial
    blocks = torch.arange(n, device=positions.device, dtype=torch.int32)
    partial_idx = (full[:, None] + blocks).clamp_max(n - 1)  # entries past a row's count are not read

    def causal(b, h, q, kv):
        return kv <= positions[b, q]

    def per_row(t):  # (B, ...) -> (B, heads 1, query blocks 1, ...), int32, materialised: the
        # compiled kernel reads these with contiguous strides, so an expanded view would be
        # read out of bounds
        return t.to(torch.int32).contiguous().view(B, 1, 1, *t.shape[1:])

    return BlockMask.from_kv_blocks(per_row(seen - full), per_row(partial_idx), per_row(full),
                                    per_row(blocks.expand(B, n)), block, sees or causal, seq_lengths=(T, cache_len),
                                    compute_q_blocks=False)


@torch.library.custom_op("bytelm::materialise", mutates_args=())
def materialise(x: torch.Tensor) -> torch.Tensor:
    """x copied into a new contiguous tensor by an operator torch.compile does not look into.

    FlexAttention's decoding kernel for queries of several positions, under torch 2.11's
    Inductor, reads a query that the rotary kernel before it laid out as (B, T, H, hd)
    with the strides of a contiguous (B, H, T, hd) one, so a verify step would attend with
    the wrong queries (benchmarks/flex_check.py checks this case). `.contiguous()` does not
    help: Inductor treats it as layout-free. An operator's output has the fixed layout its
    fake implementation declares, so the kernel's strides are the query's. One position
    (T = 1) is read correctly either way (the head stride is hd in both layouts), and skips
    this."""
    return torch.empty_like(x, memory_format=torch.contiguous_format).copy_(x)


@materialise.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


class KVStore(Protocol):
    """Where an attention layer with a cache puts the keys and values it computes, and
    what it then attends to. `write(k, v, slots)` stores k, v (B, H_kv, T, hd) at cache
    slots (B, T) of the store's B rows and returns the keys and values (B, H_kv, L', hd)
    that the queries read (the spec's mask covers those L' positions). `KVCache` is one
    (every row, every position); `KVCache.rows` gives the others (some rows, a prefix)."""

    def write(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class KVCache(nn.Module):
    """A static, preallocated cache of one attention layer: (B, H_kv, L, hd) keys and values.

    Slot p holds the key/value of the token at absolute position p of that row. Rows
    advance independently: a write goes to each row's own positions, and slots past a
    row's length hold stale values that the mask never lets a query see."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, device, dtype):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def write(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rows(k.shape[0], self.k.shape[2]).write(k, v, slots)

    def rows(self, rows: int | torch.Tensor, length: int) -> "KVRows":
        return KVRows(self, rows, length)


class KVRows:
    """Some rows of a `KVCache` and its first `length` positions, as a store of their own:
    `rows` an int s (rows [0, s): views, so the queries read the cache in place) or a
    tensor of row indices (any rows, read by a gather: a prefill into free slots)."""

    def __init__(self, kv: KVCache, rows: int | torch.Tensor, length: int):
        self.kv, self.length = kv, length
        if isinstance(rows, int):
            self.index = torch.arange(rows, device=kv.k.device)
            self.k, self.v = kv.k[:rows, :, :length], kv.v[:rows, :, :length]
        else:
            self.index, self.k, self.v = rows, None, None

    def write(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Advanced indices separated by a slice put their dims first: target (B, T, H, hd).
        rows = self.index[:, None]
        self.kv.k[rows, :, slots] = k.transpose(1, 2).to(self.kv.k.dtype)
        self.kv.v[rows, :, slots] = v.transpose(1, 2).to(self.kv.v.dtype)
        if self.k is not None:
            return self.k, self.v
        return self.kv.k[self.index, :, : self.length], self.kv.v[self.index, :, : self.length]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        # One fused projection for q, k, v: one matmul instead of three.
        self.wqkv = nn.Linear(cfg.d_model, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, spec: AttentionSpec, cache: KVStore | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        hd, H, Hkv = self.head_dim, self.n_heads, self.n_kv_heads
        q, k, v = self.wqkv(x).split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
        q = q.view(B, T, H, hd).transpose(1, 2)
        k = k.view(B, T, Hkv, hd).transpose(1, 2)
        v = v.view(B, T, Hkv, hd).transpose(1, 2)
        q, k = apply_rope(q, spec.cos, spec.sin), apply_rope(k, spec.cos, spec.sin)
        gqa = Hkv != H
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            k_all, v_all = cache.write(k, v, spec.slots)
            k_all, v_all = k_all.to(q.dtype), v_all.to(q.dtype)
            if spec.block_mask is not None:
                if T > 1:
                    q = materialise(q)
                y = flex_attention(q, k_all, v_all, block_mask=spec.block_mask, enable_gqa=gqa,
                                   kernel_options=spec.flex_options)
            else:
                y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=spec.mask, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(B, T, H * hd))


class SwiGLU(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.w13 = nn.Linear(d, 2 * hidden, bias=False)  # gate and up projection, fused
        self.w2 = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


def ffn_hidden(cfg: ModelConfig) -> int:
    if cfg.ffn_hidden:
        return cfg.ffn_hidden
    return 64 * math.ceil(8 * cfg.d_model / 3 / 64)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.d_model, ffn_hidden(cfg))

    def forward(self, x: torch.Tensor, spec: AttentionSpec, cache: KVStore | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), spec, cache)
        return x + self.ffn(self.ffn_norm(x))

    def flops_per_token(self, cfg: ModelConfig, seq_len: int) -> int:
        """Forward FLOPs: 2 per multiply-add of every weight, plus attention scores and
        the weighted sum over seq_len keys (2·2·T·d; no causal discount, PaLM's rule)."""
        weights = sum(p.numel() for n, p in self.named_parameters() if n.endswith("weight") and p.dim() == 2)
        return 2 * weights + 4 * seq_len * cfg.d_model


# ----------------------------------------------------------------------------- heads


class Heads(nn.Module):
    """n heads on the trunk output z. `hidden(i, z, ...)` is head i's representation
    before the shared final norm; `unembed(i, h)` maps it to logits. A new head type is
    one subclass of this."""

    n: int
    attends = False  # True when heads hold attention layers (and so need KV caches)
    sequential = False  # True when head i reads head i-1's state (SequentialHeads)

    def units(self) -> list[nn.Module]:
        """The modules compiled and FSDP-sharded one by one, as the trunk's blocks are."""
        return []

    def hidden(self, i: int, z: torch.Tensor, spec: AttentionSpec, cache: KVStore | None = None) -> torch.Tensor:
        raise NotImplementedError

    def unembed(self, i: int, h: torch.Tensor) -> torch.Tensor:
        return self.output(h)

    def group(self, a: int, b: int, z: torch.Tensor, spec: AttentionSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """Heads a..b-1 at once, for the loss: (hidden states, unembedding) such that
        F.linear(norm(hidden), unembedding) viewed as (B·T·(b-a), V) are the logits, rows
        ordered (batch, position, head). Default: a shared unembedding, hidden states
        stacked along a head axis."""
        h = torch.stack([self.hidden(i, z, spec) for i in range(a, b)], dim=2)
        return h, self.output.weight

    def flops_per_token(self, i: int, cfg: ModelConfig, seq_len: int) -> int:
        raise NotImplementedError


class TransformerHeads(Heads):
    attends = True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n = cfg.n_future
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(self.n))
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def units(self):
        return list(self.blocks)

    def hidden(self, i, z, spec, cache=None):
        return self.blocks[i](z, spec, cache)

    def flops_per_token(self, i, cfg, seq_len):
        return self.blocks[i].flops_per_token(cfg, seq_len) + 2 * self.output.weight.numel()


class LinearHeads(Heads):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n = cfg.n_future
        self.maps = nn.ModuleList(nn.Linear(cfg.d_model, cfg.d_model, bias=False) for _ in range(self.n))
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def hidden(self, i, z, spec, cache=None):
        return self.maps[i](z)

    def flops_per_token(self, i, cfg, seq_len):
        return 2 * self.maps[i].weight.numel() + 2 * self.output.weight.numel()


class UnembedHeads(Heads):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n = cfg.n_future
        self.vocab = cfg.vocab_size
        # (n·V × d): rows [i·V, (i+1)·V) are head i's unembedding.
        self.output = nn.Linear(cfg.d_model, self.n * cfg.vocab_size, bias=False)

    def hidden(self, i, z, spec, cache=None):
        return z

    def unembed(self, i, h):
        return F.linear(h, self.output.weight[i * self.vocab : (i + 1) * self.vocab])

    def group(self, a, b, z, spec):
        # Every head reads z itself: one matmul against rows [a·V, b·V) of the (n·V × d)
        # output gives all b-a heads' logits, laid out (batch, position, head, V).
        return z, self.output.weight[a * self.vocab : b * self.vocab]

    def flops_per_token(self, i, cfg, seq_len):
        return 2 * self.vocab * cfg.d_model


class SequentialModule(nn.Module):
    """One depth of DeepSeek-V3's multi-token prediction: h' = W [RMSNorm(h); RMSNorm(e)],
    then one transformer block; h is the previous depth's state, e the embedding of the
    token the previous depth predicts."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.hnorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.enorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.proj = nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False)
        self.block = Block(cfg)

    def forward(self, h: torch.Tensor, e: torch.Tensor, spec: AttentionSpec, cache: KVStore | None = None) -> torch.Tensor:
        return self.block(self.proj(torch.cat([self.hnorm(h), self.enorm(e)], dim=-1)), spec, cache)


class SequentialHeads(Heads):
    """Head 1 is z; head i > 1 is module i-1 (`depths[i-2]`) on head i-1's state and the
    embedding of x_{t+i-1} (MTPTransformer.head_depth). Every head's state is computed
    before `hidden`, which passes it through: `hidden(i, h)` is h, the state of depth i."""

    attends = True
    sequential = True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n = cfg.n_future
        self.depths = nn.ModuleList(SequentialModule(cfg) for _ in range(self.n - 1))
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def units(self):
        return list(self.depths)

    def hidden(self, i, z, spec, cache=None):
        return z

    def flops_per_token(self, i, cfg, seq_len):
        unembed = 2 * self.output.weight.numel()
        if i == 0:
            return unembed
        d = self.depths[i - 1]
        return d.block.flops_per_token(cfg, seq_len) + 2 * d.proj.weight.numel() + unembed


HEADS: dict[str, type[Heads]] = {"transformer": TransformerHeads, "linear": LinearHeads, "unembed": UnembedHeads,
                                 "sequential": SequentialHeads}


# ----------------------------------------------------------------------------- model


class ModelCache(nn.Module):
    """KV caches for every trunk block and, for transformer heads, every head block."""

    def __init__(self, trunk: list[KVCache], heads: list[KVCache] | None):
        super().__init__()
        self.trunk = nn.ModuleList(trunk)
        self.heads = nn.ModuleList(heads) if heads else None

    def _first(self) -> KVCache:
        # A model whose head blocks took every layer (transformer heads, match_params) has
        # an empty trunk; its head caches have the same shape.
        return next(iter(self.trunk), None) or self.heads[0]

    @property
    def batch_size(self) -> int:
        return self._first().k.shape[0]

    @property
    def max_len(self) -> int:
        return self._first().k.shape[2]


class MTPTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (from the tokenizer) before building the model")
        self.cfg = cfg
        self.n_future = cfg.n_future
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(trunk_layers(cfg)))
        self.heads = HEADS[cfg.head_type](cfg)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)  # shared by all heads
        cos, sin = rope_tables(cfg.context, cfg.d_model // cfg.n_heads, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        # Residual output projections are scaled down with depth (GPT-2), so the residual
        # stream's variance does not grow with the number of blocks.
        depth = len(self.blocks) + (self.n_future if self.heads.attends else 1)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            if name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * depth))
            else:
                nn.init.normal_(p, 0.0, std)

    # -- the two halves ------------------------------------------------------------

    def attention_spec(self, T: int, positions: torch.Tensor | None = None, cache_len: int | None = None,
                       flex: bool = False, flex_split_kv: int = 0,
                       ancestors: torch.Tensor | None = None) -> AttentionSpec:
        """The attention of T positions: 0..T-1 (causal, no cache), or each row's own
        `positions` (B, T) over `cache_len` cached keys.

        Without `ancestors` (a chain: a prefill, or a step over consecutive positions) a
        query reads every key at a position <= its own. With `ancestors` (T, T), bool, a
        step over a tree of T nodes in topological order (node 0 the root, at
        positions[:, 0]): node j is written to slot positions[:, 0] + j, and reads the keys
        before the root and those of the nodes i with ancestors[j, i] (its ancestors and
        itself); `positions` are then the nodes' positions in their paths (root + depth).
        `flex` gives the rule as a FlexAttention block mask instead of a boolean mask, and
        `flex_split_kv` > 0 sets the number of parts its decoding kernel splits the cache
        into (0: PyTorch's choice, 2 per SM over batch × KV heads, which is 1 split, i.e.
        one thread block reading a whole row, once batch × heads exceeds the SMs)."""
        if positions is None:
            return AttentionSpec(self.rope_cos[:T][None, None], self.rope_sin[:T][None, None])
        cos = self.rope_cos[positions][:, None]  # (B, 1, T, hd/2)
        sin = self.rope_sin[positions][:, None]
        slots, sees = positions, None
        if ancestors is not None:
            root = positions[:, :1]
            slots = root + torch.arange(T, device=positions.device)

            def sees(b, h, q, kv):
                rel = kv - root[b, 0]
                return (rel < 0) | ((rel < T) & ancestors[q, rel.clamp(0, T - 1)])

        if flex:
            options = {"SPLIT_KV": flex_split_kv} if flex_split_kv else None
            return AttentionSpec(cos, sin, positions, slots, block_mask=cache_block_mask(slots, cache_len, sees),
                                 flex_options=options)
        keys = torch.arange(cache_len, device=positions.device)
        if ancestors is None:
            mask = keys[None, None, None, :] <= positions[:, None, :, None]  # (B, 1, T, L)
        else:
            rel = keys[None, :] - slots[:, :1]  # (B, L)
            mask = (rel[:, None] < 0) | ((rel[:, None] < T) & ancestors[:, rel.clamp(0, T - 1)].transpose(0, 1))
            mask = mask[:, None]  # (B, 1, T, L)
        return AttentionSpec(cos, sin, positions, slots, mask)

    def trunk(self, idx: torch.Tensor, spec: AttentionSpec | None = None, cache: ModelCache | None = None) -> torch.Tensor:
        """Token ids (B, T) -> trunk output z (B, T, d), un-normalised."""
        spec = spec or self.attention_spec(idx.shape[1])
        x = self.tok_emb(idx)
        for j, block in enumerate(self.blocks):
            x = block(x, spec, cache.trunk[j] if cache is not None else None)
        return x

    def head_depth(self, i: int, h: torch.Tensor, tokens: torch.Tensor, spec: AttentionSpec | None = None,
                   cache: ModelCache | None = None) -> torch.Tensor:
        """Sequential heads: the state of head i (0-based, i >= 1) from head i-1's state h
        (B, T, d) and the tokens x_{t+i} (B, T) that head i-1 predicts (an ignored target,
        -100, reads token 0: its position's later targets are ignored too). A method of the
        model because it reads the shared embedding (see head_group on FSDP)."""
        spec = spec or self.attention_spec(h.shape[1])
        head_cache = cache.heads[i - 1] if cache is not None else None
        return self.heads.depths[i - 1](h, self.tok_emb(tokens.clamp(min=0)), spec, head_cache)

    def head_inputs(self, z: torch.Tensor, future: torch.Tensor | None, k: int, spec: AttentionSpec | None = None):
        """Yields (i, input of head i) for i = 0..k-1, the input `head_logits(i, ·)` and
        `head_group(i, i + 1, ·)` take: z for parallel heads; for sequential heads, the
        state of depth i under teacher forcing, `future` (B, T, >= k-1) holding the true
        tokens x_{t+1}, x_{t+2}, ... (the targets y)."""
        h = z
        for i in range(k):
            if i and self.heads.sequential:
                if future is None:
                    raise ValueError("sequential heads past the first need the future tokens (the targets)")
                h = self.head_depth(i, h, future[..., i - 1], spec)
            yield i, h

    def head_logits(self, i: int, z: torch.Tensor, spec: AttentionSpec | None = None, cache: ModelCache | None = None) -> torch.Tensor:
        """Logits (B, T, V) of head i (0-based; head 0 predicts the next token) from its
        input z (for sequential heads, the state of depth i: `head_inputs`)."""
        spec = spec or self.attention_spec(z.shape[1])
        # (a sequential head's state is computed, with its cache, by head_depth)
        head_cache = cache.heads[i] if cache is not None and cache.heads is not None and not self.heads.sequential else None
        return self.heads.unembed(i, self.norm(self.heads.hidden(i, z, spec, head_cache)))

    def head_group(self, a: int, b: int, z: torch.Tensor, fn, *args):
        """fn(h, final-norm weight, norm eps, unembedding, *args) for heads a..b-1 at
        once, where (h, unembedding) is `Heads.group` on z: the loss's fused
        norm → unembedding → cross-entropy (bytelm/loss.py). A method of the model, so that
        every parameter the loss touches is used inside one of the model's own methods:
        under FSDP (bytelm/train.py) `trunk`, `head_group` and `head_logits` are
        registered as forward methods, around which the parameters are all-gathered."""
        h, unembedding = self.heads.group(a, b, z, self.attention_spec(z.shape[1]))
        return fn(h, self.norm.weight, self.norm.eps, unembedding, *args)

    def forward(self, idx: torch.Tensor, n_heads: int | None = None, future: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, k, V) of the first k = n_heads heads (default all), no cache.
        Sequential heads past the first read the true future tokens `future` (the targets
        y, B × T × >= k-1)."""
        k = self.n_future if n_heads is None else n_heads
        z = self.trunk(idx)
        return torch.stack([self.head_logits(i, h) for i, h in self.head_inputs(z, future, k)], dim=2)

    # -- decoding with a static KV cache ------------------------------------------

    def new_cache(self, batch: int, max_len: int | None = None, device=None, dtype=None, scratch: int = 0) -> ModelCache:
        """Caches of `max_len` positions (at most the context) plus `scratch` slots past
        them, where a tree step's nodes at the end of the context are written."""
        max_len = max_len or self.cfg.context
        if max_len > self.cfg.context:
            raise ValueError(f"cache length {max_len} exceeds the model's context {self.cfg.context}")
        max_len += scratch
        p = self.tok_emb.weight
        device, dtype = device or p.device, dtype or p.dtype
        hkv = self.cfg.n_kv_heads or self.cfg.n_heads
        hd = self.cfg.d_model // self.cfg.n_heads

        def make(n):
            return [KVCache(batch, hkv, max_len, hd, device, dtype) for _ in range(n)]

        return ModelCache(make(len(self.blocks)), make(len(self.heads.units())) if self.heads.attends else None)

    def forward_cached(self, idx: torch.Tensor, positions: torch.Tensor, cache: ModelCache, n_heads: int = 1) -> torch.Tensor:
        """Tokens idx (B, T) at absolute positions (B, T): writes their keys/values into
        the cache and returns the logits (B, T, n_heads, V) of the first n_heads heads."""
        spec = self.attention_spec(idx.shape[1], positions, cache.max_len)
        z = self.trunk(idx, spec, cache)
        return torch.stack([self.head_logits(i, z, spec, cache) for i in range(n_heads)], dim=2)

    # -- accounting ------------------------------------------------------------------

    def param_counts(self) -> dict[str, int]:
        total = sum(p.numel() for p in self.parameters())
        emb = self.tok_emb.weight.numel()
        unemb = self.heads.output.weight.numel()
        trunk = sum(p.numel() for p in self.blocks.parameters())
        return {
            "params": total,
            # Non-embedding: without the token embedding and the unembedding(s) (Kaplan et
            # al.'s convention, used by the paper's induction study).
            "params_non_embedding": total - emb - unemb,
            "params_trunk": trunk,
            "params_heads": sum(p.numel() for p in self.heads.parameters()),
        }

    def flops_per_token(self, seq_len: int | None = None, n_heads: int | None = None, training: bool = True) -> int:
        """FLOPs per token for a forward (training=False) or forward+backward (×3) pass
        over the trunk and the first n_heads heads (default all), attention included."""
        T = seq_len or self.cfg.context
        k = self.n_future if n_heads is None else n_heads
        fwd = sum(b.flops_per_token(self.cfg, T) for b in self.blocks)
        fwd += sum(self.heads.flops_per_token(i, self.cfg, T) for i in range(k))
        return 3 * fwd if training else fwd
