"""Batched generation with a static KV cache: plain and self-speculative decoding.

`generate(model, tokenizer, prompts, ...)` returns completions as text; `Decoder` is the
engine underneath, reusable across calls (the benchmark times it), and its `run` returns
token ids with statistics (forwards, tokens per forward, acceptance per draft depth).

A `Decoder` is two parts that meet at slot numbers: the host-side `SlotScheduler`
(bytelm/slots.py: the queue, which request decodes in which slot of the cache, refills
and compaction) and the device-side `StepEngine` (bytelm/step_engine.py: the cache, the
step and the prefill, their compiled forms and CUDA graphs). The decoder runs the loop:
a step, the (b, k+1) integers it reads back, each request fed its new tokens, finished
slots retired.

Prompts start with the tokenizer's EOS id: in the shards every document follows the EOS
of the one before, so to the model a prompt after EOS is the start of a file.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from typing import Sequence

import torch

from bytelm.errors import UserError
from bytelm.model import MTPTransformer
from bytelm.slots import Request, SlotScheduler
from bytelm.speculative import Sampling
from bytelm.step_engine import ATTENTION_BACKENDS, CACHE_BLOCK, StepEngine
from bytelm.tokenizers import Tokenizer
from bytelm.tree import Tree

__all__ = ["ATTENTION_BACKENDS", "CACHE_BLOCK", "DecodeStats", "Decoder", "Generation", "cache_length",
           "cast_for_inference", "cut_at_stop", "encode_prompt", "generate", "generate_ids"]


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


# ----------------------------------------------------------------------------- the decoder


class Decoder:
    """Plain (heads=1) or self-speculative (heads=k) decoding of many prompts in
    `batch_size` slots of one static KV cache of `max_len` positions.

    Sampling parameters are fixed per decoder (they are baked into the captured step).
    `refill_min` is the smallest group of finished slots refilled with one prefill while
    prompts wait; `tree` verifies a tree of candidates per step instead of a chain
    (bytelm/tree.py; heads must draft its depth); the other options are the step
    engine's (bytelm/step_engine.py).
    `close()` (or leaving a `with` block) gives back what the engine changed outside
    itself; the decoder can run any number of times before.
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
        tree: Tree | None = None,
    ):
        n = model.n_future
        if not 1 <= heads <= n:
            raise UserError(f"{heads} heads asked for, but the model has {n} (model.n_future={n})")
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        gpu = model.tok_emb.weight.device.type == "cuda"
        # On a GPU a prefill costs several graphed steps even when it is captured itself,
        # so finished slots wait (idle, their step rows wasted) until an eighth of the batch
        # can be refilled at once; on a CPU a prefill costs what its tokens cost: refill at
        # once. An eighth (2 slots at batch 16) was the fastest of 1, 2 and 4 for a byte
        # model with 8 heads (docs/decoding.md); decode-bench --refill-min.
        self.refill_min = refill_min or (max(1, batch_size // 8) if gpu else 1)
        self.model, self.k, self.B, self.sampling = model, heads, batch_size, sampling
        self.L = min(max_len or model.cfg.context, model.cfg.context)
        self.engine = StepEngine(model, heads=heads, batch_size=batch_size, max_len=self.L, sampling=sampling,
                                 cuda_graphs=cuda_graphs, compile=compile, attention=attention,
                                 cache_block=cache_block, flex_split_kv=flex_split_kv, tree=tree)
        self.tree = tree

    def close(self) -> None:
        self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

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
        engine, k = self.engine, self.k
        engine.seed(seed)
        eos = tokenizer.eos_id if tokenizer is not None else None
        stops = [s.encode("utf-8") for s in stop if s]
        rows = [Request(min(max_new_tokens, self.L - len(p)), eos, stops, tokenizer) for p in prompts]
        stats = DecodeStats(heads=k, batch_size=self.B, sequences=len(prompts), accepted=[0] * (k - 1))

        def prefill(slots: list[int], requests: list[int]) -> list[int]:
            t, captured = time.perf_counter(), engine.capture_s
            first = engine.prefill(slots, [list(prompts[r]) for r in requests])
            stats.capture_s += engine.capture_s - captured
            stats.prefill_s += time.perf_counter() - t - (engine.capture_s - captured)
            stats.forwards += 1
            stats.row_forwards += len(slots)
            return [slot for slot, r, tok in zip(slots, requests, first) if rows[r].feed([tok])]

        slots = SlotScheduler([len(p) for p in prompts], self.B, self.refill_min, prefill, engine.move)
        slots.start()
        while slots.active:
            b = slots.active
            t, captured = time.perf_counter(), engine.capture_s
            stats.step_positions += engine.step(b, slots.step_length(engine.width, engine.cache_len))
            out = engine.out[:b].tolist()
            stats.capture_s += engine.capture_s - captured
            stats.step_s += time.perf_counter() - t - (engine.capture_s - captured)
            stats.forwards += 1
            stats.steps += 1
            stats.row_forwards += b - len(slots.idle)
            stats.idle_row_steps += len(slots.idle)
            done = []
            for slot, r in slots.live():
                o = out[slot]
                n = 1 if k == 1 else o[k] + 1
                slots.commit(slot, n)
                for j in range(n - 1):
                    stats.accepted[j] += 1
                if rows[r].feed(o[:n]):
                    done.append(slot)
            slots.retire(done)

        stats.tokens = sum(r.n_tokens for r in rows)
        if tokenizer is not None:
            lengths = tokenizer.token_byte_lengths
            stats.bytes = int(sum(int(lengths[r.ids].sum()) if r.ids else 0 for r in rows))
        else:
            stats.bytes = None
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        stats.wall_s = time.perf_counter() - t0
        return Generation([r.ids for r in rows], [r.finish for r in rows], stats)


# ----------------------------------------------------------------------------- text API


def inference_device(name: str) -> str:
    """`--device auto|cpu|cuda` of the commands that generate: auto is the GPU when one is
    visible; cuda without one is the user's mistake, said in one line."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but no CUDA GPU is visible to this torch build")
    return name


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
    tree: Tree | None = None,
) -> Generation:
    """Token-level generation from prompt ids: ids, finish reasons and statistics."""
    if not prompts:
        return Generation([], [], DecodeStats(heads=heads, batch_size=batch_size, accepted=[0] * (heads - 1)))
    try:
        sampling = Sampling(temperature, top_p)
    except ValueError as e:
        raise UserError(str(e)) from None
    max_len = cache_length(model, max(len(p) for p in prompts), max_new_tokens, heads)
    with Decoder(model, heads=heads, batch_size=min(batch_size, len(prompts)), max_len=max_len,
                 sampling=sampling, cuda_graphs=cuda_graphs, compile=compile, tree=tree) as decoder:
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
    tree: Tree | None = None,
) -> list[str]:
    """Completions of the prompts (prompt excluded), each cut at its first stop sequence.

    A row ends at EOS, at a stop sequence or after max_new_tokens. temperature 0 is greedy
    decoding; heads > 1 decodes self-speculatively with heads 2..heads as drafters: the
    greedy output is the same as with heads=1, and sampling keeps head 1's distribution.
    """
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    gen = generate_ids(
        model, tokenizer, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        stop=stop, heads=heads, seed=seed, batch_size=batch_size, tree=tree,
    )
    return [cut_at_stop(tokenizer.decode(t), stop) for t in gen.tokens]
