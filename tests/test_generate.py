"""Batched generation: the KV-cache path equals no-cache decoding, self-speculative greedy
decoding equals plain greedy decoding token for token, stops, limits and bad input."""

from functools import lru_cache
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from bytelm.config import ModelConfig
from bytelm.errors import UserError
from bytelm.generate import DecodeStats, Decoder, cut_at_stop, encode_prompt, generate, generate_ids
from bytelm.model import MTPTransformer
from bytelm.speculative import Sampling
from bytelm.tokenizers import ByteTokenizer

TOK = ByteTokenizer()
N_FUTURE = 4


def documents(n_docs: int, g: torch.Generator) -> torch.Tensor:
    """Byte documents that are arithmetic progressions over 16 letters ("adgjmp..."),
    4 to 20 bytes long, each followed by EOS: learnable a few tokens ahead, so the
    heads' drafts are accepted often but not always."""
    out = []
    for _ in range(n_docs):
        a, s, n = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((0, 16), (1, 4), (4, 21)))
        out += [97 + (a + s * t) % 16 for t in range(n)] + [TOK.eos_id]
    return torch.tensor(out)


@lru_cache(maxsize=None)
def trained_model(head_type: str) -> MTPTransformer:
    """A tiny byte model with 4 heads, trained for a few seconds, in float64."""
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=N_FUTURE + 1 if head_type == "transformer" else 2, d_model=32, n_heads=4,
                      n_kv_heads=2, context=96, vocab_size=TOK.vocab_size, n_future=N_FUTURE, head_type=head_type)
    model = MTPTransformer(cfg)
    g = torch.Generator().manual_seed(0)
    data = documents(600, g)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    T = 24
    for _ in range(60):
        starts = torch.randint(0, len(data) - T - N_FUTURE, (8,), generator=g).tolist()
        w = torch.stack([data[i : i + T + N_FUTURE] for i in starts])
        logits = model(w[:, :T])
        loss = sum(F.cross_entropy(logits[:, :, i].flatten(0, 1), w[:, i + 1 : i + 1 + T].flatten()) for i in range(N_FUTURE))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.double().eval()


