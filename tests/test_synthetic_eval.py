"""The synthetic-task metrics on hand-made examples: fixed prediction functions stand in
for a model where the metric itself is under test; a real (untrained) model checks the
wiring to the model and to generation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bytelm.config import ModelConfig
from bytelm.errors import UserError
from bytelm.generate import generate
from bytelm.model import MTPTransformer
from bytelm.synthetic_eval import (argmax_head1, induction_accuracy, is_correct, poly_accuracy, read_manifest,
                                   story_targets)
from bytelm.tokenizers import ByteTokenizer

TOK = ByteTokenizer()
# "Zed saw Zed." : the name at bytes [0, 3) and [8, 11)
ZED = {"text": "Zed saw Zed.", "names": [{"name": "Zed", "original": "Tom", "spans": [[0, 3], [8, 11]]}]}


def copy_predictor(x: torch.Tensor) -> torch.Tensor:
    """An ideal induction head: at t, predict what followed the last earlier x[t]."""
    out = torch.full_like(x, TOK.pad_id)
    for b in range(x.shape[0]):
        row = x[b].tolist()
        for t in range(len(row)):
            for j in range(t - 1, -1, -1):
                if row[j] == row[t]:
                    out[b, t] = row[j + 1]
                    break
    return out


def oracle(x: torch.Tensor) -> torch.Tensor:
    """Knows the next token everywhere (reads it from the input)."""
    return torch.cat([x[:, 1:], torch.full_like(x[:, :1], TOK.pad_id)], dim=1)


def test_targets_of_a_byte_story():
    st = story_targets(TOK, ZED, context=64)
    assert st.ids[0] == TOK.eos_id and bytes(st.ids[1:]) == b"Zed saw Zed."
    # first occurrence: 'e','d' (ids 2, 3) predicted at 1, 2; repeated: ids 10, 11 at 9, 10
    assert [(t.repeated, t.positions) for t in st.targets] == [(False, [1, 2]), (True, [9, 10])]


def test_induction_accuracy_on_hand_made_examples():
    r = induction_accuracy(copy_predictor, TOK, [ZED], context=64)
    m = r.metrics()
    # at the repeat, 'Z' -> 'e' and 'e' -> 'd' are copied; at the first occurrence there is
    # nothing to copy from
    assert (r.repeated.correct, r.repeated.total, r.first.correct, r.first.total) == (2, 2, 0, 2)
    assert m == {"induction/acc_bytes": 1.0, "induction/acc_bytes_name": 1.0, "induction/acc_bytes_first": 0.0,
                 "induction/acc_bytes_n": 2.0}
    assert induction_accuracy(oracle, TOK, [ZED], context=64).metrics()["induction/acc_bytes_first"] == 1.0
    const = induction_accuracy(lambda x: torch.zeros_like(x), TOK, [ZED], context=64)
    assert const.repeated.correct == 0 and const.metrics()["induction/acc_bytes"] == 0.0


def test_partial_names_count_per_byte_and_per_name():
    story = {"text": "Abc. Abd. Abc.", "names": [{"name": "Abc", "spans": [[0, 3], [10, 13]]},
                                                  {"name": "Abd", "spans": [[5, 8]]}]}
    # the copy rule sees "Ab" last followed by 'd' (in "Abd"), so at the repeat of "Abc" it
    # gets 'b' right and 'c' wrong
    r = induction_accuracy(copy_predictor, TOK, [story], context=64)
    assert (r.repeated.correct, r.repeated.total, r.repeated.names_correct, r.repeated.names_total) == (1, 2, 0, 1)
    assert math.isclose(r.metrics()["induction/acc_bytes"], 0.5)


def test_occurrences_beyond_the_context_are_cut_not_scored():
    r = induction_accuracy(oracle, TOK, [ZED], context=10)
    assert r.cut == 1 and r.repeated.total == 0 and math.isnan(r.metrics()["induction/acc_bytes"])


def test_batches_with_padding_give_the_same_counts():
    long = {"text": "Zed saw Zed. " * 3, "names": [{"name": "Zed", "spans": [[13 * k + o, 13 * k + o + 3] for k in range(3) for o in (0, 8)]}]}
    one = [induction_accuracy(copy_predictor, TOK, [s], context=64) for s in (ZED, long)]
    both = induction_accuracy(copy_predictor, TOK, [ZED, long], context=64, batch_size=2)
    assert both.repeated.correct == sum(r.repeated.correct for r in one) == 2 + 10
    assert both.repeated.total == sum(r.repeated.total for r in one)


def test_a_real_model_through_argmax_head1():
    torch.manual_seed(0)
    model = MTPTransformer(ModelConfig(n_layers=3, d_model=32, n_heads=2, context=64, vocab_size=TOK.vocab_size, n_future=2)).eval()
    predict = argmax_head1(model)
    x = torch.tensor([story_targets(TOK, ZED, 64).ids])
    assert torch.equal(predict(x), model(x)[:, :, 0].argmax(-1))
    r = induction_accuracy(predict, TOK, [ZED], context=64)
    assert r.repeated.total == 2 and 0 <= r.repeated.correct <= 2


# ----------------------------------------------------------------------------- polynomials


def test_exact_match():
    assert is_correct("3 6 2 4 0", "3 6 2 4 0", ";")
    assert is_correct("3 6 2 4 0;((x)+(1))=", "3 6 2 4 0", ";")  # what follows the end marker is ignored
    assert is_correct("3 6 2 4 0$;", "3 6 2 4 0", "$")  # the end marker is the data set's
    assert not is_correct("3 6 2 4 0$", "3 6 2 4 0", ";")
    assert not is_correct("3 6 2 4 0 1", "3 6 2 4 0", ";")
    assert not is_correct(" 3 6 2 4 0", "3 6 2 4 0", ";")
    assert not is_correct("3 6 2 4", "3 6 2 4 0", ";")


def test_poly_accuracy_per_m_in_and_out_of_domain():
    recs = {
        1: [{"prompt": "a=", "answer": "1 0 0 0 0"}, {"prompt": "b=", "answer": "2 0 0 0 0"}],
        5: [{"prompt": "c=", "answer": "3 0 0 0 0"}],
        7: [{"prompt": "d=", "answer": "4 0 0 0 0"}, {"prompt": "e" * 50 + "=", "answer": "5 0 0 0 0"}],
    }
    answers = {r["prompt"]: r["answer"] for rs in recs.values() for r in rs}
    wrong = {"b="}

    def complete(prompts):
        return ["6 6 6 6 6;" if p in wrong else answers[p] + ";" for p in prompts]

    res = poly_accuracy(complete, recs, fits=lambda p: len(p) < 10, end=";", m_train_max=5)
    assert res.too_long == {1: 0, 5: 0, 7: 1}
    assert res.metrics() == {"poly/acc/m1": 0.5, "poly/acc/m5": 1.0, "poly/acc/m7": 0.5,
                             "poly/acc_in_domain": 2 / 3, "poly/acc_ood": 0.5, "poly/m_train_max": 5.0}
    # the in-domain range is the data set's: trained on m = 1 only, m = 5 is out of domain
    narrow = poly_accuracy(complete, recs, fits=lambda p: len(p) < 10, end=";", m_train_max=1).metrics()
    assert (narrow["poly/acc_in_domain"], narrow["poly/acc_ood"], narrow["poly/m_train_max"]) == (0.5, 2 / 3, 1.0)


def test_poly_accuracy_through_real_greedy_generation():
    """Wiring only: an untrained model's greedy completions, scored; the same prompts
    scored against the model's own outputs as answers are all correct."""
    torch.manual_seed(0)
    model = MTPTransformer(ModelConfig(n_layers=2, d_model=32, n_heads=2, context=64, vocab_size=TOK.vocab_size)).eval()
    prompts = ["((x+1)*(3))=", "(-(2x^4))="]

    def complete(ps):
        return generate(model, TOK, ps, max_new_tokens=10, temperature=0.0, stop=[";"], heads=1, batch_size=2)

    outs = dict(zip(prompts, complete(prompts)))
    recs = {1: [{"prompt": p, "answer": outs[p]} for p in prompts]}
    assert poly_accuracy(complete, recs, fits=lambda p: True, end=";", m_train_max=5).metrics()["poly/acc/m1"] == 1.0


def test_the_data_set_is_known_by_its_manifest(tmp_path):
    with pytest.raises(UserError, match="holds no manifest.json"):
        read_manifest(tmp_path, "poly")
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"format": "bytelm-synth/1", "task": "induction", "test_file": "tests/t.jsonl"}))
    with pytest.raises(UserError, match="not a `bytelm synth poly` data set"):
        read_manifest(tmp_path, "poly")
    assert read_manifest(tmp_path, "induction")["test_file"] == "tests/t.jsonl"
    older = {"format": "bytelm-synth/1", "task": "poly", "options": {"m_train_max": 5}, "test_files": {"1": "t1.jsonl"}}
    manifest.write_text(json.dumps(older))
    with pytest.raises(UserError, match="lacks answer_end.*make it again with `bytelm synth poly"):
        read_manifest(tmp_path, "poly")
    manifest.write_text(json.dumps(older | {"answer_end": ";"}))
    assert read_manifest(tmp_path, "poly")["answer_end"] == ";"
