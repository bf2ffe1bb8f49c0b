"""Tree verification: trees of candidate paths, tree greedy decoding equal to plain greedy
decoding token for token, exact tree sampling, and tree-fit's statistics."""

from functools import lru_cache

import pytest
import torch
import torch.nn.functional as F

from bytelm.config import ModelConfig
from bytelm.errors import UserError
from bytelm.generate import Decoder, generate_ids
from bytelm.model import MTPTransformer
from bytelm.tree import Tree, best_tree, count_paths, ranked_paths
from test_generate import TOK, _GraphRehearsal, prompts_of_lengths, trained_model
from test_speculative import PROMPT, SAMPLING, assert_sampled_from, sampling_model

# Paths share prefixes (0,) and (0, 0); ranks up to 2; depth 3 (4 heads).
STOP = ["pa", "e"]
TREE = Tree(((0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1), (0, 1, 0)))


def test_tree_structure():
    t = Tree(((1,), (0, 0), (0,), (0, 0, 0), (0, 1)))
    assert t.paths == ((0,), (1,), (0, 0), (0, 1), (0, 0, 0))  # topological order
    assert (t.nodes, t.depth, t.width) == (6, 3, 2)
    assert t.parent() == [0, 0, 0, 1, 1, 3] and t.depths() == [0, 1, 1, 2, 2, 3] and t.ranks() == [0, 0, 1, 0, 1, 0]
    assert t.ancestors()[5] == [True, True, False, True, False, True]
    assert t.path_table()[4] == [0, 1, 4, 4] and t.path_table()[0] == [0, 0, 0, 0]
    assert t.children() == [[1, 2], [3, 4], [-1, -1], [5, -1], [-1, -1], [-1, -1]]
    assert Tree.chain(4).paths == ((0,), (0, 0), (0, 0, 0)) and Tree.chain(4).nodes == 4
    with pytest.raises(UserError, match="no parent"):
        Tree(((0,), (1, 0)))
    with pytest.raises(UserError, match="deep"):
        t.check_heads(3)


def test_a_tree_deeper_than_the_heads_is_an_error():
    model = trained_model("unembed")
    with pytest.raises(UserError, match="3 candidates deep, but 3 heads draft only 2"):
        Decoder(model, heads=3, tree=TREE)
    with pytest.raises(UserError, match="3 candidates deep"):
        generate_ids(model, TOK, prompts_of_lengths(3), max_new_tokens=4, heads=2, tree=TREE)


@pytest.mark.parametrize("head_type", ["transformer", "linear", "unembed"])
def test_tree_greedy_equals_plain_greedy_for_byte_models(head_type):
    """Batch 1, batch 4 with rows of different lengths and a stop sequence, batch 16 with
    refills from the queue (20 prompts); the chain as a tree; rows near the end of the
    context (whose nodes spill into the scratch slots)."""
    model = trained_model(head_type)
    prompts = prompts_of_lengths(1, 7, 3, 15, 2, 11, 5, 24, 9, 4, 13, 6, 2, 19, 8, 10, 3, 12, 7, 16, seed=3)
    plain = generate_ids(model, TOK, prompts, max_new_tokens=40, heads=1, batch_size=4, stop=STOP)
    assert len({len(t) for t in plain.tokens}) > 2
    chain = generate_ids(model, TOK, prompts, max_new_tokens=40, heads=4, batch_size=4, stop=STOP)
    for tree, batch in ((TREE, 1), (TREE, 4), (TREE, 16), (Tree.chain(4), 4), (Tree(((0,), (1,), (0, 0))), 16)):
        gen = generate_ids(model, TOK, prompts, max_new_tokens=40, heads=4, batch_size=batch, stop=STOP, tree=tree)
        assert gen.tokens == plain.tokens and gen.finish == plain.finish, (tree.nodes, batch)
        assert len(gen.stats.acceptance_by_depth) == 3
    assert gen.stats.tokens_per_forward > 1
    tree = generate_ids(model, TOK, prompts, max_new_tokens=40, heads=4, batch_size=4, stop=STOP, tree=TREE)
    assert tree.stats.tokens_per_forward > chain.stats.tokens_per_forward  # the wider tree accepts more
    assert generate_ids(model, TOK, prompts, max_new_tokens=40, heads=4, batch_size=4, stop=STOP,
                        tree=Tree.chain(4)).stats.accepted == chain.stats.accepted
    near_end = prompts_of_lengths(80, 60, 90)
    ref = generate_ids(model, TOK, near_end, max_new_tokens=50, heads=1, batch_size=2)
    assert generate_ids(model, TOK, near_end, max_new_tokens=50, heads=4, batch_size=3, tree=TREE).tokens == ref.tokens


V_TOKENS = 700


@lru_cache(maxsize=None)
def trained_token_model(head_type: str) -> MTPTransformer:
    """A token model (vocabulary 700, as a small BPE) with 4 heads, trained for a few
    seconds on progressions over 40 token ids, float64."""
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=5 if head_type == "transformer" else 2, d_model=32, n_heads=4, context=96,
                      vocab_size=V_TOKENS, n_future=4, head_type=head_type)
    model = MTPTransformer(cfg)
    g = torch.Generator().manual_seed(0)
    seqs = []
    for _ in range(600):
        a, s, n = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((0, 40), (1, 4), (4, 21)))
        seqs += [300 + (a + s * t) % 40 for t in range(n)] + [0]
    data = torch.tensor(seqs)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(60):
        starts = torch.randint(0, len(data) - 28, (8,), generator=g).tolist()
        w = torch.stack([data[i : i + 28] for i in starts])
        logits = model(w[:, :24])
        loss = sum(F.cross_entropy(logits[:, :, i].flatten(0, 1), w[:, i + 1 : i + 25].flatten()) for i in range(4))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.double().eval()


