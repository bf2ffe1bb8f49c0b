"""Speculative telemetry of the validation: a greedy self-speculative step's expected
length with k heads under teacher forcing, against a direct recomputation, and its exact
relation to what the decoder measures when the text is the model's own greedy output."""

import pytest
import torch

from bytelm.config import ModelConfig
from bytelm.generate import generate_ids
from bytelm.loss import IGNORE, HeadStats, accumulate_head_stats, spec_heads
from bytelm.model import MTPTransformer
from tests.test_generate import N_FUTURE, TOK, prompts_of_lengths, trained_model


def direct(model, x, y, byte_lengths):
    """Position by position: 1 + the number of consecutive heads 2, 3, ..., k whose
    argmax is the true token, in tokens and in the true tokens' bytes."""
    n = y.shape[-1]
    logits = model(x, future=y)
    pred = logits.argmax(-1)
    tokens, nbytes, positions = [0] * n, [0] * n, 0
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            if y[b, t, 0] == IGNORE:
                continue
            positions += 1
            for k in range(1, n + 1):
                run = 1
                got = int(byte_lengths[y[b, t, 0]])
                for i in range(1, k):
                    if y[b, t, i] == IGNORE or pred[b, t, i] != y[b, t, i]:
                        break
                    run += 1
                    got += int(byte_lengths[y[b, t, i]])
                tokens[k - 1] += run
                nbytes[k - 1] += got
    return positions, tokens, nbytes


@pytest.mark.parametrize("head_type", ["unembed", "sequential"])
def test_telemetry_equals_a_direct_recomputation(head_type):
    """A token model (varied byte lengths) half-trained on a repetitive pattern, so that
    runs of every length occur; masked targets included."""
    torch.manual_seed(0)
    V, n = 40, 4
    model = MTPTransformer(ModelConfig(n_layers=4, d_model=32, n_heads=4, context=32, vocab_size=V, n_future=n,
                                       head_type=head_type)).double()
    seq = torch.arange(200) % 7  # tokens 0..6 repeating: learnable several tokens ahead
    x = torch.stack([seq[s:s + 24] for s in range(0, 60, 5)])
    y = torch.stack([torch.stack([seq[s + i + 1:s + i + 25] for i in range(n)], -1) for s in range(0, 60, 5)])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(15):
        logits = model(x, future=y)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 2), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    y = y.clone()
    y[0, 20:, 1:] = IGNORE  # a document boundary: later targets ignored
    y[1, 22:, 0:] = IGNORE
    byte_lengths = torch.randint(1, 5, (V,))
    stats = HeadStats.zeros(n)
    model.eval()
    accumulate_head_stats(model, x, y, byte_lengths, stats)
    positions, tokens, nbytes = direct(model, x, y, byte_lengths)
    assert stats.spec_positions == positions
    assert stats.spec_tokens == tokens and stats.spec_bytes == nbytes
    assert 1 < tokens[-1] / positions < n  # neither all right nor all wrong
    m = stats.metrics()
    assert spec_heads(n) == [2, 4] and spec_heads(5) == [2, 4, 5] and spec_heads(1) == []
    assert m["val/spec/accepted_tokens_k4"] == pytest.approx(tokens[3] / positions)
    assert m["val/spec/accepted_bytes_k2"] == pytest.approx(nbytes[1] / positions)


@pytest.mark.parametrize("k", [2, 4])
def test_on_the_models_own_greedy_text_the_decoder_steps_at_the_telemetrys_lengths(k):
    """Teacher forcing on the model's own greedy text: a decoding step that drafts at
    position q accepts exactly the run the telemetry finds at q, so the decoder's steps
    and accepted drafts are those of walking the text from the prompt's last position in
    jumps of the telemetry's length. (On validation text, which is not the model's own, and
    averaged over every position instead of the ones the decoder lands on, the telemetry
    only estimates the decoder's tokens per step: docs/training.md.)"""
    model = trained_model("unembed")
    budget = 40
    for prompt in prompts_of_lengths(3, 9, 14, seed=4):
        # the model's own greedy text, k tokens past the budget (drafts past it are verified too)
        text = generate_ids(model, None, [prompt], max_new_tokens=budget + k, heads=1, batch_size=1).tokens[0]
        assert len(text) == budget + k
        seq = torch.tensor(prompt + text)
        x = seq[None, :-k]
        y = torch.stack([seq[i + 1:len(seq) - k + i + 1] for i in range(k)], -1)[None]
        lengths = torch.ones(TOK.vocab_size, dtype=torch.long)

        def summed(m):  # the telemetry's summed step lengths over positions 0..m-1 (the model is causal)
            st = HeadStats.zeros(k)
            if m:
                accumulate_head_stats(model, x[:, :m], y[:, :m], lengths, st)
            return st.spec_tokens[k - 1]

        steps, accepted, emitted, q = 0, 0, 1, len(prompt) - 1  # the prefill emits 1 token, drafts at q
        while emitted < budget:
            run = summed(q + 1) - summed(q)  # the step length at q alone
            steps += 1
            accepted += run - 1
            emitted += run
            q += run
        spec = generate_ids(model, None, [prompt], max_new_tokens=budget, heads=k, batch_size=1)
        assert spec.tokens[0] == text[:budget]
        assert spec.stats.steps == steps
        assert sum(spec.stats.accepted) == accepted
