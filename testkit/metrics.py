"""Reading the server's Prometheus metrics."""

from __future__ import annotations

import re
import time
import urllib.request


def read_metrics(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?)\s+([-+0-9.eE]+|nan|NaN)$", line)
        if m:
            values[m.group(1)] = float(m.group(2))
    return values


def kv_state(url: str) -> tuple[float, float, float]:
    """(free KV blocks, running requests, sessions) of granite_llm."""
    m = read_metrics(url)
    sessions = m.get("spyre_sessions", m.get("spyre_sessions{}"))
    return (m['spyre_kv_blocks{state="free"}'], m['spyre_requests{state="running"}'], sessions)


def finished(url: str, reason: str) -> float:
    return read_metrics(url).get(f'spyre_requests_finished_total{{reason="{reason}"}}', 0.0)


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = predicate()
    return value
