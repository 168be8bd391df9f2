"""The concurrency bound of an `LLMClient`: slots, each tied to one backend of the same model.

A provider's API is one backend with as many slots as calls may be in flight. The embedded model
is served by a few single-sequence server processes (replicas), each one slot: a call takes a free
replica. A thread gets the replica it used last when that one is free, so that the calls of one
worker (one document's, say) follow each other on one server, which keeps their shared prompt
prefix (system prompt, document context) evaluated from the call before.
"""

import threading
import time


class Slots:
    """`len(backends)` slots; slot `i` sends its calls to backend `backends[i]`."""

    def __init__(self, backends: list[int]) -> None:
        if not backends:
            raise ValueError("at least one slot is needed")
        self.backends = list(backends)
        self._free = set(range(len(backends)))
        self._changed = threading.Condition()
        self._last = threading.local()

    def __len__(self) -> int:
        return len(self.backends)

    def acquire(self, timeout: float | None = None) -> int | None:
        """A free slot (the one this thread used last if it is free), waiting for one up to
        `timeout` seconds (None: as long as it takes); None when none came free in time."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while not self._free:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._changed.wait(left)
            last = getattr(self._last, "slot", None)
            slot = last if last in self._free else min(self._free)
            self._free.remove(slot)
            self._last.slot = slot
            return slot

    def release(self, slot: int) -> None:
        """Give `slot` back."""
        with self._changed:
            if slot in self._free:
                raise ValueError(f"slot {slot} released twice")
            self._free.add(slot)
            self._changed.notify()
