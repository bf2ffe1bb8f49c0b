"""Model shapes, parameter matching, KV cache, and the two loss orders."""

import copy
import math

import pytest
import torch

from bytelm.config import ModelConfig, RunConfig, validate
from bytelm.errors import UserError
from bytelm.loss import IGNORE, head_groups, loss_and_backward
from bytelm.model import MTPTransformer


def tiny(head_type="transformer", n=2, **kw):
    base = dict(n_layers=3 if head_type not in ("transformer", "sequential") else max(3, n + 1), d_model=32, n_heads=4, context=64,
                vocab_size=50, n_future=n, head_type=head_type)
    base.update(kw)
    return ModelConfig(**base)


def random_targets(x, n, p_mask=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, T = x.shape
    y = torch.randint(0, 50, (B, T, n), generator=g)
    y[torch.rand(B, T, n, generator=g) < p_mask] = IGNORE
    return y


@pytest.mark.parametrize("head_type", ["transformer", "linear", "unembed", "sequential"])
def test_forward_shapes(head_type):
    torch.manual_seed(0)
    m = MTPTransformer(tiny(head_type, n=3))
    x = torch.randint(0, 50, (2, 10))
    y = random_targets(x, 3)
    assert m(x, future=y).shape == (2, 10, 3, 50)
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


@pytest.mark.parametrize("head_type,n", [("transformer", 1), ("transformer", 4), ("linear", 3), ("unembed", 8), ("unembed", 32),
                                         ("linear", 32), ("sequential", 2), ("sequential", 4)])
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


def reference_loss(m, x, y, w):
    """Σ_i w_i · CE_i straight from the model's forward (every head's logits)."""
    logits = m(x, future=y)
    per_head = [torch.nn.functional.cross_entropy(logits[:, :, i].flatten(0, 1), y[..., i].flatten(), ignore_index=IGNORE)
                for i in range(len(w))]
    return sum(wi * l for wi, l in zip(w, per_head)), per_head


@pytest.mark.parametrize("head_type,n", [("unembed", 4), ("linear", 4), ("transformer", 4), ("sequential", 4)])
@pytest.mark.parametrize("w", [[1.0, 0.0, 0.5, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.3, 1.0, 0.2]])
@pytest.mark.parametrize("mode", ["memory_efficient", "naive"])
def test_zero_weight_heads_are_skipped_with_the_gradients_of_weight_zero(head_type, n, w, mode, monkeypatch):
    """A head of weight 0 is not computed: its loss is nan and its own parameters get no
    gradient; every gradient equals that of the full loss with the weight 0 (float64)."""
    monkeypatch.setattr("bytelm.loss.LOGITS_PER_GROUP", 100)  # groups of 2 heads: runs get cut too
    torch.manual_seed(5)
    m1 = MTPTransformer(tiny(head_type, n=n, n_layers=n + 1, context=48)).double()
    m2 = copy.deepcopy(m1)
    x = torch.randint(0, 50, (2, 40))
    y = random_targets(x, n)
    total, per_head = reference_loss(m1, x, y, w)
    (0.5 * total).backward()
    got = loss_and_backward(m2, x, y, w, mode=mode, scale=0.5)
    assert got.total == pytest.approx(float(total.detach()), rel=1e-12)
    for i in range(n):
        if w[i]:
            assert got.per_head[i] == pytest.approx(float(per_head[i]), rel=1e-12)
        else:
            assert math.isnan(got.per_head[i])
    for (name, p1), (_, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        if p2.grad is None:
            assert not p1.grad.any(), name  # a skipped head's parameters: the full loss gives them 0 too
        else:
            assert torch.allclose(p1.grad, p2.grad, rtol=1e-9, atol=1e-12), name
    own = {"linear": "heads.maps.{}.", "transformer": "heads.blocks.{}.", "sequential": "heads.depths.{}."}.get(head_type)
    if own:
        last = max(i for i in range(n) if w[i])
        for i in range(n):
            depth = i - 1 if head_type == "sequential" else i
            if depth < 0:
                continue
            # a sequential head before the last trained one still gives its state to the next
            used = i <= last if head_type == "sequential" else w[i] != 0
            grads = [p.grad for k, p in m2.named_parameters() if k.startswith(own.format(depth))]
            assert all((g is not None) == used for g in grads), (i, used)


def test_sequential_heads_compute_deepseeks_modules():
    """Head i+1's logits = unembed(norm(block(proj([hnorm(state of head i); enorm(emb(x_{t+i}))])))),
    written out here; head 1 reads z; only the true tokens up to x_{t+i} reach head i+1 at t."""
    torch.manual_seed(6)
    m = MTPTransformer(tiny("sequential", n=3, n_layers=4)).double().eval()
    x = torch.randint(0, 50, (2, 12))
    y = random_targets(x, 3, p_mask=0.0)
    logits = m(x, future=y)
    F = torch.nn.functional
    z = m.trunk(x)
    h, spec = z, m.attention_spec(12)
    for i in range(3):
        if i:
            mod = m.heads.depths[i - 1]
            cat = torch.cat([mod.hnorm(h), mod.enorm(m.tok_emb(y[..., i - 1]))], dim=-1)
            h = mod.block(F.linear(cat, mod.proj.weight), spec)
        assert torch.allclose(logits[:, :, i], F.linear(m.norm(h), m.heads.output.weight), atol=1e-12)
    # causal in the inputs, and head i+1 at t reads the future tokens x_{t+1..t+i} only
    x2, y2 = x.clone(), y.clone()
    x2[:, 7:] = (x2[:, 7:] + 1) % 50
    y2[:, 7:] = (y2[:, 7:] + 1) % 50
    y2[:, :7, 2] = (y2[:, :7, 2] + 1) % 50  # x_{t+3}: no head of a 3-head model reads it
    assert torch.allclose(m(x2, future=y2)[:, :7], logits[:, :7])
    y3 = y.clone()
    y3[:, 3, 0] = (y3[:, 3, 0] + 1) % 50
    l3 = m(x, future=y3)
    assert torch.allclose(l3[:, :, 0], logits[:, :, 0])
    assert not torch.allclose(l3[:, 3, 1], logits[:, 3, 1])


def test_sequential_heads_match_params_in_blocks():
    """match_params: the trunk gives up one block per sequential module (head 1 has none),
    so the models differ only by the modules' projections and norms."""
    d = 32
    counts = {n: MTPTransformer(tiny("sequential", n=n, n_layers=6) if n > 1 else tiny("unembed", n=1, n_layers=6)).param_counts()
              for n in (1, 2, 4)}
    for n in (2, 4):
        assert counts[n]["params"] - counts[1]["params"] == (n - 1) * (2 * d * d + 2 * d)
        assert counts[n]["params_trunk"] == counts[1]["params_trunk"] * (6 - n + 1) // 6
    bigger = MTPTransformer(tiny("sequential", n=4, n_layers=6, match_params=False)).param_counts()
    assert bigger["params_trunk"] == counts[1]["params_trunk"]


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
