"""Both kinds of client: without sequence ids (stateless front) and with them (START/END)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from spyre_backend.server.triton_install import perf_analyzer_env
from testkit.images import shape_png
from testkit.streaming import grpc_stream

ROOT = Path(__file__).resolve().parent.parent


def test_client_sequence_id_through_the_front(server, reference):
    prompt = reference.chat_prompt("Say hello.", 0)
    want = reference.generate(prompt, [], 16)
    got = grpc_stream(server.grpc_url, {"text_input": prompt, "max_tokens": 16, "stream": True},
                      sequence_id=4242, sequence_start=True, sequence_end=True)
    assert got.get("text") == want["text"], got


def test_client_sequence_id_on_the_stateful_ensemble(server, reference):
    prompt = reference.chat_prompt("Say hello.", 0)
    want = reference.generate(prompt, [], 16)
    got = grpc_stream(server.grpc_url, {"text_input": prompt, "max_tokens": 16, "stream": True},
                      model="granite_vision_ensemble", sequence_id=777, sequence_start=True, sequence_end=True)
    assert got.get("text") == want["text"], got


def test_stateful_ensemble_refuses_requests_without_a_sequence_id(server, reference):
    got = grpc_stream(server.grpc_url, {"text_input": "hi", "max_tokens": 4}, model="granite_vision_ensemble")
    assert "correlation ID" in got.get("error", ""), got


def test_command_line_client_answers_about_an_image(server, reference, tmp_path):
    image = tmp_path / "triangle.png"
    image.write_bytes(shape_png("triangle", "green", "white", (200, 150)))
    want = reference.generate(reference.chat_prompt("What is in the image?", 1), [image.read_bytes()], 64)
    out = subprocess.run([sys.executable, "-m", "client.granite_vision_client", "What is in the image?",
                          "--image", str(image), "--url", server.grpc_url], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == want["text"]
    assert out.stdout.strip() == "a green triangle on a white background"


def test_command_line_client_answers_about_a_pdf_page(server, reference, tmp_path):
    from spyre_backend.config import InputLimits
    from testkit.documents import pdf_of, png, render_pages, shape_pages

    pdf = tmp_path / "shapes.pdf"
    pdf.write_bytes(pdf_of(shape_pages()))
    page = png(render_pages(pdf.read_bytes(), InputLimits.document_dpi, [1])[0])  # page 2 at the default dpi
    want = reference.generate(reference.chat_prompt("What is in the image?", 1), [page], 64)
    out = subprocess.run([sys.executable, "-m", "client.granite_vision_client", "What is in the image?",
                          "--document", str(pdf), "--pages", "2", "--url", server.grpc_url], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == want["text"]


def run_perf_analyzer(server, tmp_path, model: str, extra: list[str]) -> subprocess.CompletedProcess:
    data = tmp_path / f"{model}.json"
    data.write_text(json.dumps({"data": [{"text_input": ["Say hello."], "max_tokens": [8],
                                          "apply_chat_template": [True], "stream": [True]}]}))
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (perf_analyzer_env()["LD_LIBRARY_PATH"],
                                                          env.get("LD_LIBRARY_PATH", "")) if p)
    cmd = [str(Path(sys.executable).parent / "perf_analyzer"), "-m", model, "-i", "grpc", "--streaming",
           "-u", server.grpc_url, "--input-data", str(data), "--concurrency-range", "2",
           "--measurement-mode", "count_windows", "--measurement-request-count", "4",
           "--stability-percentage", "1000", "--max-trials", "3", *extra]  # works, not how fast
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def test_perf_analyzer_without_sequence_flags(server, tmp_path):
    out = run_perf_analyzer(server, tmp_path, "granite_vision", [])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Throughput" in out.stdout


def test_perf_analyzer_with_its_own_sequence_ids(server, tmp_path):
    out = run_perf_analyzer(server, tmp_path, "granite_vision_ensemble", ["--sequence-length", "1"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Throughput" in out.stdout
