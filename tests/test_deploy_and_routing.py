"""The scale-out's parts that need no server: the routing rules, the HAProxy configuration (checked
by the real haproxy), and the Kubernetes manifests (validated offline with kubernetes-validate)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spyre_backend import PROJECT_ROOT
from spyre_backend.openai_api.protocol import routing_key
from spyre_backend.openai_api.triton_client import error_for
from spyre_backend.server.proxy import K8S_REPLICAS, Listen, Replica, check_config, haproxy_config, k8s_configmap
from spyre_backend.server.triton_process import ServerOptions, server_command
from spyre_backend.serving.routing import (explain_lost_session, header_mismatch, is_lost_session,
                                           lost_session_message, session_header)

K8S = PROJECT_ROOT / "deploy" / "k8s"


def test_the_header_is_read_from_the_forwarded_parameters():
    assert session_header('{"x-session-id":"42"}') == "42"
    assert session_header('{"X-Session-Id":" 42 "}') == "42"  # HTTP keeps the client's case
    assert session_header("{}") is None and session_header("") is None and session_header(None) is None
    assert session_header('{"x-session-id":""}') is None
    assert session_header("not json") is None


def test_a_header_naming_another_session_is_refused():
    assert header_mismatch(42, "42") is None
    assert header_mismatch(0, "alice") is None  # a routing key without a session
    assert header_mismatch(42, None) is None  # an old client without the header
    message = header_mismatch(42, "43")
    assert message and "'43'" in message and "(42)" in message


def test_tritons_start_refusal_reads_as_a_lost_session():
    triton = "inference request for sequence 7 to model 'granite_llm' must specify the START flag on the first request"
    explained = explain_lost_session(triton, 7)
    assert explained.startswith("session lost: sequence 7") and "START" in explained
    assert is_lost_session(explained)
    assert explain_lost_session("some other error", 7) == "some other error"


def test_the_openai_front_answers_a_lost_session_with_409():
    error = error_for(lost_session_message(7, "its replica stopped"))
    assert error.status == 409 and error.code == "session_lost"
    assert error.body()["error"]["type"] == "invalid_request_error"
    assert error_for("sampling_parameters: bad").status == 400


def test_the_routing_key_is_safe_metadata():
    assert routing_key("abc", "bob") == "abc"
    assert routing_key(None, "bob") == "bob"
    assert routing_key(None, None) == "" and routing_key(None, 5) == ""
    hashed = routing_key(None, "bjørn\n")
    assert len(hashed) == 32 and hashed.isascii() and hashed == routing_key(None, "bjørn\n")


def test_tritonserver_forwards_the_header_and_names_the_replica():
    command = server_command(ServerOptions(replica_id="replica-3"))
    assert "--grpc-header-forward-pattern=x-session-id" in command
    assert "--http-header-forward-pattern=(?i)x-session-id" in command
    assert "--id=replica-3" in command


def test_haproxy_accepts_the_generated_configurations(tmp_path):
    local = [Replica("replica-0", "127.0.0.1", 18000, 18001, 18009), Replica("replica-1", "127.0.0.1", 18100, 18101, 18109)]
    for name, text in (("local.cfg", haproxy_config(local)), ("k8s.cfg", haproxy_config(K8S_REPLICAS, Listen("0.0.0.0")))):
        path = tmp_path / name
        path.write_text(text)
        check_config(path)  # haproxy -c: the real parser
        assert "balance hdr(x-session-id)" in text and "hash-type consistent" in text
        assert "stick on hdr(x-session-id)" in text and "GET /v2/health/ready" in text
    broken = tmp_path / "broken.cfg"
    broken.write_text(haproxy_config(local).replace("balance hdr", "balance nonsense"))
    with pytest.raises(RuntimeError, match="haproxy refused"):
        check_config(broken)


def test_the_configmap_is_the_generated_configuration():
    assert (K8S / "haproxy-configmap.yaml").read_text() == k8s_configmap(), \
        "regenerate: .venv/bin/python -m spyre_backend.server.proxy k8s-configmap > deploy/k8s/haproxy-configmap.yaml"


def _documents() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d and "metadata" in d]
    return docs


def test_the_manifests_validate_offline():
    files = sorted(str(p) for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    result = subprocess.run([str(Path(sys.executable).parent / "kubernetes-validate"), "--strict", "--quiet", *files],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(Path(f).name for f in files)


def test_the_manifests_have_what_the_deployment_needs():
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in _documents()}
    replicas = by_kind[("Deployment", "granite-vision-replicas")]["spec"]["template"]["spec"]
    triton, openai = replicas["containers"]
    assert {"startupProbe", "livenessProbe", "readinessProbe"} <= set(triton)
    assert "--grpc-header-forward-pattern=x-session-id" in triton["command"]
    exit_timeout = next(int(a.split("=")[1]) for a in triton["command"] if a.startswith("--exit-timeout-secs="))
    assert replicas["terminationGracePeriodSeconds"] > exit_timeout >= 600  # running turns finish
    shm = next(v for v in replicas["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"]["sizeLimit"] == "1Gi"
    assert openai["readinessProbe"]["httpGet"]["path"] == "/health"
    assert by_kind[("Service", "granite-vision-replicas")]["spec"]["clusterIP"] == "None"  # headless
    hpa = by_kind[("HorizontalPodAutoscaler", "granite-vision-replicas")]
    assert hpa["apiVersion"] == "autoscaling/v2"
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]
    assert metric == {"name": "spyre_requests", "selector": {"matchLabels": {"state": "waiting"}}}
    assert ("PodDisruptionBudget", "granite-vision-replicas") in by_kind
    # the headless Service's DNS name is what HAProxy resolves
    service = by_kind[("Service", "granite-vision-replicas")]["metadata"]
    assert K8S_REPLICAS.hostname.startswith(f"{service['name']}.{service['namespace']}.svc")
