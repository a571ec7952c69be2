"""A model's stub exits when its tritonserver is gone.

The Python-backend stub is a child of tritonserver. When tritonserver crashed (a SIGSEGV here),
the granite_vision and granite_llm stubs went on running as orphans, the LLM's holding 620 MB,
until killed by hand: their own parent check did not end them (threads still running). A daemon
thread per stub now notices the new parent and ends the process at once. (Not the parent-death
signal: it follows the tritonserver thread that forked the stub, which may end long before.)
"""

from __future__ import annotations

import os
import threading
import time


def exit_with_parent(interval_s: float = 1.0) -> threading.Thread:
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        # nothing written first: a logging handler forwards to the dead server, and even a write
        # to stderr blocked forever once (a full pipe nobody reads)
        os._exit(1)  # nothing left to serve; threads still running must not keep the process

    thread = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
    thread.start()
    return thread
