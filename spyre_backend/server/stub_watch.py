"""How a model's Python-backend stub died while tritonserver loaded (the OOM killer, a signal),
read from /proc, the kernel log and the memory cgroup."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path


def _proc_status(pid: int) -> dict[str, str]:
    try:
        return dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if ":\t" in line)
    except OSError:
        return {}


def _oom_kills() -> int | None:
    """The memory cgroup's count of OOM kills (cgroup v2 or v1), None where unreadable."""
    for path in ("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control"):
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
        except (OSError, ValueError):
            continue
    return None


def _kernel_says_killed(pid: int) -> str:
    """The kernel log's line about killing ``pid``, where dmesg can be read."""
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return next((line.split("] ", 1)[-1] for line in reversed(out.splitlines())
                 if f"Killed process {pid} " in line), "")


class StubWatch:
    """Tells how a model's stub died while tritonserver loaded: Triton itself only says "Stub process
    ... is not healthy", which says nothing about the OOM killer. Polled while waiting for ready;
    the stubs are tritonserver's children, so their exit status is seen only while a stub is a
    zombie; the kernel log and the cgroup's OOM-kill counter say the rest."""

    def __init__(self):
        self.seen: dict[int, tuple[str, int]] = {}  # pid -> (model, last resident bytes)
        self.deaths: list[str] = []
        self.oom_kills_at_start = _oom_kills()

    def poll(self, stubs: dict[str, int]) -> None:
        """``stubs``: the live stubs by model (a zombie has no command line, so it is not among them)."""
        for model, pid in stubs.items():
            rss = int(_proc_status(pid).get("VmRSS", "0 kB").split()[0]) * 1024
            self.seen[pid] = (model, rss or self.seen.get(pid, (model, 0))[1])
        for pid in [p for p in self.seen if p not in stubs.values()]:
            state = _proc_status(pid).get("State", "")
            if not state or state.startswith(("Z", "X")):  # reaped, or a zombie with its exit status
                self._died(pid, self._zombie_signal(pid) if state else None)

    @staticmethod
    def _zombie_signal(pid: int) -> int | None:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            code = int(fields[-1])  # exit_code (field 52): the raw wait status
        except (OSError, ValueError, IndexError):
            return None
        return code & 0x7F or None

    def _died(self, pid: int, sig: int | None) -> None:
        model, rss = self.seen.pop(pid)
        kernel = _kernel_says_killed(pid)
        oom = kernel or (self.oom_kills_at_start is not None and (_oom_kills() or 0) > self.oom_kills_at_start)
        if sig is None and oom:
            sig = signal.SIGKILL
        how = f"was killed by {signal.Signals(sig).name}" if sig else "died"
        cause = (f" from the kernel's OOM killer ({kernel})" if kernel else " from the kernel's OOM killer"
                 if oom else "")
        at = f" at {rss / 2**30:.1f} GiB resident" if rss else ""
        self.deaths.append(f"the {model} stub (pid {pid}) {how}{cause}{at} while loading; "
                           "a stub killed for memory needs a smaller max_context, dtype=bfloat16 or more memory")

    def report(self) -> str:
        return "".join(f"; {d}" for d in self.deaths)
