"""Prefix caching: requests that repeat what an earlier one computed, ours against ``vllm serve``.

Three workloads, each repeated with an image of its own per repetition (so only the repetition
inside a workload can hit), one request at a time, time to first token of each:
- ``second_question``: an image with a question, then the same image with another question;
- ``resent``: a 3-turn conversation about an image, every turn resending the whole conversation
  (what OpenAI-style clients do), no sequence id;
- ``session`` (ours only: vLLM has no sessions): the same 3 turns on one sequence id, each turn
  sending only its new message.

Both servers run with their defaults (our vision encoder's feature cache on, like vLLM's
multimodal cache), one at a time: ours first, then vLLM with one thread setting (tiny 1, mid 2:
the better one in the ``peer`` phase).
"""

from __future__ import annotations

import base64
import http.client
import json
import statistics
import time
from pathlib import Path

from bench import vllm_peer
from bench.phases import our_server
from bench.phases.session import FIRST_SESSION_ID, TritonStream
from bench.workload import Workload

FOLLOW_UPS = ["What color is the background?", "Is there anything else in the picture?"]
SECOND_QUESTION = "Describe the shape's color in one word."
USER = "<|user|>\n{content}\n<|assistant|>\n"  # the shipped chat template's turn, as the session phase sends it
VLLM_THREADS = {"tiny": 1, "mid": 2}


def _turn(question: str, image: bool) -> str:
    return ("\n" if not image else "") + USER.format(content=("<image>\n" if image else "") + question)


class _OpenAIChat:
    """Streaming chat completions; time to the first content chunk."""

    def __init__(self, url: str, model: str = "peer"):
        self.url, self.model = url, model

    def first_token_ms(self, messages: list[dict], max_tokens: int) -> tuple[float, str]:
        host, port = self.url.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=1200)
        body = json.dumps({"model": self.model, "messages": messages, "stream": True, "temperature": 0,
                           "max_tokens": max_tokens, "min_tokens": max_tokens}).encode()
        sent, first, pieces = time.perf_counter(), None, []
        try:
            conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            if response.status != 200:
                raise RuntimeError(f"vLLM: HTTP {response.status}: {response.read()[:300]!r}")
            for line in response:
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                delta = (json.loads(line[6:])["choices"] or [{}])[0].get("delta", {}).get("content")
                if delta:
                    first = first or time.perf_counter()
                    pieces.append(delta)
        finally:
            conn.close()
        return ((first or time.perf_counter()) - sent) * 1000, "".join(pieces)


def _image_part(png: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}}


def measure_ours(url: str, workload: Workload, repeats: int, first_index: int) -> dict:
    out = {"second_question": [[], []], "resent": [[], [], []], "session": [[], [], []]}
    stream = TritonStream(url)
    plain = {"max_tokens": workload.max_tokens, "stream": True}
    try:
        stream.first_token_ms({"text_input": "Hello", "max_tokens": 1, "stream": True})  # connect
        for r in range(repeats):
            i = first_index + 3 * r
            image = [workload.image(i)]
            for k, question in enumerate((workload.question(i), SECOND_QUESTION)):
                ms, _ = stream.first_token_ms({"text_input": _turn(question, True), "image": image, **plain})
                out["second_question"][k].append(ms)
            image = [workload.image(i + 1)]
            history = ""
            for k, question in enumerate([workload.question(i + 1)] + FOLLOW_UPS):
                history += _turn(question, k == 0)
                ms, answer = stream.first_token_ms({"text_input": history, "image": image, **plain})
                out["resent"][k].append(ms)
                history += answer
            image, sid = [workload.image(i + 2)], FIRST_SESSION_ID + 500 + r
            questions = [workload.question(i + 2)] + FOLLOW_UPS
            for k, question in enumerate(questions):
                inputs = {"text_input": _turn(question, k == 0), **plain, **({"image": image} if k == 0 else {})}
                ms, _ = stream.first_token_ms(inputs, sequence_id=sid, sequence_start=k == 0,
                                              sequence_end=k == len(questions) - 1)
                out["session"][k].append(ms)
    finally:
        stream.close()
    return out