def prompts_of_lengths(*lengths: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[TOK.eos_id] + torch.randint(97, 113, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def reference_greedy(model, prompt: list[int], max_new: int, stop: bytes | None = None) -> list[int]:
    """Greedy decoding the slow way: a full no-cache forward per token."""
    ids: list[int] = []
    while len(ids) < max_new and len(prompt) + len(ids) < model.cfg.context:
        t = int(model(torch.tensor([prompt + ids]), n_heads=1)[0, -1, 0].argmax())
        if t == TOK.eos_id:
            break
        ids.append(t)
        if stop is not None and stop in TOK.decode_bytes(ids):
            break
    return ids


@pytest.mark.parametrize("head_type", ["transformer", "linear", "unembed"])
def test_cached_batched_greedy_equals_no_cache_greedy(head_type):
    """Prompts of different lengths, right-padded prefill, refills from the queue and
    compaction (batch 3 for 7 prompts), a stop sequence and EOS."""
    model = trained_model(head_type)
    prompts = prompts_of_lengths(1, 6, 13, 2, 9, 4, 20)
    gen = generate_ids(model, TOK, prompts, max_new_tokens=25, heads=1, batch_size=3, stop=["k"])
    expected = [reference_greedy(model, p, 25, b"k") for p in prompts]
    assert gen.tokens == expected
    for ids, reason in zip(gen.tokens, gen.finish):
        if reason == "stop":
            assert ids and TOK.decode(ids).endswith("k")
        elif reason == "length":
            assert len(ids) == 25
    # Plain decoding does exactly one row forward per generated token: finished rows
    # stop costing work (no padding of the batch).
    assert gen.stats.tokens_per_forward == 1.0


@pytest.mark.parametrize("head_type", ["transformer", "linear", "unembed"])
def test_speculative_greedy_equals_plain_greedy(head_type):
    model = trained_model(head_type)
    prompts = prompts_of_lengths(1, 7, 3, 15, 2, 11, 5, 24, 9)
    for stop in ([], ["pa", "e"]):
        plain = generate_ids(model, TOK, prompts, max_new_tokens=40, heads=1, batch_size=4, stop=stop)
        if stop:  # rows end at different times
            assert "stop" in plain.finish and len({len(t) for t in plain.tokens}) > 2
        for k in range(2, N_FUTURE + 1):
            for batch in (1, 2, 3, 5, 8):
                spec = generate_ids(model, TOK, prompts, max_new_tokens=40, heads=k, batch_size=batch, stop=stop)
                assert spec.tokens == plain.tokens, (k, batch, stop)
                assert spec.finish == plain.finish
                s = spec.stats
                assert s.tokens == plain.stats.tokens
                assert 1.0 < s.tokens_per_forward <= k
                assert s.row_forwards < plain.stats.row_forwards
                assert len(s.acceptance_by_depth) == k - 1
                # P(first j drafts accepted) cannot grow with j
                assert all(a >= b for a, b in zip(s.acceptance_by_depth, s.acceptance_by_depth[1:]))


def test_group_refills_keep_outputs_and_count_idle_rows():
    """With refill_min > 1 (the GPU default), finished slots idle until a group can be
    refilled with one prefill; outputs are unchanged and the idle rows are reported."""
    model = trained_model("unembed")
    prompts = prompts_of_lengths(4, 9, 2, 14, 6, 3, 11, 7, 5, 8)
    plain = generate_ids(model, TOK, prompts, max_new_tokens=30, heads=1, batch_size=4, stop=["f"])
    for k, refill_min in ((1, 3), (4, 2), (4, 4)):
        gen = Decoder(model, heads=k, batch_size=4, max_len=64, refill_min=refill_min).run(
            prompts, 30, tokenizer=TOK, stop=["f"])
        assert gen.tokens == plain.tokens and gen.finish == plain.finish
        assert gen.stats.idle_row_steps > 0
        assert gen.stats.forwards < gen.stats.steps + len(prompts)  # prefills were batched
    assert gen.stats.to_dict()["idle_row_steps"] == gen.stats.idle_row_steps


def test_occupancy_counts_the_rows_a_shrinking_batch_still_decodes():
    """Rows that end early leave the batch (compaction): the steps go on for the longest
    row alone. Three rows of 30, 24 and 14 tokens (the cache ends the shorter two) take
    29 steps of plain decoding (the prefill yields each first token) with 29 + 23 + 13
    live row steps: occupancy 65 / (3 x 29)."""
    model = trained_model("unembed")
    prompts = prompts_of_lengths(5, 15, 25)
    gen = Decoder(model, heads=1, batch_size=3, max_len=40).run(prompts, 30)
    assert [len(t) for t in gen.tokens] == [30, 24, 14] and set(gen.finish) == {"length"}
    assert (gen.stats.steps, gen.stats.row_steps) == (29, 65)
    assert gen.stats.occupancy == pytest.approx(65 / 87)
    assert gen.stats.to_dict()["occupancy"] == gen.stats.occupancy
    full = Decoder(model, heads=1, batch_size=3, max_len=64).run(prompts, 30)
    assert full.stats.occupancy == 1.0  # every row runs to max_new: no tail


def test_compiled_step_is_traced_once_per_shape(monkeypatch):
    """With compile=True the step is traced once per (rows, length bucket) it meets (the
    tracing is torch.compile's; the eager backend keeps the test fast) and decodes what
    the eager step decodes."""
    from torch._dynamo.utils import counters

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend="eager", **kw))
    model = trained_model("unembed")
    prompts = prompts_of_lengths(4, 9, 2, 14, 6)
    eager = Decoder(model, heads=4, batch_size=2, max_len=64, cache_block=16).run(prompts, 20)
    torch._dynamo.reset()
    counters.clear()
    limit = torch._dynamo.config.cache_size_limit
    decoder = Decoder(model, heads=4, batch_size=2, max_len=64, cache_block=16, compile=True)
    shapes, real_step = set(), decoder.engine.step

    def step(b, length=None):
        lb = real_step(b, length)
        shapes.add((b, lb))  # rows and length bucket (without CUDA graphs, b is the step's rows)
        return lb

    monkeypatch.setattr(decoder.engine, "step", step)
    with decoder:
        assert torch._dynamo.config.cache_size_limit >= 1024
        gen = decoder.run(prompts, 20)
    assert gen.tokens == eager.tokens and len(shapes) >= 3
    assert counters["stats"]["unique_graphs"] == len(shapes)
    assert torch._dynamo.config.cache_size_limit == limit  # torch's own limit once the decoder is closed


def test_speculative_acceptance_is_exercised():
    """The trained drafters are good but not perfect: equality above is not vacuous."""
    for head_type in ("transformer", "linear", "unembed"):
        gen = generate_ids(trained_model(head_type), TOK, prompts_of_lengths(3, 8, 12), max_new_tokens=30, heads=N_FUTURE)
        first = gen.stats.acceptance_by_depth[0]
        assert 0.05 < first < 0.98, (head_type, first)


