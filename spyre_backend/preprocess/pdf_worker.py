"""The child process that renders PDF pages with pypdfium2, under a memory cap (``python -m
spyre_backend.preprocess.pdf_worker MEMORY_MB``); ``documents.PageRenderer`` starts it, kills it
past its time budget and starts another.

A PDF is untrusted input parsed by a C library: a bomb (a page thousands of metres wide, objects
nested thousands deep, a content stream that never ends) must cost a bounded time and memory and
never take the server down. Here it costs at most this process. Jobs and answers are pickles
framed by their length on stdin and stdout; stdout itself is moved aside so that nothing the
library prints can corrupt the answers.
"""

from __future__ import annotations

import math
import os
import pickle
import resource
import struct
import sys

from spyre_backend.errors import InvalidRequest
from spyre_backend.preprocess.documents import select_pages

_HEADER = struct.Struct("<Q")


def render(job: dict) -> dict:
    """One document's selected pages that are not in ``job["skip"]``, as RGB bytes (see PageRenderer)."""
    import pypdfium2 as pdfium
    import pypdfium2.raw as raw

    index = job["index"]
    try:
        pdf = pdfium.PdfDocument(job["data"])
    except pdfium.PdfiumError as exc:
        if exc.err_code in (raw.FPDF_ERR_PASSWORD, raw.FPDF_ERR_SECURITY):
            raise InvalidRequest(f"document {index} is encrypted (password-protected PDFs are not accepted)") from None
        raise InvalidRequest(f"document {index} is not a valid PDF: {exc}") from None
    try:
        count = len(pdf)
        pages = select_pages(job["pages"], count, job["max_pages"], index)
        scale = job["dpi"] / 72.0  # PDF sizes are in points, 72 to the inch
        rendered = {}
        for number in pages:
            if number in job["skip"]:
                continue
            page = pdf[number]
            width_pt, height_pt = page.get_size()
            width, height = math.ceil(width_pt * scale), math.ceil(height_pt * scale)
            if width * height > job["max_pixels"]:  # checked before a single pixel is allocated
                raise InvalidRequest(
                    f"document {index} page {number + 1} is {width_pt:.0f}x{height_pt:.0f} pt, {width}x{height} = "
                    f"{width * height} pixels at {job['dpi']} dpi, over the limit max_image_pixels={job['max_pixels']}")
            image = page.render(scale=scale, rev_byteorder=True, may_draw_forms=False).to_pil().convert("RGB")
            rendered[number] = (image.size, image.tobytes())
            page.close()
        return {"count": count, "pages": pages, "rendered": rendered}
    finally:
        pdf.close()


def _read(stream, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise EOFError
    return data


def main(argv: list[str]) -> int:
    import pypdfium2  # noqa: F401  loaded before the first job: a started renderer is a warm one

    memory = int(argv[0]) * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever the library prints goes to stderr, not into an answer
    jobs = sys.stdin.buffer
    while True:
        try:
            (size,) = _HEADER.unpack(_read(jobs, _HEADER.size))
            job = pickle.loads(_read(jobs, size))
        except EOFError:  # the parent closed our stdin: done
            return 0
        try:
            answer = render(job)
        except InvalidRequest as exc:
            answer = {"error": str(exc)}
        except MemoryError:
            answer = {"error": f"document {job['index']} needs more memory than the renderer's limit "
                               f"document_render_memory_mb={argv[0]}"}
        except Exception as exc:  # the library's failures on a hostile file are the file's fault
            answer = {"error": f"document {job['index']} could not be rendered: {type(exc).__name__}: {exc}"}
        payload = pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
        answers.write(_HEADER.pack(len(payload)) + payload)
        answers.flush()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
