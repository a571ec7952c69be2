"""Soak: N concurrent streams of mixed traffic for M minutes against a real tritonserver.

Starts the server on free ports (or uses --grpc/--http/--metrics of a running one), then keeps
``--streams`` clients busy with a mix of: text-only and image prompts (checked against their
first answer: greedy output must never change), two-turn sessions, streams cut by gRPC cancel,
by a ``stop`` request and by HTTP disconnects, and bad requests that must fail cleanly.
At the start and at the end it records the RSS of tritonserver and of every stub process, the
free KV blocks and the open sessions. It prints a JSON report and exits 1 on any error, on KV
blocks or sessions not back to their idle values, or on RSS growth over ``--max-rss-growth``.

    .venv/bin/python scripts/soak.py --minutes 10 --streams 32
"""

from __future__ import annotations

import argparse
import json
import queue
import random
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

import tritonclient.grpc as grpcclient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spyre_backend.server.child_process import free_port  # noqa: E402
from spyre_backend.server.triton_process import ServerOptions, TritonServer  # noqa: E402
from testkit.images import shape_png as png  # noqa: E402
from testkit.streaming import to_grpc_inputs as tensors  # noqa: E402

MODEL = "granite_vision"


PROMPTS = [
    ("What is in the image?", [png("triangle", "green", "white", (200, 150))]),
    ("Say hello.", []),
    ("What shape is it?", [png("square", "yellow", "black", (60, 200))]),
    ("What color is the background?", [png("circle", "red", "blue", (300, 40))]),
    ("What is in the second image?", [png("cross", "blue", "yellow", (90, 90)), png("circle", "white", "purple", (150, 60))]),
]
LONG = {"text_input": "Say hello.", "apply_chat_template": True, "max_tokens": 3000, "stream": True,
        "sampling_parameters": json.dumps({"min_tokens": 3000})}
BAD = [
    {"text_input": "What is in the image?", "image": [b"not an image"], "apply_chat_template": True},
    {"text_input": "<image> <image>", "image": [PROMPTS[0][1][0]]},
    {"text_input": "hi", "sampling_parameters": "{not json"},
    {"text_input": "hi", "max_tokens": -3},
]


class Stream:
    """One gRPC stream with one request in flight; yields (result, error) with arrival times."""

    def __init__(self, url: str):
        self.results: queue.Queue = queue.Queue()
        self.client = grpcclient.InferenceServerClient(url)
        self.client.start_stream(callback=lambda result, error: self.results.put((time.monotonic(), result, error)))

    def send(self, inputs: dict, sequence_id=0, start=False, end=False) -> None:
        self.client.async_stream_infer(MODEL, tensors(inputs), sequence_id=sequence_id,
                                       sequence_start=start, sequence_end=end)

    def next(self, timeout=300):
        arrived, result, error = self.results.get(timeout=timeout)
        if error is not None:
            return arrived, None, str(error)
        return arrived, (result.as_numpy("text_output")[0].decode(), result.as_numpy("finish_reason")[0].decode()), None

    def close(self, cancel=False) -> None:
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


def generate(url: str, inputs: dict, sequence_id=0, start=False, end=False) -> dict:
    """Runs one request to its end: text, time to first response, total time, or the error."""
    stream = Stream(url)
    try:
        sent = time.monotonic()
        stream.send(inputs, sequence_id, start, end)
        pieces, first = [], None
        while True:
            arrived, out, error = stream.next()
            if error:
                return {"error": error}
            first = first if first is not None else arrived - sent
            pieces.append(out[0])
            if out[1]:
                return {"text": "".join(pieces), "ttft": first, "e2e": time.monotonic() - sent, "reason": out[1]}
    finally:
        stream.close()


