"""Trees of draft candidates for self-speculative decoding, and how to choose one.

A step of chain decoding verifies one candidate per draft depth: head d+1's first choice
for the token d positions after the committed one. A tree verifies several: a node is a
path of per-head candidate ranks (Medusa's "choices"), (r_1, ..., r_d) meaning "head 2's
r_1-th choice, then head 3's r_2-th choice, ..., head d+1's r_d-th choice" (ranks from
0), all read at the same trunk position as in the chain. The root (the empty path) is the
committed token. The chain of k heads is the tree {(), (0,), (0, 0), ...} of k nodes.

One forward verifies every node of a row: node j attends to the cache before the root and
to its own ancestors (bytelm.model.AttentionSpec), head 1 at node j checks j's children,
and the deepest node whose whole path is accepted ends the step
(bytelm.speculative.verify_tree, verify_tree_sampled).

Choosing a tree (`bytelm tree-fit`): decode held-out prompts greedily, then, at every
position of those greedy completions, find the rank of each following token in the list
of the head that drafts it. Greedy verification accepts the path (r_1, ..., r_d) exactly
when those ranks are r_1, ..., r_d, so its frequency over the positions is its acceptance
rate at a position taken at random. A path's frequency is at most its parent's, so the
N-1 most frequent paths (ties: shorter, then smaller ranks, first) form a tree: the one
of N nodes that accepts most at a random position. Decoding does not draft at random
positions but where the last step ended, so tree-fit predicts a tree's tokens per
forward by replaying greedy decoding over the same ranks (`replay`). The statistics are
those of greedy decoding; sampling at a temperature accepts less.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Sequence

from bytelm.errors import UserError

TREE_FILE = "trees.json"  # beside the checkpoint's weights
MAX_RANK = 10  # candidate ranks tree-fit counts (0..MAX_RANK-1) per head


@dataclass(frozen=True)
class Tree:
    """A tree of candidate paths (the root, the empty path, implied). Nodes are numbered
    in topological order: the root 0, then by depth, then by path."""

    paths: tuple[tuple[int, ...], ...]

    def __post_init__(self):
        paths = tuple(sorted({tuple(p) for p in self.paths}, key=lambda p: (len(p), p)))
        for p in paths:
            if not p:
                raise UserError("a tree path needs at least one rank (the root is implied)")
            if any(r < 0 for r in p):
                raise UserError(f"tree path {p}: ranks are >= 0")
            if len(p) > 1 and p[:-1] not in paths:
                raise UserError(f"tree path {p} has no parent {p[:-1]}: every prefix of a path must be in the tree")
        object.__setattr__(self, "paths", paths)

    @classmethod
    def chain(cls, heads: int) -> "Tree":
        return cls(tuple((0,) * d for d in range(1, heads)))

    @property
    def nodes(self) -> int:
        return 1 + len(self.paths)

    @property
    def depth(self) -> int:
        return max((len(p) for p in self.paths), default=0)

    @property
    def width(self) -> int:
        """Candidates per head: 1 + the largest rank."""
        return 1 + max((r for p in self.paths for r in p), default=0)

    @cached_property
    def _index(self) -> dict[tuple[int, ...], int]:
        return {(): 0, **{p: i + 1 for i, p in enumerate(self.paths)}}

    def node_paths(self) -> list[tuple[int, ...]]:
        return [()] + list(self.paths)

    def parent(self) -> list[int]:
        return [0] + [self._index[p[:-1]] for p in self.paths]

    def depths(self) -> list[int]:
        return [len(p) for p in self.node_paths()]

    def ranks(self) -> list[int]:
        return [0] + [p[-1] for p in self.paths]

    def ancestors(self) -> list[list[bool]]:
        """a[j][i]: node i is node j or one of its ancestors."""
        out = []
        for p in self.node_paths():
            row = [False] * self.nodes
            for d in range(len(p) + 1):
                row[self._index[p[:d]]] = True
            out.append(row)
        return out

    def path_table(self) -> list[list[int]]:
        """t[j][d]: node j's ancestor at depth d (d = 0..depth), node j itself past its depth."""
        j_of = self._index
        return [[j_of[p[:d]] if d <= len(p) else j_of[p] for d in range(self.depth + 1)] for p in self.node_paths()]

    def children(self) -> list[list[int]]:
        """c[j][i]: node j's child whose last rank is i, -1 where there is none (width columns)."""
        out = [[-1] * self.width for _ in range(self.nodes)]
        for p in self.paths:
            out[self._index[p[:-1]]][p[-1]] = self._index[p]
        return out

    def check_heads(self, heads: int) -> None:
        if self.depth > heads - 1:
            raise UserError(f"the tree is {self.depth} candidates deep, but {heads} heads draft only {heads - 1} "
                            f"(a path of d ranks needs heads 2..d+1)")

    def to_json(self) -> list[list[int]]:
        return [list(p) for p in self.paths]


# ----------------------------------------------------------------------------- statistics


