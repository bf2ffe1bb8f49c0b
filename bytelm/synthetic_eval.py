"""Metrics of the synthetic tasks, computed from a trained model (docs/synthetic.md).

Induction (teacher-forced, head 1): a name of a test story is scored at each occurrence
on the tokens of the name after its first token, each predicted from the position
before it. Under the data set's BPE every name is exactly two tokens, so this is the
paper's "second token of the name"; under bytes it is bytes 2..len of the name. The
headline counts only repeated occurrences (the name has appeared before: pure
induction); first occurrences are reported as a control (no copying is possible there).

Polynomials: greedy decoding of the answer after '=' and exact match of all 5
coefficients, per number of operations m.

Metric names: `induction/acc` (BPE) or `induction/acc_bytes` (bytes), with `_name` (all
scored tokens of an occurrence right) and `_first` (first occurrences);
`poly/acc/m{m}`, `poly/acc_in_domain` (m <= 5), `poly/acc_ood` (m > 5).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from bytelm.errors import UserError
from bytelm.tokenizers import Tokenizer

TRAIN_M_MAX = 5  # training draws m in 1..5: larger m is out of domain


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"test file {path} not found (run `bytelm synth` to make the data set)")
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not JSONL: {e}") from None


# ----------------------------------------------------------------------------- induction


@dataclass
class Target:
    """One occurrence of a name: the positions whose head-1 prediction is scored."""

    repeated: bool  # the name occurred earlier in the story
    positions: list[int]  # input positions t; the prediction at t is compared with ids[t + 1]


@dataclass
class StoryTargets:
    ids: list[int]
    targets: list[Target]
    cut: int = 0  # occurrences dropped because they end beyond the model's context


def story_targets(tokenizer: Tokenizer, record: dict, context: int) -> StoryTargets:
    """Token ids of a test story and the scored positions of each name occurrence.

    The story starts after an EOS, as every document does in the shards. An occurrence
    with byte span [s, e) covers the tokens from the one holding byte s to the one
    holding byte e - 1; all of them but the first are scored.
    """
    ids = [tokenizer.eos_id] + list(tokenizer.encode(record["text"]))  # EOS stands for 0 bytes
    ends = np.cumsum(tokenizer.token_byte_lengths[np.asarray(ids, dtype=np.int64)])
    out = StoryTargets(ids[:context], [])
    for name in record["names"]:
        for k, (s, e) in enumerate(name["spans"]):
            first = int(np.searchsorted(ends, s, side="right"))
            last = int(np.searchsorted(ends, e - 1, side="right"))
            if last >= context:
                out.cut += 1
                continue
            out.targets.append(Target(k > 0, list(range(first, last))))
    return out


@dataclass
class Tally:
    correct: int = 0
    total: int = 0
    names_correct: int = 0  # occurrences with every scored token right
    names_total: int = 0

    def add(self, hits: list[bool]) -> None:
        if not hits:
            return
        self.correct += sum(hits)
        self.total += len(hits)
        self.names_correct += all(hits)
        self.names_total += 1

    def acc(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    def name_acc(self) -> float:
        return self.names_correct / self.names_total if self.names_total else float("nan")


@dataclass
class InductionResult:
    tokenizer: str  # bytes | bpe
    repeated: Tally = field(default_factory=Tally)
    first: Tally = field(default_factory=Tally)
    stories: int = 0
    cut: int = 0

    def metrics(self) -> dict[str, float]:
        p = "induction/acc" if self.tokenizer == "bpe" else "induction/acc_bytes"
        return {
            p: self.repeated.acc(),
            f"{p}_name": self.repeated.name_acc(),
            f"{p}_first": self.first.acc(),
            f"{p}_n": float(self.repeated.total),
        }


# The predictor: token ids (B, T) -> head-1 argmax (B, T). A model is wrapped by
# `argmax_head1`; tests pass a fixed function.
Predictor = Callable[[torch.Tensor], torch.Tensor]


def argmax_head1(model: torch.nn.Module) -> Predictor:
    device = next(model.parameters()).device

    @torch.no_grad()
    def predict(x: torch.Tensor) -> torch.Tensor:
        return model(x.to(device), n_heads=1)[:, :, 0].argmax(-1).cpu()

    return predict


def induction_accuracy(
    predict: Predictor, tokenizer: Tokenizer, records: Iterable[dict], context: int, batch_size: int = 8
) -> InductionResult:
    """Teacher-forced head-1 accuracy on name tokens after the first (see module doc)."""
    result = InductionResult(tokenizer.kind)
    stories = [story_targets(tokenizer, r, context) for r in records]
    for i in range(0, len(stories), batch_size):
        batch = stories[i : i + batch_size]
        T = max(len(s.ids) for s in batch)
        # Right padding: a causal model's predictions at real positions ignore it.
        x = torch.full((len(batch), T), tokenizer.pad_id, dtype=torch.long)
        for b, s in enumerate(batch):
            x[b, : len(s.ids)] = torch.tensor(s.ids)
        pred = predict(x)
        for b, s in enumerate(batch):
            result.stories += 1
            result.cut += s.cut
            for t in s.targets:
                hits = [int(pred[b, p]) == s.ids[p + 1] for p in t.positions]
                (result.repeated if t.repeated else result.first).add(hits)
    return result


# ----------------------------------------------------------------------------- polynomials


@dataclass
class PolyResult:
    correct: dict[int, int] = field(default_factory=dict)  # m -> exact matches
    total: dict[int, int] = field(default_factory=dict)
    too_long: dict[int, int] = field(default_factory=dict)  # prompts that did not fit (counted wrong)

    def metrics(self) -> dict[str, float]:
        out = {f"poly/acc/m{m}": self.correct[m] / self.total[m] for m in sorted(self.total)}
        for name, keep in (("in_domain", lambda m: m <= TRAIN_M_MAX), ("ood", lambda m: m > TRAIN_M_MAX)):
            ms = [m for m in self.total if keep(m)]
            if ms:
                out[f"poly/acc_{name}"] = sum(self.correct[m] for m in ms) / sum(self.total[m] for m in ms)
        return out


def is_correct(completion: str, answer: str) -> bool:
    """Exact match: the completion up to the end marker is the 5 coefficients."""
    from data_prep.polynomials import END

    return completion.split(END, 1)[0] == answer


def poly_accuracy(
    complete: Callable[[list[str]], list[str]], records_by_m: dict[int, list[dict]], fits: Callable[[str], bool]
) -> PolyResult:
    """`complete` maps prompts to greedy completions; `fits` says whether a prompt leaves
    room in the model's context for the answer."""
    res = PolyResult()
    for m, records in sorted(records_by_m.items()):
        ok = [r for r in records if fits(r["prompt"])]
        outs = complete([r["prompt"] for r in ok]) if ok else []
        res.correct[m] = sum(is_correct(o, r["answer"]) for o, r in zip(outs, ok))
        res.total[m] = len(records)
        res.too_long[m] = len(records) - len(ok)
    return res