def measure_vllm(url: str, workload: Workload, repeats: int, first_index: int) -> dict:
    out = {"second_question": [[], []], "resent": [[], [], []]}
    chat = _OpenAIChat(url)
    chat.first_token_ms([{"role": "user", "content": "Hello"}], 1)  # connect, warm
    for r in range(repeats):
        i = first_index + 3 * r
        for k, question in enumerate((workload.question(i), SECOND_QUESTION)):
            ms, _ = chat.first_token_ms([{"role": "user", "content": [_image_part(workload.image(i)),
                                                                      {"type": "text", "text": question}]}],
                                        workload.max_tokens)
            out["second_question"][k].append(ms)
        messages: list[dict] = []
        for k, question in enumerate([workload.question(i + 1)] + FOLLOW_UPS):
            content = [{"type": "text", "text": question}]
            if k == 0:
                content.insert(0, _image_part(workload.image(i + 1)))
            messages.append({"role": "user", "content": content})
            ms, answer = chat.first_token_ms(messages, workload.max_tokens)
            out["resent"][k].append(ms)
            messages.append({"role": "assistant", "content": answer})
    return out


def _medians(raw: dict) -> dict:
    return {name: [statistics.median(turn) for turn in turns] for name, turns in raw.items()}


def run(name: str, checkpoint: Path, workload: Workload, repeats: int, out_dir: Path, log,
        server_env: dict | None = None) -> dict:
    from spyre_backend.server.child_process import free_port

    # a server's own defaults, the feature cache included
    env = {k: v for k, v in (server_env or {}).items() if k != "SPYRE_ENCODER_CACHE_MB"}
    result: dict = {"repeats": repeats}
    server = our_server(checkpoint, out_dir / "prefix-ours.log", env)
    server.start(timeout_s=1200)
    try:
        log(f"prefix caching: ours, {repeats} repetitions of each workload")
        result["ours"] = measure_ours(server.grpc_url, workload, repeats, first_index=5000)
    finally:
        server.stop()
    threads = VLLM_THREADS.get(name, 2)
    vllm = vllm_peer.VllmServer(vllm_peer.ensure_installed(log), vllm_peer.servable_checkpoint(checkpoint),
                                free_port(), threads, out_dir / "prefix-vllm.log")
    vllm.start()
    try:
        log(f"prefix caching: vLLM ({threads} thread(s)), {repeats} repetitions of each workload")
        result["vllm"] = measure_vllm(vllm.url, workload, repeats, first_index=5000)
    finally:
        vllm.stop()
    ours, peer = _medians(result["ours"]), _medians(result["vllm"])
    result["medians_ms"] = {"ours": ours, "vllm": peer}
    result["summary"] = {
        "second_question_speedup": ours["second_question"][0] / ours["second_question"][1],
        "resent_turn3_vs_session_turn3": ours["resent"][2] / ours["session"][2],
        "second_question_vs_vllm": ours["second_question"][1] / peer["second_question"][1],
        "resent_turn3_vs_vllm": ours["resent"][2] / peer["resent"][2],
    }
    return result


# (summary key, description, goal, higher is better): the targets, for the mid-size checkpoint
TARGETS = [
    ("second_question_speedup", "a second question about a seen image: first TTFT / second TTFT", 8.0, True),
    ("resent_turn3_vs_session_turn3", "turn 3 resent whole / the same turn in a session (TTFT)", 1.5, False),
    ("second_question_vs_vllm", "second-question TTFT, ours / vLLM", 1.0, False),
    ("resent_turn3_vs_vllm", "turn 3 resent whole TTFT, ours / vLLM", 1.0, False),
]


def targets(name: str, result: dict) -> list[dict]:
    out = []
    for key, text, goal, higher in TARGETS if name == "mid" else []:
        value = result["summary"][key]
        out.append({"checkpoint": name, "name": f"prefix caching: {text}", "target": f"{'>=' if higher else '<='} {goal}",
                    "value": value, "met": value >= goal if higher else value <= goal})
    return out


def markdown(result: dict) -> list[str]:
    lines = ["", f"Prefix caching, TTFT p50 ms per request or turn ({result['repeats']} repetitions):", "",
             "| workload | ours | vLLM |", "|---|---|---|"]
    med = result["medians_ms"]
    for workload in ("second_question", "resent", "session"):
        fmt = lambda side: ", ".join(f"{v:.0f}" for v in med[side].get(workload, [])) or "-"  # noqa: E731
        lines.append(f"| {workload} | {fmt('ours')} | {fmt('vllm')} |")
    return lines
