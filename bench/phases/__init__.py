"""The benchmark's phases, one module each (the names ``--skip`` takes, then the module):

- ``transformers``: ``transformers_baseline``: HF ``generate()`` one request at a time;
- ``engine``: ``engine``: the spyre_backend engine called in-process (no Triton);
- ``roofline``: ``roofline``: vision, prefill and decode timed on that engine while idle;
- ``triton``, ``ensemble``: ``triton``: the Python load generator on a fresh tritonserver, which
  the ``session`` (``session``) and ``perf_analyzer`` (``perf_analyzer``) phases share;
- ``peer``: ``peer_compare``: side by side with vLLM CPU;
- ``openai``: ``openai_front``: the OpenAI front against ``generate_stream``;
- ``proxy``: ``proxy``: two replicas behind HAProxy against one direct (tiny checkpoint only);
- ``prefix``: ``prefix``: prefix caching, ours and vLLM CPU;
- ``documents``: ``documents``: a first and a second question about a 3-page PDF, ours and (with
  the peer) vLLM CPU given the pages pre-rendered;
- ``structured``: ``structured``: requests with and without a JSON schema, ours and vLLM CPU.

bench/main.py runs them in that order for each checkpoint. ``full`` (``--checkpoints full``) is a
run of its own: the 2b-shaped checkpoint, ours in each dtype against vLLM CPU and llama.cpp.
Below: what every phase shares.
"""

from __future__ import annotations

import os
from datetime import datetime

PHASES = ("transformers", "engine", "roofline", "triton", "perf_analyzer", "ensemble", "session", "peer", "prefix",
          "documents", "structured", "openai", "proxy")
# vision_encoder's cache of repeated images would skip the vision tower: every request here has a
# new image anyway, and the cache stays off.
SERVER_ENV = {"SPYRE_ENCODER_CACHE_MB": "0"}


def our_server(checkpoint, log_path, env: dict | None = None):
    """A tritonserver on our model repository and ``checkpoint``, on free ports, not started yet."""
    from spyre_backend.server.child_process import free_port
    from spyre_backend.server.triton_process import ServerOptions, TritonServer

    return TritonServer(ServerOptions(checkpoint=checkpoint, http_port=free_port(), grpc_port=free_port(),
                                      metrics_port=free_port(), extra_env=dict(env or {})), log_path=log_path)


def log(message: str) -> None:
    print(f"[bench {datetime.now():%H:%M:%S}] {message}", flush=True)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]
