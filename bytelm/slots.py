"""The host side of batched decoding: which request decodes in which slot of the KV cache.

Pure Python, no tensors: `Decoder` (bytelm/generate.py) drives a `SlotScheduler` with the
accepted counts a step reads back, and the scheduler calls back into the step engine for
the two things that touch the device, a prefill of queued prompts into some slots and the
move of a row from one slot to another.

- Slots. The KV cache has one row per slot (`batch_size` of them). Requests wait in a
  queue; a request enters a free slot through a prefill, which writes its prompt's keys
  and values and yields its first token.
- Active slots are [0, b). When a request finishes (EOS, a stop sequence, its token
  budget or the context), queued prompts are prefilled into finished slots, in groups of
  at least `refill_min` (on a GPU a prefill costs many steps, so finished slots may idle
  for a few steps, their step rows wasted, to share one prefill); once the queue is empty
  the last active row moves into the hole instead (one copy of its cache row), so the
  batch shrinks and finished requests stop costing work. The whole batch is never
  re-padded.
- Positions. The scheduler keeps each live slot's position (of its last committed token):
  prompt length plus the tokens committed by each step. It sizes the cache prefix a step
  reads without reading anything more back from the device.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Protocol, Sequence


class TokenBytes(Protocol):
    """What a request needs of a tokenizer to find stop sequences."""

    eos_id: int

    def decode_bytes(self, ids: list[int]) -> bytes: ...

    @property
    def token_byte_lengths(self): ...


class Request:
    """One prompt's completion: the ids generated so far and the rules that end it."""

    def __init__(self, limit: int, eos: int | None, stops: list[bytes], tokenizer: TokenBytes | None):
        self.limit, self.eos, self.stops, self.tokenizer = limit, eos, stops, tokenizer
        self.ids: list[int] = []
        self.n_tokens = 0  # ids + the final EOS
        self.finish: str | None = None
        self.text = bytearray()  # decoded bytes, kept only to find stop sequences

    def feed(self, new: list[int]) -> bool:
        """Appends a step's tokens up to the first finishing event; True when finished."""
        new = new[: self.limit - len(self.ids)]
        finish = "length" if len(self.ids) + len(new) == self.limit else None
        if self.eos is not None and self.eos in new:
            new, finish = new[: new.index(self.eos)], "eos"
        if self.stops and new:
            cut = self._stop_cut(new)
            if cut is not None:
                new, finish = new[:cut], "stop"
        self.ids += new
        self.n_tokens += len(new) + (finish == "eos")
        self.finish = finish
        return finish is not None

    def _stop_cut(self, new: list[int]) -> int | None:
        """How many of `new` to keep when one of them completes a stop sequence."""
        start = len(self.text)
        self.text += self.tokenizer.decode_bytes(new)
        ends = [i + len(s) for s in self.stops if (i := self.text.find(s, max(0, start - len(s) + 1))) >= 0]
        if not ends:
            return None
        end, pos = min(ends), start
        lengths = self.tokenizer.token_byte_lengths
        for n, t in enumerate(new, 1):
            pos += int(lengths[t])
            if pos >= end:
                del self.text[pos:]
                return n
        return len(new)


Prefill = Callable[[list[int], list[int]], list[int]]  # (slots, requests) -> slots whose request already finished
Move = Callable[[int, int], None]  # (from slot, to slot)


class SlotScheduler:
    """Requests 0..n-1 (prompt lengths `lengths`) through `batch_size` slots.

    `prefill(slots, requests)` writes those requests' prompts into those slots and returns
    the slots whose request finished with its first token; `move(src, dst)` copies slot
    src's row into slot dst. `start()` fills the batch; then, per step, `live()` lists the
    (slot, request) pairs that decode, `commit(slot, n)` records n tokens committed by a
    slot, and `retire(done)` frees the slots whose request finished, refilling or
    compacting. The batch is done when `active` is 0.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, refill_min: int, prefill: Prefill, move: Move):
        if batch_size < 1 or refill_min < 1:
            raise ValueError(f"batch_size and refill_min must be >= 1, got {batch_size} and {refill_min}")
        self.lengths, self.batch_size, self.refill_min = list(lengths), batch_size, refill_min
        self._prefill, self._move = prefill, move
        self.queue = deque(range(len(self.lengths)))
        self.slot_request: list[int | None] = []  # active slot -> request (None: idle, awaiting a refill)
        self.idle: set[int] = set()
        self.position = [0] * batch_size  # each live slot's position of its last committed token

    @property
    def active(self) -> int:
        """Slots [0, active) take part in a step (idle ones included)."""
        return len(self.slot_request)

    def live(self) -> list[tuple[int, int]]:
        return [(slot, r) for slot, r in enumerate(self.slot_request) if r is not None]

    def step_length(self, width: int, cache_len: int) -> int:
        """1 + the last cache position a step writes when it writes `width` positions per
        live row from its committed token's position on (at most the cache length)."""
        return min(cache_len, max((self.position[s] for s, _ in self.live()), default=0) + width)

    def start(self) -> None:
        self.retire(self._admit(list(range(min(self.batch_size, len(self.lengths))))))

    def commit(self, slot: int, n: int) -> None:
        self.position[slot] += n

    def _admit(self, slots: list[int]) -> list[int]:
        """Prefills queued requests into these slots; returns the slots already done."""
        requests = [self.queue.popleft() for _ in slots]
        for slot, r in zip(slots, requests):
            if slot == len(self.slot_request):
                self.slot_request.append(r)
            self.slot_request[slot] = r
            self.position[slot] = self.lengths[r]
        return self._prefill(slots, requests)

    def retire(self, done: list[int]) -> None:
        """Finished slots go idle; idle slots are refilled from the queue in groups of at
        least `refill_min` (one batched prefill), or compacted away once the queue is
        empty (the last active row moves into the hole, highest hole first, so the row
        moved is never an idle one)."""
        for slot in done:
            self.slot_request[slot] = None
        self.idle.update(done)
        while self.idle:
            queue = self.queue
            if queue and (len(self.idle) >= min(self.refill_min, len(queue)) or len(self.idle) == self.active):
                slots = sorted(self.idle)[: len(queue)]
                self.idle.difference_update(slots)
                finished = self._admit(slots)
                for slot in finished:
                    self.slot_request[slot] = None
                self.idle.update(finished)
                continue
            if not queue:
                for slot in sorted(self.idle, reverse=True):
                    last = self.active - 1
                    if slot != last:
                        self._move(last, slot)
                        self.slot_request[slot] = self.slot_request[last]
                        self.position[slot] = self.position[last]
                    self.slot_request.pop()
                self.idle.clear()
            break
