"""Peak resident memory of a server and every process it started (Triton's stubs, vLLM's engine
core, ...), sampled from /proc while it runs: what the machine must hold for it."""

from __future__ import annotations

import os
import threading
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended while the tree was read
        tree.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return tree


def tree_rss_bytes(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants, now."""
    tree, todo, total = _children(), [pid], 0
    while todo:
        p = todo.pop()
        todo += tree.get(p, [])
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * PAGE
        except OSError:
            pass
    return total


class PeakMemory:
    """Samples ``tree_rss_bytes`` of the process ``pid_of()`` names (None: not started yet) every
    ``interval_s`` until stopped, loading included; ``stop()`` returns the highest, in GiB."""

    def __init__(self, pid_of, interval_s: float = 0.5):
        self.pid_of, self.interval_s, self.peak = pid_of, interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            pid = self.pid_of()
            if pid is not None:
                self.peak = max(self.peak, tree_rss_bytes(pid))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 2 ** 30
