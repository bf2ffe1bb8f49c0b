"""Self-speculative decoding with sequential heads (one module per drafted token): greedy
output equals plain greedy output, at batch 1 and above, on random and on trained weights,
and the drafts the modules make are the ones a no-cache forward of the module chain makes."""

from functools import lru_cache

import pytest
import torch
import torch.nn.functional as F

from bytelm.config import ModelConfig
from bytelm.errors import UserError
from bytelm.generate import generate_ids
from bytelm.model import MTPTransformer
from bytelm.step_engine import StepEngine
from bytelm.speculative import Sampling
from tests.test_generate import TOK, documents, prompts_of_lengths

N = 4


def sequential_model(trained: bool) -> MTPTransformer:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=N + 1, d_model=32, n_heads=4, n_kv_heads=2, context=96, vocab_size=TOK.vocab_size,
                      n_future=N, head_type="sequential")
    model = MTPTransformer(cfg)
    if trained:  # as test_generate's trained_model, with the true future tokens for the modules
        g = torch.Generator().manual_seed(0)
        data = documents(600, g)
        opt = torch.optim.Adam(model.parameters(), lr=2e-2)
        T = 24
        for _ in range(60):
            starts = torch.randint(0, len(data) - T - N, (8,), generator=g).tolist()
            w = torch.stack([data[i : i + T + N] for i in starts])
            y = torch.stack([w[:, i + 1 : i + 1 + T] for i in range(N)], dim=-1)
            logits = model(w[:, :T], future=y)
            loss = sum(F.cross_entropy(logits[:, :, i].flatten(0, 1), y[..., i].flatten()) for i in range(N))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.double().eval()


@lru_cache(maxsize=None)
def model_for(trained: bool) -> MTPTransformer:
    return sequential_model(trained)


@pytest.mark.parametrize("trained", [False, True])
def test_sequential_speculative_greedy_equals_plain_greedy(trained):
    model = model_for(trained)
    prompts = prompts_of_lengths(1, 7, 3, 15, 2, 11, 5, 24, 9)
    for stop in ([], ["pa", "e"]):
        plain = generate_ids(model, TOK, prompts, max_new_tokens=40, heads=1, batch_size=4, stop=stop)
        for k in range(2, N + 1):
            for batch in (1, 3, 8):
                spec = generate_ids(model, TOK, prompts, max_new_tokens=40, heads=k, batch_size=batch, stop=stop)
                assert spec.tokens == plain.tokens, (k, batch, stop)
                assert spec.finish == plain.finish
                assert spec.stats.tokens == plain.stats.tokens
    if trained:  # the drafts are good but not perfect: the equality is not vacuous
        s = generate_ids(model, TOK, prompts, max_new_tokens=40, heads=N, batch_size=3).stats
        assert 0.2 < s.acceptance_by_depth[0] < 1 and s.acceptance_by_depth[-1] > 0.02
        assert s.tokens_per_forward > 1.5


def test_the_modules_draft_what_a_no_cache_forward_drafts():
    """After every step the engine's next drafts are those of the module chain run without
    a cache over the committed text and the drafts before them: the modules' cache entries
    hold what training computes (the stale ones, written with rejected drafts, rewritten)."""
    model = model_for(True)
    k = N
    with torch.inference_mode():
        check_drafts(model, k)


def check_drafts(model, k):
    for prompt in prompts_of_lengths(2, 9, seed=3):
        engine = StepEngine(model, heads=k, batch_size=1, max_len=80, sampling=Sampling())
        engine.prefill([0], [prompt])
        text = list(prompt)
        for _ in range(12):
            committed = text + [int(engine.tokens[0, 0])]
            drafts = engine.tokens[0, 1:].tolist()
            # the chain at q, the position before the newest committed token (the one whose
            # head 1 emitted it): module j at t reads x_{t+j}, a draft past the committed text
            seq = committed + drafts
            q = len(committed) - 2
            z = model.trunk(torch.tensor([seq[: q + 1]]))
            h = z
            expect = []
            for j in range(1, k):
                future = torch.tensor([seq[j : q + 1 + j]])
                h = model.head_depth(j, h, future)
                expect.append(int(model.head_logits(j, h[:, -1:]).argmax(-1)))
            assert drafts == expect, (prompt, len(text))
            engine.step(1)
            out = engine.out[0].tolist()
            text = committed + out[: out[k]]  # accepted drafts (the last emitted token is the next committed one)


def test_tree_decoding_with_sequential_heads_is_a_clear_error():
    from bytelm.tree import Tree

    with pytest.raises(UserError, match="sequential heads draft one after another"):
        StepEngine(model_for(False), heads=3, batch_size=1, max_len=32, sampling=Sampling(), tree=Tree.chain(3))
