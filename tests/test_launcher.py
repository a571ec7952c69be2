"""The launcher refuses to start, with the reason, when the server cannot come up."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from spyre_backend.server.child_process import ServerStartError, free_port
from spyre_backend.server.triton_process import ServerOptions, TritonServer

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


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_launcher_killed_with_sigkill_takes_tritonserver_and_the_front_with_it(checkpoint, tmp_path):
    """tritonserver runs in a session of its own: without the parent-death signal it went on
    serving (and holding the ports) after a kill -9 of the launcher."""
    import signal
    import urllib.request

    from testkit.metrics import wait_for

    ports = [free_port() for _ in range(4)]
    log = open(tmp_path / "launcher.log", "w")
    launcher = subprocess.Popen([sys.executable, "-m", "spyre_backend.server.launcher", "--checkpoint", str(checkpoint),
                                 "--http-port", str(ports[0]), "--grpc-port", str(ports[1]),
                                 "--metrics-port", str(ports[2]), "--openai-port", str(ports[3])],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        def ready():
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{ports[3]}/health", timeout=2).status == 200
            except OSError:
                return False

        assert wait_for(ready, timeout=600, interval=1), (tmp_path / "launcher.log").read_text()[-2000:]
        children = _children(launcher.pid)
        stubs = [s for c in children for s in _children(c)]
        assert len(children) == 2 and len(stubs) == 4, (children, stubs)  # tritonserver + front; 4 models
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        assert wait_for(lambda: not any(map(_alive, children + stubs)), timeout=90, interval=0.5), \
            [p for p in children + stubs if _alive(p)]
        from spyre_backend.server.child_process import port_is_free

        assert wait_for(lambda: all(port_is_free("127.0.0.1", p) for p in ports), timeout=30)
    finally:
        if launcher.poll() is None:
            launcher.kill()
        log.close()