def test_rows_advance_at_the_context_limit():
    """Rows that reach the model's context stop there, with any number of heads, and
    speculative drafts past the last cache slot change nothing."""
    model = trained_model("unembed")
    prompts = prompts_of_lengths(80, 60, 90)
    plain = generate_ids(model, TOK, prompts, max_new_tokens=50, heads=1, batch_size=2)
    assert [len(p) + len(t) for p, t in zip(prompts, plain.tokens) if plain.finish[prompts.index(p)] == "length"] \
        == [min(len(p) + 50, 96) for p, f in zip(prompts, plain.finish) if f == "length"]
    for k in (2, 4):
        assert generate_ids(model, TOK, prompts, max_new_tokens=50, heads=k, batch_size=3).tokens == plain.tokens


def test_decoder_is_reusable_and_sampling_is_seeded():
    model = trained_model("transformer")
    prompts = prompts_of_lengths(3, 5, 8, 2)
    dec = Decoder(model, heads=3, batch_size=2, max_len=64, sampling=Sampling(0.8, 0.95))
    a = dec.run(prompts, 20, tokenizer=TOK, seed=7)
    b = dec.run(prompts, 20, tokenizer=TOK, seed=7)
    c = dec.run(prompts, 20, tokenizer=TOK, seed=8)
    assert a.tokens == b.tokens and a.tokens != c.tokens
    greedy = Decoder(model, heads=3, batch_size=2, max_len=64)
    assert greedy.run(prompts, 20, tokenizer=TOK).tokens == greedy.run(prompts[::-1], 20, tokenizer=TOK).tokens[::-1]
    # an evaluation adds up the counters of its chunks
    both = a.stats.merge(c.stats)
    assert (both.sequences, both.tokens, both.steps) == (8, a.stats.tokens + c.stats.tokens, a.stats.steps + c.stats.steps)
    assert both.accepted == [x + y for x, y in zip(a.stats.accepted, c.stats.accepted)]
    assert both.bytes == a.stats.bytes + c.stats.bytes
    assert both.tokens_per_forward == pytest.approx(both.tokens / (a.stats.row_forwards + c.stats.row_forwards))
    with pytest.raises(ValueError, match="different decoders"):
        a.stats.merge(DecodeStats(heads=1, batch_size=2))


def test_a_finished_decoder_frees_its_cache_without_the_cycle_collector():
    """An evaluation builds a decoder per chunk; each one's KV cache must go when the
    decoder does, not when Python's cyclic collector next runs (else several evaluations
    in one process keep the caches of earlier chunks alive and can run out of GPU memory)."""
    import gc
    import weakref

    model = trained_model("transformer")
    gc.collect()
    gc.disable()
    try:
        for k in (1, 3):
            dec = Decoder(model, heads=k, batch_size=2, max_len=64, sampling=Sampling(0.8, 0.95))
            dec.run(prompts_of_lengths(4, 6), 10, tokenizer=TOK, seed=1)
            cache = weakref.ref(dec.engine.cache)
            del dec
            assert cache() is None
    finally:
        gc.enable()


def test_generate_returns_completions_cut_at_stops():
    model = trained_model("unembed")
    prompts = ["adgj", "ace", "mnop"]
    full = generate(model, TOK, prompts, max_new_tokens=30)
    assert len(full) == 3 and all(isinstance(t, str) for t in full)
    expected = [TOK.decode(reference_greedy(model, encode_prompt(TOK, p), 30)) for p in prompts]
    assert full == expected
    cut = generate(model, TOK, prompts, max_new_tokens=30, stop=["m", "ik"], heads=3)
    assert cut == [cut_at_stop(t, ["m", "ik"]) for t in full]
    assert all("m" not in t and "ik" not in t for t in cut)
    assert generate(model, TOK, [], max_new_tokens=5) == []
    sampled = generate(model, TOK, prompts, max_new_tokens=10, temperature=1.0, top_p=0.9, heads=2, seed=3)
    assert sampled == generate(model, TOK, prompts, max_new_tokens=10, temperature=1.0, top_p=0.9, heads=2, seed=3)


def test_cut_at_stop_takes_the_earliest():
    assert cut_at_stop("abc\ndef\nclass", ["\nclass", "\nd"]) == "abc"
    assert cut_at_stop("abc", ["x"]) == "abc"
    assert cut_at_stop("abc", []) == "abc"


