"""The per-step arithmetic of bytelm.speculative, and speculative sampling's exactness on
a real (random, tiny) model: the sampled distribution is head 1's, whatever the drafts."""

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from bytelm.config import ModelConfig
from bytelm.generate import Decoder
from bytelm.model import MTPTransformer
from bytelm.speculative import Sampling, probs, sample, verify


def chi2_pvalue(observed: np.ndarray, expected_p: np.ndarray) -> float:
    """Pearson's test, with the cells expected to hold < 5 samples pooled into one."""
    n = observed.sum()
    exp = expected_p * n
    keep = exp >= 5
    o, e = list(observed[keep]), list(exp[keep])
    if exp[~keep].sum() > 0:
        o.append(observed[~keep].sum())
        e.append(exp[~keep].sum())
    o, e = np.array(o, dtype=float), np.array(e)
    return chisquare(o, e * o.sum() / e.sum()).pvalue


VOCAB, PROMPT, SAMPLING = 6, [1, 4, 2], Sampling(temperature=1.0, top_p=0.9)


def sampling_model(head_type: str) -> tuple[MTPTransformer, np.ndarray]:
    """A random 3-head model over 6 tokens (float64) and the exact joint distribution of the
    3 tokens it samples after PROMPT (216 outcomes, index a·36 + b·6 + c), computed from
    no-cache forwards."""
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=4, d_model=16, n_heads=2, context=16, vocab_size=VOCAB, n_future=3,
                      head_type=head_type, init_std=0.5)
    model = MTPTransformer(cfg).double().eval()
    seqs = torch.tensor(list(itertools.product(range(VOCAB), repeat=2)))
    with torch.no_grad():
        x = torch.cat([torch.tensor(PROMPT).expand(len(seqs), -1), seqs], dim=1)
        p = probs(model(x, n_heads=1)[:, :, 0], SAMPLING)  # (36, len, 6)
    L, rows = len(PROMPT), torch.arange(len(seqs))
    joint = (p[0, L - 1][seqs[:, 0]] * p[rows, L, seqs[:, 1]])[:, None] * p[:, L + 1]
    return model, joint.flatten().numpy()


def assert_sampled_from(tokens: list[list[int]], joint: np.ndarray) -> None:
    """Samples of 3 tokens each follow `joint` (a chi-squared test and the total variation)."""
    assert all(len(t) == 3 for t in tokens)
    observed = np.bincount([a * VOCAB**2 + b * VOCAB + c for a, b, c in tokens], minlength=VOCAB**3)
    assert chi2_pvalue(observed, joint) > 1e-3
    assert 0.5 * np.abs(observed / len(tokens) - joint).sum() < 0.03


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]], dtype=torch.float64))
    p = probs(logits, Sampling(1.0, 0.7))  # 0.5 + 0.2 reaches 0.7
    assert torch.allclose(p, torch.tensor([[5 / 7, 2 / 7, 0, 0, 0]], dtype=torch.float64))
    p = probs(logits, Sampling(1.0, 0.71))  # needs the third token too
    assert torch.allclose(p[0, :3], torch.tensor([0.5, 0.2, 0.15], dtype=torch.float64) / 0.85)
    assert probs(logits, Sampling(1.0, 0.3))[0].tolist() == [1.0, 0, 0, 0, 0]  # the top token always stays
    assert torch.allclose(probs(logits, Sampling(1.0, 1.0)), logits.exp())
    hot = probs(logits, Sampling(2.0, 1.0))  # temperature flattens
    assert hot[0, 0] < 0.5 and hot[0, 4] > 0.05


def test_sample_follows_unnormalised_weights_and_skips_zeros():
    g = torch.Generator().manual_seed(0)
    w = torch.tensor([0.0, 2.0, 0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    draws = sample(w.expand(200_000, -1), torch.rand(200_000, generator=g, dtype=torch.float64))
    counts = np.bincount(draws.numpy(), minlength=6)
    assert counts[[0, 2, 5]].sum() == 0
    assert chi2_pvalue(counts[[1, 3, 4]], np.array([0.5, 0.25, 0.25])) > 1e-3


def test_greedy_verify_keeps_the_agreeing_prefix():
    V = 5
    # head 1's argmax after each of the 4 inputs: 3, 1, 4, 2
    g = torch.tensor([[3, 1, 4, 2], [3, 1, 4, 2], [3, 1, 4, 2]])
    logits = torch.nn.functional.one_hot(g, V).double()
    tokens = torch.tensor([[0, 3, 1, 4],    # all three drafts right -> 4 tokens
                           [0, 3, 0, 4],    # second draft wrong -> 3, then the correction 1
                           [0, 2, 1, 4]])   # first draft wrong -> only head 1's token 3
    emitted, n_acc = verify(logits, tokens, None, Sampling(), None)
    assert n_acc.tolist() == [3, 1, 0]
    assert emitted[0].tolist() == [3, 1, 4, 2]
    assert emitted[1, :2].tolist() == [3, 1]
    assert emitted[2, :1].tolist() == [3]


def test_one_speculative_sampling_step_is_exact():
    """Fixed p (head 1) and q (the drafter): the first token of a block is distributed
    as p_1 and, given an accepted first draft, the second as p_2."""
    g = torch.Generator().manual_seed(1)
    V, N = 6, 400_000
    s = Sampling(1.0)
    logit_p = torch.randn(3, V, generator=g, dtype=torch.float64) * 1.5  # p_1, p_2, p_3
    logit_q = torch.randn(2, V, generator=g, dtype=torch.float64) * 1.5  # q_1, q_2
    p, q = probs(logit_p, s), probs(logit_q, s)
    drafts = sample(q.expand(N, -1, -1), torch.rand(N, 2, generator=g, dtype=torch.float64))
    tokens = torch.cat([torch.zeros(N, 1, dtype=torch.long), drafts], dim=1)
    u = torch.rand(N, 3, generator=g, dtype=torch.float64)
    emitted, n_acc = verify(logit_p.expand(N, -1, -1), tokens, q.expand(N, -1, -1), s, u)
    assert 0.1 < (n_acc >= 1).double().mean() < 0.9  # both branches are exercised
    first = np.bincount(emitted[:, 0].numpy(), minlength=V)
    assert chi2_pvalue(first, p[0].numpy()) > 1e-3
    second = np.bincount(emitted[n_acc >= 1, 1].numpy(), minlength=V)
    assert chi2_pvalue(second, p[1].numpy()) > 1e-3
    # The drafts alone are distributed as q, which is far from p: the test has power.
    assert chi2_pvalue(np.bincount(drafts[:, 0].numpy(), minlength=V), p[0].numpy()) < 1e-6


@pytest.mark.parametrize("head_type,k", [("unembed", 3), ("transformer", 3), ("linear", 2), ("sequential", 3)])
def test_speculative_sampling_keeps_the_model_distribution(head_type, k):
    """The joint distribution of 3 sampled tokens (216 outcomes) equals the model's own,
    computed exactly from no-cache forwards, for plain and speculative sampling."""
    model, joint = sampling_model(head_type)
    gen = Decoder(model, heads=k, batch_size=2000, max_len=10, sampling=SAMPLING).run([PROMPT] * 20_000, 3, seed=k)
    assert 0.05 < gen.stats.acceptance_by_depth[0] < 0.95
    assert_sampled_from(gen.tokens, joint)
