"""Model shapes, parameter matching, KV cache, and the two loss orders."""

import copy

import pytest
import torch

from bytelm.config import ModelConfig, RunConfig, validate
from bytelm.errors import UserError
from bytelm.loss import IGNORE, head_groups, loss_and_backward
from bytelm.model import MTPTransformer


def tiny(head_type="transformer", n=2, **kw):
    base = dict(n_layers=3 if head_type != "transformer" else max(3, n + 1), d_model=32, n_heads=4, context=64,
                vocab_size=50, n_future=n, head_type=head_type)
    base.update(kw)
    return ModelConfig(**base)


def random_targets(x, n, p_mask=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, T = x.shape
    y = torch.randint(0, 50, (B, T, n), generator=g)
    y[torch.rand(B, T, n, generator=g) < p_mask] = IGNORE
    return y


@pytest.mark.parametrize("head_type", ["transformer", "linear", "unembed"])
def test_forward_shapes(head_type):
    torch.manual_seed(0)
    m = MTPTransformer(tiny(head_type, n=3))
    x = torch.randint(0, 50, (2, 10))
    assert m(x).shape == (2, 10, 3, 50)
    assert m(x, n_heads=1).shape == (2, 10, 1, 50)


def test_match_params_keeps_parameter_count():
    counts = {n: MTPTransformer(tiny("transformer", n=n, n_layers=6)).param_counts()["params"] for n in (1, 2, 4)}
    assert counts[1] == counts[2] == counts[4]
    bigger = MTPTransformer(tiny("transformer", n=4, n_layers=6, match_params=False)).param_counts()["params"]
    assert bigger > counts[1]


def test_too_many_transformer_heads_is_a_clear_error():
    cfg = RunConfig()
    cfg.model.n_layers, cfg.model.n_future = 4, 4
    with pytest.raises(UserError, match="model.n_future"):
        validate(cfg)


def test_validate_checks_without_changing_the_config(tmp_path):
    """validate only reads; YAML's `compile: true` becomes the field's string on loading."""
    import copy

    from bytelm.config import load_config

    cfg = RunConfig()
    cfg.train.compile = "True"
    before = copy.deepcopy(cfg)
    with pytest.raises(UserError, match="train.compile"):
        validate(cfg)
    assert cfg == before
    (tmp_path / "c.yaml").write_text("train:\n  compile: true\n")
    assert load_config(tmp_path / "c.yaml").train.compile == "true"


def test_heads_are_causal():
    """Logits at position t must not depend on tokens after t (for every head)."""
    torch.manual_seed(0)
    for ht in ("transformer", "linear", "unembed"):
        m = MTPTransformer(tiny(ht, n=3)).double()
        x = torch.randint(0, 50, (1, 12))
        x2 = x.clone()
        x2[0, 7:] = (x2[0, 7:] + 1) % 50
        assert torch.allclose(m(x)[:, :7], m(x2)[:, :7])


@pytest.mark.parametrize("head_type", ["transformer", "linear", "unembed"])
def test_kv_cache_matches_full_forward(head_type):
    """Prefill a prefix, then feed the rest in chunks of different sizes per call; every
    position's logits equal those of the no-cache forward."""
    torch.manual_seed(1)
    m = MTPTransformer(tiny(head_type, n=3, n_kv_heads=2)).double().eval()
    x = torch.randint(0, 50, (3, 20))
    full = m(x)
    cache = m.new_cache(3, 32)
    outs, pos = [], 0
    for step in (5, 1, 3, 1, 10):
        chunk = x[:, pos:pos + step]
        positions = torch.arange(pos, pos + step)[None].expand(3, -1)
        outs.append(m.forward_cached(chunk, positions, cache, n_heads=3))
        pos += step
    assert torch.allclose(torch.cat(outs, 1), full, atol=1e-10)


def test_kv_cache_rows_advance_independently():
    """Row 0 is fed 1 token per call, row 1 three tokens per call (stale slots beyond a
    row's length must never be seen)."""
    torch.manual_seed(2)
    m = MTPTransformer(tiny("transformer", n=2)).double().eval()
    x = torch.randint(0, 50, (2, 12))
    full = m(x)
    cache = m.new_cache(2, 16)
    # Both rows prefill 3 tokens; then row 0 writes garbage ahead that is later overwritten.
    m.forward_cached(x[:, :3], torch.arange(3)[None].expand(2, -1), cache, 2)
    junk = torch.randint(0, 50, (2, 3))
    m.forward_cached(junk, torch.tensor([[3, 4, 5], [3, 4, 5]]), cache, 2)  # rejected drafts
    out = m.forward_cached(x[:, 3:6], torch.tensor([[3, 4, 5], [3, 4, 5]]), cache, 2)
    assert torch.allclose(out, full[:, 3:6], atol=1e-10)
    # Now row 0 at position 6, row 1 at position 6 but they feed different lengths via padding:
    idx = torch.stack([x[0, 6:8], x[1, 6:8]])
    out = m.forward_cached(idx, torch.tensor([[6, 7], [6, 7]]), cache, 2)
    assert torch.allclose(out, full[:, 6:8], atol=1e-10)


@pytest.mark.parametrize("head_type,n", [("transformer", 1), ("transformer", 4), ("linear", 3), ("unembed", 8), ("unembed", 32), ("linear", 32)])
@pytest.mark.parametrize("heads_per_group", [1, 3])
def test_memory_efficient_loss_equals_naive(head_type, n, heads_per_group, monkeypatch):
    """Same loss and same gradients, float64 on CPU, random model and data; heads
    backpropagated one at a time and in groups of three (as small-vocabulary heads are)."""
    monkeypatch.setattr("bytelm.loss.LOGITS_PER_GROUP", 50 * heads_per_group)
    torch.manual_seed(3)
    cfg = tiny(head_type, n=n, n_layers=n + 1 if head_type == "transformer" else 2, context=48)
    m1 = MTPTransformer(cfg).double()
    m2 = copy.deepcopy(m1)
    x = torch.randint(0, 50, (2, 40))
    y = random_targets(x, n)
    w = [1.0 / (i + 1) for i in range(n)]
    a = loss_and_backward(m1, x, y, w, mode="naive", scale=0.5)
    b = loss_and_backward(m2, x, y, w, mode="memory_efficient", scale=0.5)
    assert a.total == pytest.approx(b.total, rel=1e-12)
    assert a.per_head == pytest.approx(b.per_head, rel=1e-12)
    for (name, p1), (_, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.allclose(p1.grad, p2.grad, rtol=1e-9, atol=1e-12), name


def test_head_groups_cover_every_head_once():
    assert head_groups(5, 32768) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    assert head_groups(32, 258) == [(0, 32)]
    assert head_groups(4, 10000) == [(0, 3), (3, 4)]


def test_masked_targets_do_not_contribute():
    torch.manual_seed(4)
    m = MTPTransformer(tiny("unembed", n=2)).double()
    x = torch.randint(0, 50, (1, 16))
    y = random_targets(x, 2, p_mask=0.0)
    y2 = y.clone()
    y2[0, 5:, 1] = IGNORE
    base = loss_and_backward(m, x, y2, [0.0, 1.0]).per_head[1]
    y3 = y2.clone()
    y3[0, 5:, 1] = IGNORE  # identical mask, different hidden values
    assert loss_and_backward(m, x, y3, [0.0, 1.0]).per_head[1] == pytest.approx(base)
    # and the masked positions really are excluded from the mean
    logits = m(x)[0, :5, 1]
    expect = torch.nn.functional.cross_entropy(logits, y2[0, :5, 1]).item()
    assert base == pytest.approx(expect, rel=1e-9)


def test_flops_and_params_are_consistent():
    m1 = MTPTransformer(tiny("unembed", n=1, context=64))
    m8 = MTPTransformer(tiny("unembed", n=8, context=64))
    extra = m8.flops_per_token(64) - m1.flops_per_token(64)
    assert extra == 3 * 7 * 2 * 50 * 32  # 7 more unembeddings, fwd+bwd
    pc = m8.param_counts()
    assert pc["params"] - pc["params_non_embedding"] == 50 * 32 + 8 * 50 * 32


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_the_cache_block_mask_reads_the_blocks_create_block_mask_reads():
    """cache_block_mask (built from the positions) against create_block_mask (the rule
    evaluated on every query-key pair), at random positions of decoding steps of 1..9
    queries over caches of 1..7 blocks, block boundaries and clamped positions at the
    cache's end included: every row reads the same key blocks; each block it calls full is
    seen whole by every query (create_block_mask calls none full: it counts the padding of
    the query block as queries that see nothing); each partial one is seen in part; and
    FlexAttention gives the same attention through both."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from bytelm.model import cache_block_mask

    def blocks(mask, r):
        """(partial, full) key blocks of row r."""
        return [set(getattr(mask, idx)[r, 0, 0, : int(getattr(mask, num)[r, 0, 0])].tolist())
                for num, idx in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices"))]

    g = torch.Generator().manual_seed(0)
    for T, L, block in ((1, 100, 16), (8, 448, 128), (9, 64, 16), (4, 50, 16), (3, 33, 16)):
        first = torch.randint(0, L, (12,), generator=g)
        first[:4] = torch.tensor([block - 1, block - 2, 0, L - 1])  # around a boundary, the start, the end
        positions = (first[:, None] + torch.arange(T)).clamp_max(L - 1)
        ours = cache_block_mask(positions, L, block=block)
        ref = create_block_mask(lambda b, h, q, kv: kv <= positions[b, q], len(first), None, T, L, device="cpu",
                                BLOCK_SIZE=block)
        sees = torch.arange(L)[None, None, :] <= positions[:, :, None]  # (rows, T, L)
        for r in range(len(first)):
            partial, full = blocks(ours, r)
            assert partial | full == set.union(*blocks(ref, r)) and not partial & full, (T, L, r)
            for j in full:
                assert sees[r, :, j * block : (j + 1) * block].all() and (j + 1) * block <= L, (T, L, r, j)
            for j in partial:
                assert sees[r, :, j * block : (j + 1) * block].any(), (T, L, r, j)
        assert any(blocks(ours, r)[1] for r in range(len(first)))  # full blocks are found, not only partial ones
        q = torch.randn(len(first), 2, T, 8, generator=g)
        k, v = torch.randn(2, len(first), 2, L, 8, generator=g)
        torch.testing.assert_close(flex_attention(q, k, v, block_mask=ours), flex_attention(q, k, v, block_mask=ref))


def test_materialise_copies_into_a_contiguous_tensor_under_torch_compile():
    """model.materialise (the query copy of multi-position flex steps): a new contiguous
    tensor equal to its input, eagerly and inside a compiled graph whose producer kernel
    writes a transposed layout (the case Inductor got wrong for FlexAttention)."""
    from bytelm.model import materialise

    x = torch.randn(2, 8, 3, 4).transpose(1, 2)  # (B, H, T, hd) view of (B, T, H, hd) memory
    y = materialise(x)
    assert torch.equal(y, x) and y.is_contiguous() and y.data_ptr() != x.data_ptr()
    z = torch.compile(lambda t: materialise(t * 2) + 1, dynamic=False)(x)
    assert torch.equal(z, x * 2 + 1) and z.is_contiguous()
