"""A model's stub exits when its tritonserver is gone.

The Python-backend stub is a child of tritonserver. When tritonserver crashed (a SIGSEGV here),
the granite_vision and granite_llm stubs went on running as orphans, the LLM's holding 620 MB,
until killed by hand. A thread of the stub's own cannot be relied on to end it: the stub can be
stuck with the GIL held (a metric update waits in C++ for a reply from the dead server, and no
Python thread runs again; seen in test_faults). So a watchdog outside the interpreter, a shell
loop, SIGKILLs the stub once its parent has changed, and ends by itself when the stub ends first.
(Not the parent-death signal: it follows the tritonserver thread that forked the stub, which may
end long before the server does.)
"""

from __future__ import annotations

import os
import subprocess

# $1: the stub's pid, $2: its tritonserver's pid. Field 4 of /proc/PID/stat is the parent pid
# (the stub's command name has no spaces).
_WATCHDOG = """
while read -r _ _ _ ppid _ < "/proc/$1/stat" 2>/dev/null && [ "$ppid" = "$2" ]; do sleep 1; done
[ -e "/proc/$1" ] && kill -KILL "$1"
exit 0
"""


def exit_with_parent() -> subprocess.Popen:
    """Starts the watchdog of this process (see the module doc); returns it."""
    return subprocess.Popen(["sh", "-c", _WATCHDOG, "orphan-watch", str(os.getpid()), str(os.getppid())],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            close_fds=True)