def test_bad_input_is_a_user_error():
    model = trained_model("linear")
    with pytest.raises(UserError, match="5 heads asked for, but the model has 4"):
        generate(model, TOK, ["a"], max_new_tokens=5, heads=5)
    with pytest.raises(UserError, match="prompt 1 has 100 tokens"):
        generate_ids(model, TOK, [[1, 2], [3] * 100], max_new_tokens=5)
    with pytest.raises(UserError, match="top_p"):
        generate(model, TOK, ["a"], max_new_tokens=5, temperature=1.0, top_p=0.0)
    one_head = MTPTransformer(ModelConfig(n_layers=2, d_model=16, n_heads=2, context=32, vocab_size=258))
    with pytest.raises(UserError, match="model has 1"):
        generate(one_head, TOK, ["a"], max_new_tokens=5, heads=2)


# ----------------------------------------------------------------------------- length buckets


class _GraphRehearsal(Decoder):
    """The CUDA-graph mode's control flow on a CPU: steps run on row buckets (1, 2, 4, ...:
    padding rows are free slots), small prefills on prompts right-padded to a multiple of
    PREFILL_BLOCK, and the first step or prefill of each shape is preceded by what
    `_capture` runs before recording it, warm-ups whose effects on the step's buffers are
    undone (the "graph" replays an eager step or prefill)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        engine = self.engine
        engine._row_buckets = sorted({min(1 << i, self.B) for i in range(self.B.bit_length() + 1)})

        def capture(graphs, key, fn):
            with engine._preserved_inputs():
                for _ in range(3):
                    fn(*key)
            graphs[key] = SimpleNamespace(replay=lambda: fn(*key))

        engine._capture = capture


def test_length_buckets():
    model = trained_model("unembed")
    dec = Decoder(model, heads=2, batch_size=2, max_len=90, cache_block=8)
    assert [dec.engine.length_bucket(n) for n in (1, 8, 9, 17, 88, 89, 90)] == [8, 8, 16, 24, 88, 90, 90]
    assert dec.engine.length_bucket(None) == 90
    assert Decoder(model, max_len=90).engine.length_bucket(3) == 90  # the default block (256) exceeds the cache
    with pytest.raises(UserError, match="cache block"):
        Decoder(model, cache_block=0)


@pytest.mark.parametrize("head_type, seed, stop", [("transformer", 3, ["b", "k"]), ("linear", 1, ["c"]),
                                                   ("unembed", 3, ["c"])])
def test_steps_over_a_cache_prefix_change_no_token(head_type, seed, stop):
    """Steps that read only the length bucket above the longest live row (blocks of 8
    positions: prompts of 10-30 tokens and 40 new tokens cross several buckets, rows of
    different lengths stop at different times) give the tokens of steps over the whole
    cache, greedy plain and speculative, at several batch sizes, also in the graph mode's
    row buckets with warm-up steps before each new (rows, length) pair."""
    model = trained_model(head_type)
    prompts = prompts_of_lengths(10, 27, 14, 30, 19, 12, seed=seed)
    for k, batch, cls in ((1, 3, Decoder), (2, 8, Decoder), (4, 1, Decoder), (4, 5, Decoder),
                          (1, 5, _GraphRehearsal), (3, 3, _GraphRehearsal)):
        ref = Decoder(model, heads=k, batch_size=batch, max_len=96, cache_block=96)
        dec = cls(model, heads=k, batch_size=batch, max_len=96, cache_block=8)
        a = ref.run(prompts, 40, tokenizer=TOK, stop=stop)
        b = dec.run(prompts, 40, tokenizer=TOK, stop=stop)
        assert b.tokens == a.tokens and b.finish == a.finish, (k, batch, cls.__name__)
        assert len({len(t) for t in a.tokens}) > 2  # rows end at different times
        assert a.stats.step_positions == 96 * a.stats.steps
        assert b.stats.step_positions < 0.7 * a.stats.step_positions
        assert len({length for _, length in dec.engine._views}) >= 3  # several length buckets


def test_sampling_over_a_cache_prefix_draws_the_same_samples():
    model = trained_model("transformer")
    prompts = prompts_of_lengths(11, 26, 17, 8, 22, seed=4)
    s = Sampling(0.8, 0.95)
    for k, batch, cls in ((1, 2, Decoder), (3, 3, Decoder), (3, 4, _GraphRehearsal)):
        # (graph mode draws uniforms for a bucket's rows: the reference runs in the same mode)
        ref = cls(model, heads=k, batch_size=batch, max_len=96, sampling=s, cache_block=1000)
        dec = cls(model, heads=k, batch_size=batch, max_len=96, sampling=s, cache_block=8)
        a, b = ref.run(prompts, 40, tokenizer=TOK, seed=5), dec.run(prompts, 40, tokenizer=TOK, seed=5)
        assert b.tokens == a.tokens and b.finish == a.finish, (k, batch, cls.__name__)
        assert b.stats.step_positions < a.stats.step_positions
        assert len({length for _, length in dec.engine._views}) >= 3
    assert a.tokens != ref.run(prompts, 40, tokenizer=TOK, seed=6).tokens  # the samples depend on the seed


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("head_type", ["transformer", "linear", "unembed"])
def test_flex_attention_steps_give_the_sdpa_steps_tokens(head_type):
    """attention="flex" (the FlexAttention block mask over each row's positions; here its
    unfused reference, float64) against the boolean-mask SDPA step: the same tokens, plain
    and speculative, several batch sizes, length buckets, graph-mode row buckets, rows that
    stop early; and the same samples at temperature > 0."""
    model = trained_model(head_type)
    prompts = prompts_of_lengths(10, 27, 3, 30, 19, 12, seed=2)
    for k, batch, cls, split in ((1, 3, Decoder, 0), (2, 8, Decoder, 0), (4, 1, Decoder, 2), (3, 5, _GraphRehearsal, 0)):
        ref = Decoder(model, heads=k, batch_size=batch, max_len=96, cache_block=8)
        dec = cls(model, heads=k, batch_size=batch, max_len=96, cache_block=8, attention="flex", flex_split_kv=split)
        a = ref.run(prompts, 40, tokenizer=TOK, stop=["c"])
        b = dec.run(prompts, 40, tokenizer=TOK, stop=["c"])
        assert b.tokens == a.tokens and b.finish == a.finish, (k, batch, cls.__name__)
        assert len({len(t) for t in a.tokens}) > 2
    s = Sampling(0.8, 0.95)
    ref = Decoder(model, heads=3, batch_size=4, max_len=96, sampling=s, cache_block=8)
    dec = Decoder(model, heads=3, batch_size=4, max_len=96, sampling=s, cache_block=8, attention="flex")
    assert dec.run(prompts, 40, tokenizer=TOK, seed=3).tokens == ref.run(prompts, 40, tokenizer=TOK, seed=3).tokens
    with pytest.raises(UserError, match="compiled FlexAttention decoding needs a CUDA device"):
        Decoder(model, attention="flex", compile=True)
    with pytest.raises(UserError, match="split count must be >= 0"):
        Decoder(model, attention="flex", flex_split_kv=-1)



@pytest.mark.parametrize("sampling", [Sampling(), Sampling(0.8, 0.95)])
def test_graphed_prefills_give_the_eager_prefills_outputs(sampling, monkeypatch):
    """Graph mode captures small prefills with their prompts padded to a multiple of
    PREFILL_BLOCK (here 16, the cache 96): the tokens and samples are those of exact-length
    eager prefills, for first prefills and for refills of 1-3 slots, plain and speculative."""
    import bytelm.step_engine as engine

    model = trained_model("transformer")
    prompts = prompts_of_lengths(10, 27, 3, 30, 19, 12, 5, 22, seed=7)
    monkeypatch.setattr(engine, "PREFILL_BLOCK", 16)
    for k, batch in ((1, 3), (3, 2), (4, 4)):
        monkeypatch.setattr(engine, "PREFILL_GRAPH_TOKENS", 0)  # every prefill eager, exact length
        ref = _GraphRehearsal(model, heads=k, batch_size=batch, max_len=96, sampling=sampling, refill_min=1)
        a = ref.run(prompts, 30, tokenizer=TOK, stop=["c"], seed=2)
        monkeypatch.setattr(engine, "PREFILL_GRAPH_TOKENS", 4096)
        dec = _GraphRehearsal(model, heads=k, batch_size=batch, max_len=96, sampling=sampling, refill_min=1)
        b = dec.run(prompts, 30, tokenizer=TOK, stop=["c"], seed=2)
        assert b.tokens == a.tokens and b.finish == a.finish, (k, batch)
        assert not ref.engine._prefill_graphs
        assert {T for _, T in dec.engine._prefill_graphs} >= {16, 32} and all(T % 16 == 0 for _, T in dec.engine._prefill_graphs)
