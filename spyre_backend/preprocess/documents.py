"""PDF documents as images: one image per page, rendered with pypdfium2 in a bounded child process.

A prompt marks where each document stands with ``DOCUMENT_TAG``; the preprocessor replaces the tag
with what the chat template renders for one image part per selected page, so a document reads
exactly as the same pages sent as images. The OpenAI front writes the tag for a ``file`` part; a
Triton client writes it in ``text_input`` (or lets ``apply_chat_template`` place it).

Pages are rendered at most once: each page's processed crops are kept in the preprocessor's
processed-image cache under the document's bytes, the page number and the render and resize
settings, and the page count under the document's bytes, so a second question about the same
document opens no PDF at all. The vision encoder's cache then finds the same crops' features.

Nothing here imports pypdfium2 or transformers: the renderer runs in ``pdf_worker``.
"""

from __future__ import annotations

import base64
import binascii
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from spyre_backend.errors import InvalidRequest

DOCUMENT_TAG = "<document>"
PDF_MAGIC = b"%PDF-"
_HEADER = struct.Struct("<Q")


def document_bytes(payload: bytes, index: int, max_bytes: int) -> bytes:
    """The PDF's bytes from raw bytes, base64 text or a ``data:application/pdf;base64,`` URI."""
    if not payload:
        raise InvalidRequest(f"document {index} is empty")
    if len(payload) > max_bytes * 4 // 3 + 128:  # base64 is 4/3 larger: refuse before decoding it
        raise InvalidRequest(f"document {index} is {len(payload)} bytes, over the limit max_document_bytes={max_bytes}")
    data = payload
    if not payload.startswith(PDF_MAGIC):
        text = payload.strip()
        if text[:5].lower() == b"data:":
            header, sep, text = text.partition(b",")
            if not sep or b";base64" not in header.lower():
                raise InvalidRequest(f"document {index}: only base64 data: URIs are accepted")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest(f"document {index} is neither a PDF nor valid base64") from None
    if len(data) > max_bytes:
        raise InvalidRequest(f"document {index} is {len(data)} bytes, over the limit max_document_bytes={max_bytes}")
    if PDF_MAGIC not in data[:1024]:  # the header may follow a little junk, as readers allow
        raise InvalidRequest(f"document {index} is not a PDF (no %PDF- header)")
    return data


def select_pages(spec: str | None, count: int, max_pages: int, index: int) -> list[int]:
    """Zero-based page numbers, in document order, of a 1-based ``spec`` such as ``"1-3,7"``;
    None: every page, when there are at most ``max_pages``."""
    if count < 1:
        raise InvalidRequest(f"document {index} has no pages")
    if spec is None:
        if count > max_pages:
            raise InvalidRequest(f"document {index} has {count} pages, over the limit max_document_pages={max_pages}; "
                                 f"choose some with pages (e.g. \"1-{max_pages}\")")
        return list(range(count))
    chosen: set[int] = set()
    for item in str(spec).replace(" ", "").split(","):
        first, dash, last = item.partition("-")
        try:
            low, high = int(first), int(last) if dash else int(first)
        except ValueError:
            raise InvalidRequest(f"document {index}: pages {spec!r} is not a list of pages and ranges "
                                 f"such as \"1-3,7\"") from None
        if not 1 <= low <= high <= count:
            raise InvalidRequest(f"document {index}: pages {item!r} is outside the document's pages 1-{count}")
        chosen.update(range(low - 1, high))
    if len(chosen) > max_pages:
        raise InvalidRequest(f"document {index}: pages {spec!r} selects {len(chosen)} pages, over the limit "
                             f"max_document_pages={max_pages}")
    return sorted(chosen)


def image_part_text(render, image_token: str) -> str:
    """What the chat template writes for one image part (``"<image>\\n"`` for Granite): ``render``
    renders a user message's content parts; the difference with and without an image part."""
    marker = "\x00document\x00"
    with_image = render([{"type": "image"}, {"type": "text", "text": marker}])
    without = render([{"type": "text", "text": marker}])
    prefix = without[: without.index(marker)]
    if with_image.startswith(prefix):
        part = with_image[len(prefix): with_image.index(marker)]
        if part.count(image_token) == 1:
            return part
    return image_token


def python_executable() -> str:
    """This environment's Python: inside Triton's stub ``sys.executable`` is the stub itself."""
    if Path(sys.executable).name.startswith("python"):
        return sys.executable
    for name in ("python3", "python"):
        candidate = Path(sys.prefix) / "bin" / name
        if candidate.exists():
            return str(candidate)
    return "python3"


class PageRenderer:
    """The client of one ``pdf_worker`` child: a job at a time, each within ``timeout_s`` (past it
    the child is killed and the document refused); a dead child is replaced at the next job."""

    def __init__(self, timeout_s: float, memory_mb: int):
        self.timeout_s, self.memory_mb = timeout_s, memory_mb
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def render(self, data: bytes, index: int, pages: str | None, dpi: int, *, max_pages: int, max_pixels: int,
               skip: frozenset[int] = frozenset()) -> dict:
        """``{"count", "pages": [selected, zero-based], "rendered": {page: ((w, h), rgb bytes)}}``
        for the selected pages not in ``skip``."""
        job = {"data": data, "index": index, "pages": pages, "dpi": dpi, "max_pages": max_pages,
               "max_pixels": max_pixels, "skip": skip}
        with self._lock:
            answer = self._exchange(pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL), index)
        if "error" in answer:
            raise InvalidRequest(answer["error"])
        return answer

    def _exchange(self, job: bytes, index: int) -> dict:
        proc = self._child()
        deadline = time.monotonic() + self.timeout_s
        try:
            proc.stdin.write(_HEADER.pack(len(job)) + job)
            proc.stdin.flush()
            (size,) = _HEADER.unpack(self._read(proc, _HEADER.size, deadline))
            return pickle.loads(self._read(proc, size, deadline))
        except TimeoutError:
            self.close()
            raise InvalidRequest(f"document {index} took longer to render than the limit "
                                 f"document_render_timeout_s={self.timeout_s:g}") from None
        except (EOFError, OSError):
            code = proc.poll()
            self.close()
            raise InvalidRequest(f"document {index} could not be rendered: the renderer died (exit {code}), within "
                                 f"the limit document_render_memory_mb={self.memory_mb}") from None

    def start(self) -> None:
        """Start the child ahead of the first document (the model's load does: no request waits
        for an interpreter to start)."""
        with self._lock:
            self._child()

    def _child(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen(
                [python_executable(), "-m", "spyre_backend.preprocess.pdf_worker", str(self.memory_mb)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
        return self._proc

    @staticmethod
    def _read(proc: subprocess.Popen, size: int, deadline: float) -> bytes:
        fd, out = proc.stdout.fileno(), bytearray()
        while len(out) < size:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(fd, min(size - len(out), 1 << 20))
            if not chunk:
                raise EOFError
            out += chunk
        return bytes(out)

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
