"""PDF documents without Triton: page selection, the bounded renderer, and the preprocessor's
pages equal to the HF processor given the same pages rendered by pypdfium2."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from spyre_backend.config import InputLimits
from spyre_backend.errors import InvalidRequest
from spyre_backend.preprocess.documents import PageRenderer, document_bytes, select_pages
from spyre_backend.preprocess.options import MediaOptions
from spyre_backend.preprocess.processor import Preprocessor
from testkit.documents import (deeply_nested_pdf, encrypted_pdf, huge_page_pdf, many_pages_pdf, pdf_of,
                               render_pages, shape_pages)

PDF = pdf_of(shape_pages())
QUESTION = "What is in the image?"


def test_page_selection():
    assert select_pages(None, 3, 8, 0) == [0, 1, 2]
    assert select_pages("1-2,3", 3, 8, 0) == [0, 1, 2]
    assert select_pages("3,1", 3, 8, 0) == [0, 2]  # in document order, once each
    assert select_pages(" 2 - 3 ", 3, 8, 0) == [1, 2]
    for spec, limit in (("0", "1-3"), ("4", "1-3"), ("2-1", "1-3")):
        with pytest.raises(InvalidRequest, match=f"outside the document's pages {limit}"):
            select_pages(spec, 3, 8, 0)
    with pytest.raises(InvalidRequest, match="not a list of pages"):
        select_pages("one", 3, 8, 0)
    with pytest.raises(InvalidRequest, match="max_document_pages=2"):
        select_pages(None, 3, 2, 0)
    with pytest.raises(InvalidRequest, match="selects 3 pages, over the limit max_document_pages=2"):
        select_pages("1-3", 3, 2, 0)


def test_document_bytes_forms_and_limits():
    b64 = base64.b64encode(PDF)
    assert document_bytes(PDF, 0, 2**20) == PDF
    assert document_bytes(b64, 0, 2**20) == PDF
    assert document_bytes(b"data:application/pdf;base64," + b64, 0, 2**20) == PDF
    with pytest.raises(InvalidRequest, match=f"over the limit max_document_bytes={len(PDF) - 1}"):
        document_bytes(PDF, 0, len(PDF) - 1)
    with pytest.raises(InvalidRequest, match="not a PDF"):
        document_bytes(base64.b64encode(b"GIF89a not a pdf"), 0, 2**20)
    with pytest.raises(InvalidRequest, match="neither a PDF nor valid base64"):
        document_bytes(b"%PD?", 0, 2**20)


def test_options_are_checked():
    assert MediaOptions.from_json('{"pages": ["1", null], "dpi": 72}').for_document(1, 2, 96, 300) == (None, 72)
    with pytest.raises(InvalidRequest, match="unknown key"):
        MediaOptions.from_json('{"page": "1"}')
    with pytest.raises(InvalidRequest, match="dpi must be a positive integer"):
        MediaOptions.from_json('{"dpi": 0}')
    with pytest.raises(InvalidRequest, match="max_document_dpi=300"):
        MediaOptions.from_dict({"dpi": 600}).for_document(0, 1, 96, 300)
    with pytest.raises(InvalidRequest, match="lists 1 entries for 2 document"):
        MediaOptions.from_dict({"pages": ["1"]}).for_document(0, 2, 96, 300)


@pytest.fixture(scope="module")
def renderer():
    r = PageRenderer(timeout_s=20, memory_mb=1024)
    yield r
    r.close()


def test_renderer_pages_equal_pypdfium2(renderer):
    answer = renderer.render(PDF, 0, "1,3", 144, max_pages=8, max_pixels=2**24, skip=frozenset({2}))
    assert answer["count"] == 3 and answer["pages"] == [0, 2] and list(answer["rendered"]) == [0]
    size, rgb = answer["rendered"][0]
    want = render_pages(PDF, 144, [0])[0]
    assert size == want.size == (400, 300) and rgb == want.tobytes()


@pytest.mark.parametrize("pdf, message", [
    (encrypted_pdf(), "encrypted"),
    (huge_page_pdf(), "over the limit max_image_pixels"),
    (b"%PDF-1.4\nnothing else", "not a valid PDF"),
    (PDF[: len(PDF) // 3], "not a valid PDF"),
    (many_pages_pdf(9), "max_document_pages=8"),
])
def test_hostile_and_broken_pdfs_are_refused(renderer, pdf, message):
    """Each for what it is (none by the time limit: the message names its own), before rendering."""
    with pytest.raises(InvalidRequest, match=message):
        renderer.render(pdf, 0, None, 96, max_pages=8, max_pixels=2**24)
    assert renderer.render(PDF, 0, "1", 72, max_pages=8, max_pixels=2**24)["pages"] == [0]  # still serving


def test_deep_nesting_is_bounded(renderer):
    """pdfium's parser stops at a depth; the page either renders or is refused, never a crash."""
    try:
        answer = renderer.render(deeply_nested_pdf(), 0, None, 72, max_pages=8, max_pixels=2**24)
        assert answer["pages"] == [0]
    except InvalidRequest as exc:
        assert "document 0" in str(exc)


