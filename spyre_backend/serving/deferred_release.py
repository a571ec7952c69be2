"""Keeps finished BLS response streams alive for a while, then drops them from a Python thread.

Why: in Triton 2.51's Python backend a decoupled BLS response iterator is shared between Python
and the stub's C++ bookkeeping. When the stream ends, the stub's C++ messaging thread erases its
own reference; if Python has already let go, the iterator and every response it kept die on that
thread, and their numpy arrays are freed without the GIL held. Under load that corrupts the
interpreter and the stub segfaults inside libpython (fixed upstream after 2.51, in
python_backend#390: "Hold GIL when deleting numpy array"). Holding the last reference here until
that erase has long run makes the final release happen on our thread, under the GIL.

The same bookkeeping only lets go of an iterator that was read to its end, so a relay must always
drain its stream before handing it over (an unread tail keeps the whole stream alive forever).
"""

from __future__ import annotations

import collections
import threading
import time


class DeferredRelease:
    def __init__(self, delay_s: float = 10.0, name: str = "deferred-release"):
        self.delay_s = delay_s
        self._held: collections.deque = collections.deque()  # (release time, object), oldest first
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def later(self, obj) -> None:
        with self._lock:
            self._held.append((time.monotonic() + self.delay_s, obj))

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)

    def release_due(self, now: float | None = None) -> int:
        """Drops every object whose delay has passed; returns how many."""
        now = time.monotonic() if now is None else now
        due = []
        with self._lock:
            while self._held and self._held[0][0] <= now:
                due.append(self._held.popleft())
        count = len(due)
        del due  # the last references go here, on this Python thread
        return count

    def _run(self) -> None:
        while not self._closed.wait(min(1.0, self.delay_s)):
            self.release_due()

    def close(self) -> None:
        """Stops the sweeper and drops everything (the caller holds the GIL: it is Python)."""
        self._closed.set()
        self._thread.join(timeout=5)
        with self._lock:
            self._held.clear()