def count_paths(rank_rows: Sequence[Sequence[int]]) -> dict[tuple[int, ...], int]:
    """Per path, the positions at which greedy verification would accept it: each row
    holds, for one position, the rank of each following token in its drafting head's list
    (depth 1, 2, ...; a rank >= MAX_RANK or -1: not among the candidates)."""
    counts: dict[tuple[int, ...], int] = {}
    for ranks in rank_rows:
        path: tuple[int, ...] = ()
        for r in ranks:
            if not 0 <= r < MAX_RANK:
                break
            path += (int(r),)
            counts[path] = counts.get(path, 0) + 1
    return counts


def replay(rank_rows: Sequence[Sequence[int]], tree: "Tree") -> int:
    """The verify steps greedy decoding with `tree` takes over one completion, replayed
    from its rank rows (row i: the ranks at the position whose next token is the
    completion's i-th, as tree-fit reads them). The prefill commits token 0 and drafts
    from row 0; a step accepts the longest tree path that matches the row's ranks and
    commits it plus head 1's token after it, so the next step drafts from the row after
    those. Decoding visits only these positions, so this, not the mean over every
    position, is what the decoder does with the same weights (ties aside)."""
    nodes, t, steps = set(tree.paths), 1, 0  # t: tokens committed
    while t < len(rank_rows):
        path: tuple[int, ...] = ()
        for r in rank_rows[t - 1]:
            if path + (r,) not in nodes:
                break
            path += (r,)
        t += len(path) + 1
        steps += 1
    return steps


def ranked_paths(counts: dict[tuple[int, ...], int]) -> list[tuple[tuple[int, ...], int]]:
    """Paths by frequency, ties by length then ranks: every prefix of the first n comes
    before it, so the first n form a tree."""
    return sorted(counts.items(), key=lambda pc: (-pc[1], len(pc[0]), pc[0]))


def tree_paths(counts: dict[tuple[int, ...], int], nodes: int, max_depth: int) -> list[tuple[tuple[int, ...], int]]:
    """The nodes-1 paths (with their counts) of the best tree of `nodes` nodes at most
    `max_depth` deep: the most frequent paths, then, where too few were ever accepted,
    paths never seen (count 0), the shortest with the smallest ranks first."""
    out = [(p, c) for p, c in ranked_paths(counts) if len(p) <= max_depth][: nodes - 1]
    have = {p for p, _ in out} | {()}
    while len(out) < nodes - 1:
        unseen = [q + (r,) for q in have if len(q) < max_depth for r in range(MAX_RANK) if q + (r,) not in have]
        if not unseen:
            break
        p = min(unseen, key=lambda q: (len(q), q))
        out.append((p, 0))
        have.add(p)
    return out


def best_tree(counts: dict[tuple[int, ...], int], nodes: int, max_depth: int) -> Tree:
    return Tree(tuple(p for p, _ in tree_paths(counts, nodes, max_depth)))


def weights_fingerprint(ckpt: Path) -> str:
    """sha256 of the checkpoint's weights: a tree file is tied to one set of weights."""
    h = hashlib.sha256()
    with open(ckpt / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_tree_file(path: Path, fingerprint: str, nodes: int | None) -> tuple[Tree, dict]:
    """The tree of `nodes` nodes (None: the file's size) of a tree file, refused when the
    file was fitted to other weights."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        stored, ranked = data["fingerprint"], data["paths"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a tree file written by `bytelm tree-fit` ({e})") from None
    if stored != fingerprint:
        raise UserError(f"{path} was fitted to other weights (fingerprint {stored[:12]}…, this checkpoint's "
                        f"{fingerprint[:12]}…): run `bytelm tree-fit` for this checkpoint")
    n = nodes or data["nodes"]
    if n - 1 > len(ranked):
        raise UserError(f"{path} holds paths for at most {len(ranked) + 1} nodes, {n} asked for: "
                        f"run `bytelm tree-fit --nodes {n}`")
    return Tree(tuple(tuple(p["path"]) for p in ranked[: n - 1])), data


def tree_from_spec(spec: str | None, ckpt: Path | None, heads: int) -> Tree | None:
    """--tree SPEC: none (chain decoding), a node count (the tree of that size from the
    checkpoint's tree file) or a tree file."""
    if spec is None or spec in ("", "none", "chain"):
        return None
    if spec.isdigit():
        n = int(spec)
        if n < 2:
            raise UserError(f"--tree takes a node count >= 2 (the root and a candidate), got {n}")
        if ckpt is None:
            raise UserError("--tree N reads the tree file beside a checkpoint: give --checkpoint")
        path = ckpt / TREE_FILE
        if not path.is_file():
            raise UserError(f"no tree file {path}: run `bytelm tree-fit --checkpoint {ckpt} --nodes {n}` first")
    else:
        path, n = Path(spec), None
        if not path.is_file():
            raise UserError(f"--tree {spec!r} is neither a node count nor a tree file")
    if ckpt is None:
        raise UserError("a tree file is checked against a checkpoint's weights: give --checkpoint")
    tree, _ = read_tree_file(path, weights_fingerprint(ckpt), n)
    tree.check_heads(heads)
    return tree
