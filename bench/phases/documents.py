"""Documents: time to first token of a first and a second question about the same 3-page PDF.

Ours gets the PDF itself (the ``document`` input; the server renders, processes and encodes the
pages, then a second question finds them all cached: processed pages, encoder features, the
prompt's KV blocks). vLLM, when there is a peer (see ``bench/main.py``), gets what a
vLLM user can best send: the same pages pre-rendered by pypdfium2 at the same dpi and resized the
same way, as three images (its multimodal and prefix caches then do their part on the second
question); a run without the peer phase uses a peer an earlier run installed, and has none otherwise. Each repetition has a PDF of its own, one request at a time; both servers with their
defaults, one at a time.
"""

from __future__ import annotations

import base64
import io
import json
import statistics
from pathlib import Path

from PIL import Image

from bench.phases import our_server
from bench.phases.prefix import VLLM_THREADS, _OpenAIChat
from bench.phases.session import TritonStream
from bench.workload import Workload
from testkit.documents import pdf_of, png, render_pages

QUESTIONS = ("What is in the image?", "What color is the background?")
DPI = 72  # the workload's 200x150 images become 200x150-point pages: the same image tokens as the other phases
MAX_IMAGE_SIDE = 768  # granite-vision-3.3's advice for document pages (a no-op on these small pages)
PAGES = 3


def document(workload: Workload, index: int) -> bytes:
    """Repetition ``index``'s PDF: three of the workload's images, one per page, none seen elsewhere."""
    return pdf_of([Image.open(io.BytesIO(workload.image(index * PAGES + k))).convert("RGB") for k in range(PAGES)])


def options() -> str:
    return json.dumps({"dpi": DPI, "max_image_side": MAX_IMAGE_SIDE})


def page_images(pdf: bytes) -> list[bytes]:
    """The pages as the server renders and resizes them, as PNGs: what a vLLM client would send."""
    from spyre_backend.preprocess.images import resize_to_side

    return [png(resize_to_side(page, MAX_IMAGE_SIDE)) for page in render_pages(pdf, DPI)]


def measure_ours(url: str, workload: Workload, repeats: int, first_index: int) -> list[list[float]]:
    out: list[list[float]] = [[], []]
    stream = TritonStream(url)
    try:
        stream.first_token_ms({"text_input": "Hello", "max_tokens": 1, "stream": True})  # connect
        for r in range(repeats):
            pdf = document(workload, first_index + r)
            for k, question in enumerate(QUESTIONS):
                ms, _ = stream.first_token_ms({
                    "text_input": question, "document": [pdf], "mm_processor_kwargs": options(),
                    "apply_chat_template": True, "max_tokens": workload.max_tokens, "stream": True,
                    "sampling_parameters": workload.sampling_parameters})
                out[k].append(ms)
    finally:
        stream.close()
    return out


def measure_vllm(url: str, workload: Workload, repeats: int, first_index: int) -> list[list[float]]:
    out: list[list[float]] = [[], []]
    chat = _OpenAIChat(url)
    chat.first_token_ms([{"role": "user", "content": "Hello"}], 1)  # connect, warm
    for r in range(repeats):
        parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(p).decode()}}
                 for p in page_images(document(workload, first_index + r))]
        for k, question in enumerate(QUESTIONS):
            ms, _ = chat.first_token_ms([{"role": "user", "content": [*parts, {"type": "text", "text": question}]}],
                                        workload.max_tokens)
            out[k].append(ms)
    return out


def summary(ours: list[list[float]], peer: list[list[float]] | None) -> dict:
    med = {"ours": [statistics.median(t) for t in ours]}
    out = {"medians_ms": med, "second_vs_first": med["ours"][1] / med["ours"][0]}
    if peer is not None:
        med["vllm"] = [statistics.median(t) for t in peer]
        out["first_vs_vllm"] = med["ours"][0] / med["vllm"][0]
        out["second_vs_vllm"] = med["ours"][1] / med["vllm"][1]
    return out


def run(name: str, checkpoint: Path, workload: Workload, repeats: int, out_dir: Path, log,
        server_env: dict | None = None, peer: bool = False) -> dict:
    from spyre_backend.server.child_process import free_port

    env = {k: v for k, v in (server_env or {}).items() if k != "SPYRE_ENCODER_CACHE_MB"}  # its defaults
    result: dict = {"repeats": repeats, "pages": PAGES, "dpi": DPI, "max_image_side": MAX_IMAGE_SIDE}
    server = our_server(checkpoint, out_dir / "documents-ours.log", env)
    server.start(timeout_s=1200)
    try:
        log(f"documents: ours, {repeats} PDFs of {PAGES} pages, two questions each")
        result["ours"] = measure_ours(server.grpc_url, workload, repeats, first_index=7000)
    finally:
        server.stop()
    if peer:
        from bench import vllm_peer

        threads = VLLM_THREADS.get(name, 2)
        vllm = vllm_peer.VllmServer(vllm_peer.ensure_installed(log), vllm_peer.servable_checkpoint(checkpoint),
                                    free_port(), threads, out_dir / "documents-vllm.log",
                                    extra_args=("--limit-mm-per-prompt", json.dumps({"image": PAGES})))
        vllm.start()
        try:
            log(f"documents: vLLM ({threads} thread(s)) with the pages pre-rendered")
            result["vllm"] = measure_vllm(vllm.url, workload, repeats, first_index=7000)
        finally:
            vllm.stop()
    result["summary"] = summary(result["ours"], result.get("vllm"))
    return result


def markdown(result: dict) -> list[str]:
    s = result["summary"]
    med = s["medians_ms"]
    lines = ["", f"Documents ({result['pages']}-page PDFs at {result['dpi']} dpi, longest side "
                 f"{result['max_image_side']}), TTFT p50 ms over {result['repeats']} PDFs:", "",
             "| question | ours (the PDF) | vLLM (pre-rendered pages) | ours / vLLM |", "|---|---|---|---|"]
    for k, label in enumerate(("first", "second, same PDF")):
        peer = med.get("vllm")
        lines.append(f"| {label} | {med['ours'][k]:.0f} | {peer[k]:.0f} | {med['ours'][k] / peer[k]:.2f} |"
                     if peer else f"| {label} | {med['ours'][k]:.0f} | - | - |")
    lines.append(f"\nSecond question / first (ours): {s['second_vs_first']:.2f}")
    return lines
