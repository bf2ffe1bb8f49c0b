"""The slot scheduler on its own, without torch: a simulated engine in which request r
needs a known number of steps after its prefill; the scheduler decides who decodes where."""

import sys

import pytest

from bytelm.slots import Request, SlotScheduler


class FakeEngine:
    """Slots hold request numbers; a prefill or a move is recorded. Request r finishes
    after `steps[r]` steps (0: at its first token)."""

    def __init__(self, steps: list[int]):
        self.steps = steps
        self.slot: dict[int, int] = {}
        self.left: dict[int, int] = {}
        self.prefills: list[tuple[list[int], list[int]]] = []
        self.moves: list[tuple[int, int]] = []

    def prefill(self, slots, requests):
        self.prefills.append((list(slots), list(requests)))
        done = []
        for s, r in zip(slots, requests):
            self.slot[s], self.left[s] = r, self.steps[r]
            if self.steps[r] == 0:
                done.append(s)
        return done

    def move(self, src, dst):
        self.moves.append((src, dst))
        self.slot[dst], self.left[dst] = self.slot.pop(src), self.left.pop(src)


def drive(steps, batch, refill_min, tokens_per_step=1):
    engine = FakeEngine(steps)
    lengths = [10 + r for r in range(len(steps))]
    s = SlotScheduler(lengths, batch, refill_min, engine.prefill, engine.move)
    s.start()
    finished_at, n, widths = {}, 0, []
    while s.active:
        n += 1
        widths.append((s.active, len(s.idle)))
        done = []
        for slot, r in s.live():
            assert engine.slot[slot] == r  # the scheduler's map is where the engine put it
            s.commit(slot, tokens_per_step)
            engine.left[slot] -= 1
            if engine.left[slot] == 0:
                finished_at[r] = n
                done.append(slot)
        s.retire(done)
    return s, engine, finished_at, widths


def test_a_batch_runs_every_request_once_and_shrinks_at_the_tail():
    steps = [3, 1, 4, 1, 5, 9, 2, 6]
    s, engine, finished, widths = drive(steps, batch=3, refill_min=1)
    served = [r for _, reqs in engine.prefills for r in reqs]
    assert sorted(served) == list(range(8)) and len(finished) == 8
    assert engine.prefills[0] == ([0, 1, 2], [0, 1, 2])
    # refill_min=1: a finished slot is refilled at once, so the batch stays full while
    # prompts wait, then shrinks (compaction moves the last row into each hole)
    assert all(idle == 0 for _, idle in widths)
    assert widths[0][0] == 3 and widths[-1][0] < 3 and engine.moves


def test_refill_groups_wait_for_enough_free_slots():
    """refill_min=2: one finished slot idles (counted) until a second one frees up, then
    both are refilled by one prefill; the last prompts need no full group."""
    steps = [2, 3, 6, 6, 3, 3, 1]
    s, engine, finished, widths = drive(steps, batch=4, refill_min=2)
    assert engine.prefills[0] == ([0, 1, 2, 3], [0, 1, 2, 3])
    assert engine.prefills[1] == ([0, 1], [4, 5])  # slot 0 waited a step for slot 1
    assert any(idle for _, idle in widths)  # a slot idled awaiting its group
    assert len(finished) == len(steps)
    assert all(len(slots) >= 2 for slots, _ in engine.prefills[1:-1])  # refills come in groups
    assert engine.prefills[-1][1] == [6]  # one prompt left: it need not wait for a group of 2


def test_requests_finishing_at_their_first_token_are_replaced_at_once():
    steps = [0, 2, 0, 0, 1]
    s, engine, finished, _ = drive(steps, batch=2, refill_min=1)
    assert engine.prefills[:3] == [([0, 1], [0, 1]), ([0], [2]), ([0], [3])]
    assert set(finished) == {1, 4}


def test_positions_follow_the_prompt_and_the_committed_tokens():
    engine = FakeEngine([5, 5])
    s = SlotScheduler([7, 12], 2, 1, engine.prefill, engine.move)
    s.start()
    assert s.position[:2] == [7, 12]
    s.commit(0, 3)
    s.commit(1, 1)
    assert s.step_length(4, 100) == 13 + 4 and s.step_length(4, 15) == 15
    # compaction carries the row's position with it
    s.retire([0])
    assert s.active == 1 and engine.moves == [(1, 0)] and s.position[0] == 13 and s.live() == [(0, 1)]


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="batch_size"):
        SlotScheduler([1], 0, 1, lambda s, r: [], lambda a, b: None)


class ByteNames:
    """A tokenizer's bytes without torch or numpy: token t is the byte t."""

    eos_id = 256
    token_byte_lengths = [1] * 256 + [0]

    def decode_bytes(self, ids):
        return bytes(i for i in ids if i < 256)


def test_request_cuts_at_eos_stop_and_limit():
    r = Request(limit=10, eos=256, stops=[b"cd"], tokenizer=ByteNames())
    assert not r.feed([ord("a"), ord("b")])
    assert r.feed([ord("c"), ord("d"), ord("e")]) and r.finish == "stop" and r.ids == [97, 98, 99, 100]
    r = Request(limit=10, eos=256, stops=[], tokenizer=None)
    assert r.feed([1, 2, 256, 3]) and r.finish == "eos" and r.ids == [1, 2] and r.n_tokens == 3
    r = Request(limit=3, eos=None, stops=[], tokenizer=None)
    assert r.feed([1, 2, 3, 4]) and r.finish == "length" and r.ids == [1, 2, 3]


def test_the_scheduler_module_needs_no_torch():
    import subprocess

    code = "import sys, bytelm.slots; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    subprocess.run([sys.executable, "-c", code], check=True)
