"""A/B of stream_interval_ms through a real tritonserver: tiny checkpoint, 16 streams, 64 new tokens,
two alternating rounds of 25 and 100 ms (the measurement behind the default; README, Streaming)."""
import sys; sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from pathlib import Path
from spyre_backend.server.launcher import ServerOptions, TritonServer, free_port
from spyre_backend import DEFAULT_CHECKPOINT
from bench.loadgen import TritonTarget, closed_loop
from bench.stats import summarize
from bench.workload import Workload
Path("results").mkdir(exist_ok=True)
for rnd in range(2):
    for si in ("25", "100"):
        opts = ServerOptions(checkpoint=DEFAULT_CHECKPOINT, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                             extra_env={"SPYRE_ENCODER_CACHE_MB": "0", "SPYRE_STREAM_INTERVAL_MS": si})
        srv = TritonServer(opts, log_path=Path("results/stream-interval-server.log")).start(timeout_s=900)
        t = TritonTarget(srv.grpc_url, Workload(64), 16)
        closed_loop(t.send, 4, 4)
        s = summarize(closed_loop(lambda c, i: t.send(c, 10 + i), 64, 16))
        print(rnd, si, round(s["tokens_per_s"]), round(s["ttft_ms"]["p50"]), round(s["itl_ms"]["p50"], 2), flush=True)
        t.close(); srv.stop()