@pytest.mark.parametrize("head_type", ["transformer", "unembed"])
def test_tree_greedy_equals_plain_greedy_for_token_models(head_type):
    model = trained_token_model(head_type)
    g = torch.Generator().manual_seed(5)
    prompts = [[0] + torch.randint(300, 340, (n,), generator=g).tolist() for n in (3, 17, 8, 25, 1, 12, 30, 6)]
    plain = Decoder(model, heads=1, batch_size=3, max_len=96).run(prompts, 40)
    for batch in (1, 4):
        gen = Decoder(model, heads=4, batch_size=batch, max_len=96, tree=TREE).run(prompts, 40)
        assert gen.tokens == plain.tokens and gen.finish == plain.finish, batch
    assert gen.stats.acceptance_by_depth[0] > 0.05  # drafts are accepted: the equality is not vacuous


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_tree_steps_over_flex_masks_and_graph_buckets_give_the_same_tokens():
    """The tree rule as a FlexAttention block mask (its unfused reference) and in the CUDA
    graph mode's row buckets with warm-up steps, against the boolean mask."""
    model = trained_model("transformer")
    prompts = prompts_of_lengths(10, 27, 3, 30, 19, 12, seed=2)
    ref = Decoder(model, heads=4, batch_size=3, max_len=96, cache_block=8, tree=TREE).run(prompts, 40, tokenizer=TOK)
    for dec in (Decoder(model, heads=4, batch_size=3, max_len=96, cache_block=8, tree=TREE, attention="flex"),
                _GraphRehearsal(model, heads=4, batch_size=3, max_len=96, cache_block=8, tree=TREE)):
        assert dec.run(prompts, 40, tokenizer=TOK).tokens == ref.tokens


@pytest.mark.parametrize("head_type", ["unembed", "transformer"])
def test_tree_sampling_keeps_the_model_distribution(head_type):
    """The joint distribution of 3 sampled tokens (216 outcomes) under recursive rejection
    over a tree equals the model's own, computed exactly from no-cache forwards, as the
    chain's test checks for chain sampling."""
    model, joint = sampling_model(head_type)
    tree = Tree(((0,), (1,), (2,), (0, 0), (0, 1), (1, 0)))
    gen = Decoder(model, heads=3, batch_size=2000, max_len=10, sampling=SAMPLING, tree=tree).run([PROMPT] * 20_000, 3,
                                                                                                 seed=1)
    assert 0.05 < gen.stats.acceptance_by_depth[0] < 0.95 and gen.stats.acceptance_by_depth[1] > 0.01
    assert_sampled_from(gen.tokens, joint)


def test_path_counts_and_the_best_tree():
    rows = [[0, 0, 1], [0, 1, -1], [1, 0, 0], [0, 0, 0], [12, 0, 0], [0, 0, 1]]
    counts = count_paths(rows)
    assert counts[(0,)] == 4 and counts[(0, 0)] == 3 and counts[(0, 0, 1)] == 2 and counts[(1,)] == 1
    assert (12,) not in counts and all(r < 10 for p in counts for r in p)
    ranked = ranked_paths(counts)
    assert [p for p, _ in ranked[:3]] == [(0,), (0, 0), (0, 0, 1)]
    t = best_tree(counts, 5, max_depth=3)
    assert t.paths == ((0,), (1,), (0, 0), (0, 0, 1))  # ties: shorter paths first
    assert best_tree(counts, 5, max_depth=1).paths == ((0,), (1,), (2,), (3,))  # never-seen ranks fill it up


def test_replaying_the_ranks_predicts_the_decoders_steps():
    """tree-fit's prediction: greedy decoding replayed over the rank rows of the plain
    greedy completions takes exactly the decoder's steps, for the chain and for trees,
    while the mean over every position is not what the decoder does."""
    from bytelm.tree import replay
    from bytelm.tree_fit import draft_ranks

    model = trained_token_model("unembed")
    g = torch.Generator().manual_seed(7)
    prompts = [[0] + torch.randint(300, 340, (n,), generator=g).tolist() for n in (3, 17, 8, 25, 1, 12)]
    plain = Decoder(model, heads=1, batch_size=3, max_len=96).run(prompts, 40)
    per_sequence = draft_ranks(model, list(zip(prompts, plain.tokens)))
    assert [len(rows) for rows in per_sequence] == [len(t) for t in plain.tokens]
    for tree in (Tree.chain(4), TREE, Tree(((0,), (1,), (0, 0)))):
        gen = Decoder(model, heads=4, batch_size=1, max_len=96, tree=tree).run(prompts, 40)
        assert gen.tokens == plain.tokens
        assert sum(replay(rows, tree) for rows in per_sequence) == gen.stats.row_steps, tree.nodes
    # by hand: ranks of row i are those of the tokens after the next at position i
    rows = [[0, 0, 1], [9, 9, 9], [0, 1, 0], [9, 9, 9], [0, 0, 0], [9, 9, 9], [9, 9, 9]]
    assert replay(rows, Tree.chain(4)) == 3  # prefill: token 0; steps commit tokens 1..3, 4, then 5..6
    assert replay(rows, TREE) == 2  # steps commit 1..4 (path (0, 0, 1)), then 5..6
    assert replay([[5, 5, 5]], TREE) == 0  # one token: the prefill's