def test_a_render_over_its_time_is_killed_and_the_next_one_works():
    r = PageRenderer(timeout_s=0.001, memory_mb=1024)
    try:
        with pytest.raises(InvalidRequest, match="document_render_timeout_s=0.001"):
            r.render(PDF, 0, None, 300, max_pages=8, max_pixels=2**26)
        assert r._proc is None  # killed
        r.timeout_s = 20
        assert r.render(PDF, 0, None, 72, max_pages=8, max_pixels=2**24)["pages"] == [0, 1, 2]
    finally:
        r.close()


def test_a_render_over_its_memory_refuses_the_document():
    """A 10,000 x 7,500 page (300 MB of bitmap) in a renderer capped at 256 MB: refused, and the
    renderer serves the next document."""
    r = PageRenderer(timeout_s=20, memory_mb=256)
    try:
        with pytest.raises(InvalidRequest, match="document 0"):
            r.render(PDF, 0, "1", 72 * 50, max_pages=8, max_pixels=2**40)
        assert r.render(PDF, 0, "1", 72, max_pages=8, max_pixels=2**24)["pages"] == [0]
    finally:
        r.close()


@pytest.fixture(scope="module")
def preprocessor(checkpoint):
    return Preprocessor(str(checkpoint), InputLimits(max_prompt_tokens=4096))


def test_pages_equal_the_hf_processor_on_the_rendered_pages(preprocessor, reference):
    out = preprocessor(QUESTION, [], apply_chat_template=True, documents=[PDF])
    want = reference.inputs(reference.chat_prompt(QUESTION, 3),
                            [_png(page) for page in render_pages(PDF, InputLimits.document_dpi)])
    assert np.array_equal(out.input_ids, want["input_ids"][0].numpy())
    assert np.array_equal(out.pixel_values, want["pixel_values"].numpy())
    assert np.array_equal(out.image_sizes, want["image_sizes"].numpy())


def test_a_document_stands_where_its_tag_is(preprocessor, reference):
    """Raw prompt: an image, a document's second page, text between; as the same pages sent as images."""
    from testkit.images import shape_png

    image = shape_png("circle", "red", "blue", (80, 80))
    prompt = "<|user|>\n<image>\nand<document>which differ?\n<|assistant|>\n"
    out = preprocessor(prompt, [image], documents=[PDF], options=MediaOptions(pages="2", dpi=72))
    page = _png(render_pages(PDF, 72, [1])[0])
    want = reference.inputs("<|user|>\n<image>\nand<image>\nwhich differ?\n<|assistant|>\n", [image, page])
    assert np.array_equal(out.input_ids, want["input_ids"][0].numpy())
    assert np.array_equal(out.pixel_values, want["pixel_values"].numpy())


def test_a_repeated_document_renders_nothing(checkpoint):
    pre = Preprocessor(str(checkpoint), InputLimits(max_prompt_tokens=4096))
    try:
        first = pre(QUESTION, [], apply_chat_template=True, documents=[PDF])
        assert pre.documents.pages_rendered == 3
        again = pre(QUESTION, [], apply_chat_template=True, documents=[base64.b64encode(PDF)])
        assert pre.documents.pages_rendered == 3 and np.array_equal(again.pixel_values, first.pixel_values)
        pre("Q", [], apply_chat_template=True, documents=[PDF], options=MediaOptions(pages="2"))
        assert pre.documents.pages_rendered == 3  # a page already rendered at these settings
        pre("Q", [], apply_chat_template=True, documents=[PDF], options=MediaOptions(pages="2", dpi=72))
        assert pre.documents.pages_rendered == 4  # another dpi is another render
    finally:
        pre.documents.close()


def test_tags_and_documents_must_agree(preprocessor):
    with pytest.raises(InvalidRequest, match="1 <document> tag"):
        preprocessor("<document>", [], documents=[])
    with pytest.raises(InvalidRequest, match="max_images=8"):
        preprocessor(QUESTION, [], apply_chat_template=True, documents=[PDF, PDF, PDF])


def _png(image) -> bytes:
    from testkit.documents import png

    return png(image)