class Soak:
    def __init__(self, server_urls: tuple[str, str, str], seed: int):
        self.grpc, self.http, self.metrics = server_urls
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.errors: list[str] = []
        self.counts: dict[str, int] = {}
        self.latencies: list[tuple[float, float, float]] = []  # (time, ttft, e2e) of plain prompts
        self.expected: dict[int, str] = {}
        self.next_id = 10_000_000

    def record(self, kind: str, error: str | None = None) -> None:
        with self.lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            if error:
                self.errors.append(f"{kind}: {error}"[:300])

    def sequence_id(self) -> int:
        with self.lock:
            self.next_id += 1
            return self.next_id

    def prompt(self, i: int) -> dict:
        question, images = PROMPTS[i]
        inputs = {"text_input": question, "apply_chat_template": True, "max_tokens": 24, "stream": True}
        if images:
            inputs["image"] = images
        return inputs

    def plain(self) -> None:
        i = self.rng.randrange(len(PROMPTS))
        got = generate(self.grpc, self.prompt(i))
        if "error" in got:
            return self.record("plain", got["error"])
        with self.lock:
            want = self.expected.setdefault(i, got["text"])
            self.latencies.append((time.monotonic(), got["ttft"], got["e2e"]))
        self.record("plain", None if got["text"] == want else f"answer changed: {got['text']!r} != {want!r}")

    def session(self) -> None:
        sid = self.sequence_id()
        first = generate(self.grpc, self.prompt(0), sid, start=True)
        if "error" in first:
            return self.record("session", first["error"])
        second = generate(self.grpc, {"text_input": "What shape is it?", "apply_chat_template": True,
                                      "max_tokens": 24, "stream": True}, sid, end=True)
        self.record("session", second.get("error"))

    def cut(self) -> None:
        how = self.rng.choice(("cancel", "stop", "http"))
        after = self.rng.randint(1, 20)
        if how == "http":
            request = urllib.request.Request(f"http://{self.http}/v2/models/{MODEL}/generate_stream",
                                             data=json.dumps(LONG).encode())
            try:
                with urllib.request.urlopen(request, timeout=300) as response:
                    for n, _ in enumerate(line for line in response if line.startswith(b"data:")):
                        if n + 1 >= after:
                            break
                self.record("cut-http")
            except Exception as exc:
                self.record("cut-http", repr(exc))
            return
        sid = self.sequence_id() if how == "stop" else 0
        stream = Stream(self.grpc)
        try:
            stream.send(LONG, sid, start=bool(sid), end=bool(sid))
            for _ in range(after):
                _, out, error = stream.next()
                if error:
                    return self.record(f"cut-{how}", error)
            if how == "stop":
                got = generate(self.grpc, {"text_input": "", "stop": True}, sid, end=True)
                if got.get("reason") != "stopped":
                    return self.record("cut-stop", f"stop answered {got}")
            self.record(f"cut-{how}")
        finally:
            stream.close(cancel=True)

    def bad(self) -> None:
        got = generate(self.grpc, self.rng.choice(BAD))
        self.record("bad", None if "error" in got else f"a bad request succeeded: {got}")

    def worker(self, deadline: float) -> None:
        actions = [self.plain] * 5 + [self.session] * 2 + [self.cut] * 2 + [self.bad]
        while time.monotonic() < deadline:
            action = self.rng.choice(actions)
            try:
                action()
            except Exception as exc:  # a hang (queue.Empty) or a client error is a soak error
                self.record(action.__name__, repr(exc))


def metric(url: str, name: str) -> float:
    for line in urllib.request.urlopen(f"http://{url}/metrics", timeout=10).read().decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{}"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def idle_state(metrics_url: str, timeout=120.0) -> dict:
    """Free KV blocks and sessions once nothing runs (sessions of cut streams close as they end)."""
    deadline = time.monotonic() + timeout
    while True:
        state = {"free_blocks": metric(metrics_url, 'spyre_kv_blocks{state="free"}'),
                 "running": metric(metrics_url, 'spyre_requests{state="running"}'),
                 "sessions": metric(metrics_url, "spyre_sessions")}
        if (state["running"] == 0 and state["sessions"] == 0) or time.monotonic() > deadline:
            return state
        time.sleep(1)


