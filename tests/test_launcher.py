"""The launcher refuses to start, with the reason, when the server cannot come up."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from spyre_backend.server.launcher import ServerOptions, ServerStartError, TritonServer, free_port

ROOT = Path(__file__).resolve().parent.parent


def options(checkpoint, **kw) -> ServerOptions:
    return ServerOptions(checkpoint=checkpoint, http_port=free_port(), grpc_port=free_port(),
                         metrics_port=free_port(), **kw)


def test_missing_checkpoint(tmp_path):
    out = subprocess.run([sys.executable, "-m", "spyre_backend.server.launcher", "--checkpoint",
                          str(tmp_path / "nope")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "has no config.json" in out.stderr


def test_port_taken(checkpoint):
    opts = options(checkpoint)
    with socket.socket() as s:
        s.bind(("127.0.0.1", opts.grpc_port))
        s.listen()
        with pytest.raises(ServerStartError, match=f"port {opts.grpc_port}.*in use"):
            TritonServer(opts).start()


def test_spyre_device_without_the_ibm_stack_fails_to_load(checkpoint, tmp_path):
    log = tmp_path / "server.log"
    server = TritonServer(options(checkpoint, extra_env={"SPYRE_DEVICE": "spyre"}), log_path=log)
    with pytest.raises(ServerStartError, match="exited"):
        server.start(timeout_s=300)
    text = log.read_text()
    assert "torch_sendnn" in text and "'device'" in text


def test_every_stub_runs_with_the_host_settings(server):
    """Set by the launcher for tritonserver and inherited by each model's stub process."""
    for model, pid in server.stub_pids().items():
        environ = dict(item.split("=", 1) for item in
                       Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0") if "=" in item)
        assert environ.get("OMP_WAIT_POLICY") == "PASSIVE", model
        assert environ.get("MALLOC_ARENA_MAX") == "2", model