def rss_mb(pid: int) -> dict[str, float]:
    """RSS of a process and its children, by command name."""
    out = {}
    pids = [pid] + [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for p in pids:
        try:
            status = Path(f"/proc/{p}/status").read_text()
            cmdline = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
        name = Path(cmdline[0].decode()).name
        model = next((part.decode().split("/")[-3] for part in cmdline if part.endswith(b"/model.py")), None)
        out[f"{name}:{model}" if model else name] = rss / 1024
    return out


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else float("nan")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-rss-growth", type=float, default=0.05, help="fraction, per process")
    parser.add_argument("--warm-minutes", type=float, default=1.0,
                        help="traffic before the start snapshot (caches, allocator pools)")
    parser.add_argument("--report", type=Path, help="also write the JSON report here")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment for the server (e.g. MALLOC_ARENA_MAX=2); repeatable")
    args = parser.parse_args(argv)

    options = ServerOptions(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                            extra_env=dict(item.split("=", 1) for item in args.server_env))
    log_path = ROOT / ".triton" / "soak-server.log"
    log_path.parent.mkdir(exist_ok=True)
    server = TritonServer(options, log_path=log_path).start()
    try:
        urls = (server.grpc_url, server.http_url, server.metrics_url.removeprefix("http://").removesuffix("/metrics"))
        soak = Soak(urls, args.seed)

        def run(minutes: float) -> None:
            deadline = time.monotonic() + minutes * 60
            threads = [threading.Thread(target=soak.worker, args=(deadline,)) for _ in range(args.streams)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        run(args.warm_minutes)
        start = {"idle": idle_state(urls[2]), "rss_mb": rss_mb(server.process.pid)}
        for collected in (soak.errors, soak.latencies, soak.counts):  # measure from the snapshot on
            collected.clear()
        began = time.monotonic()
        series, sampling = [], threading.Event()

        def sample() -> None:  # RSS under load over time: a leak climbs, allocator warm-up levels off
            while not sampling.wait(30):
                series.append({"t_s": round(time.monotonic() - began), **rss_mb(server.process.pid)})

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        run(args.minutes)
        sampling.set()
        end = {"idle": idle_state(urls[2]), "rss_mb": rss_mb(server.process.pid)}
    finally:
        server.stop()

    growth = {name: end["rss_mb"].get(name, 0.0) / mb - 1 for name, mb in start["rss_mb"].items()}
    window = max(60.0, args.minutes * 60 / 5)
    early = [(t, f, e) for t, f, e in soak.latencies if t - began < window]
    late = [(t, f, e) for t, f, e in soak.latencies if t - began > args.minutes * 60 - window]
    report = {
        "minutes": args.minutes, "streams": args.streams, "requests": soak.counts,
        "errors": len(soak.errors), "first_errors": soak.errors[:10],
        "latency_s": {
            "first_window": {"ttft_p50": percentile([f for _, f, _ in early], 50),
                             "e2e_p50": percentile([e for _, _, e in early], 50),
                             "e2e_p95": percentile([e for _, _, e in early], 95)},
            "last_window": {"ttft_p50": percentile([f for _, f, _ in late], 50),
                            "e2e_p50": percentile([e for _, _, e in late], 50),
                            "e2e_p95": percentile([e for _, _, e in late], 95)},
        },
        "start": start, "end": end, "rss_growth": growth, "rss_series_mb": series,
    }
    text = json.dumps(report, indent=2, default=float)
    print(text)
    if args.report:
        args.report.write_text(text)
    failures = []
    if soak.errors:
        failures.append(f"{len(soak.errors)} errors")
    if end["idle"] != start["idle"]:
        failures.append(f"idle state changed: {start['idle']} -> {end['idle']}")
    failures += [f"RSS of {n} grew {g:.1%}" for n, g in growth.items() if g > args.max_rss_growth]
    print("SOAK " + ("FAILED: " + "; ".join(failures) if failures else "PASSED"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
