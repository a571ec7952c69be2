"""PDF documents through the real tritonserver and the OpenAI front: a 3-page PDF made here,
answered per page and whole, equal to transformers on the same pages rendered by pypdfium2; a
repeated question renders and encodes nothing (metrics); bad PDFs are refused and the server stays up."""

from __future__ import annotations

import base64

import httpx
import openai
import pytest

from spyre_backend.config import InputLimits
from testkit.documents import (deeply_nested_pdf, encrypted_pdf, huge_page_pdf, many_pages_pdf, pdf_of, png,
                               render_pages, shape_pages)
from testkit.metrics import read_metrics
from testkit.streaming import grpc_stream, http_generate_stream

MODEL = "tiny-granite-vision"
PDF = pdf_of(shape_pages())
MAX_TOKENS = 16
QUESTION = "What is in the image?"


def pdf_uri(pdf: bytes) -> str:
    return "data:application/pdf;base64," + base64.b64encode(pdf).decode()


def file_part(pdf: bytes, **options) -> dict:
    return {"type": "file", "file": {"file_data": pdf_uri(pdf), "filename": "shapes.pdf", **options}}


def expected(reference, pages: list[int] | None, dpi: int = InputLimits.document_dpi, question: str = QUESTION):
    images = [png(page) for page in render_pages(PDF, dpi, pages)]
    return reference.generate(reference.chat_prompt(question, len(images)), images, MAX_TOKENS)


def counters(server) -> dict:
    m = read_metrics(server.metrics_url)
    return {"rendered": m.get("spyre_document_pages_rendered_total", 0.0),
            "processed": m.get('spyre_processed_image_cache{result="hit"}', 0.0),
            "encoded": m.get('spyre_encoder_cache{result="miss"}', 0.0),
            "encoder_hits": m.get('spyre_encoder_cache{result="hit"}', 0.0)}


@pytest.mark.parametrize("pages", ["1", "2", "3", None])
def test_grpc_pages_and_whole_document_equal_transformers(server, reference, pages):
    request = {"text_input": QUESTION, "document": [PDF], "apply_chat_template": True, "max_tokens": MAX_TOKENS,
               "exclude_input_in_output": True}
    if pages is not None:
        request["mm_processor_kwargs"] = f'{{"pages": "{pages}"}}'
    got = grpc_stream(server.grpc_url, request)
    want = expected(reference, None if pages is None else [int(pages) - 1])
    assert "error" not in got, got["error"]
    assert (got["text"], got["num_input_tokens"], got["num_output_tokens"]) == \
        (want["text"], want["num_input_tokens"], want["num_output_tokens"])


def test_http_generate_stream_takes_a_document_as_base64(server, reference):
    got = http_generate_stream(server.http_url, {
        "text_input": QUESTION, "document": [base64.b64encode(PDF).decode()], "apply_chat_template": True,
        "mm_processor_kwargs": '{"pages": "3"}', "max_tokens": MAX_TOKENS, "stream": True})
    want = expected(reference, [2])
    assert "error" not in got, got["error"]
    assert (got["text"], got["num_input_tokens"]) == (want["text"], want["num_input_tokens"])


def test_a_second_question_renders_and_encodes_nothing(server, reference):
    pdf = pdf_of(shape_pages(size=(180, 140)))  # a document no other test sent
    request = {"text_input": QUESTION, "document": [pdf], "apply_chat_template": True, "max_tokens": MAX_TOKENS,
               "exclude_input_in_output": True, "mm_processor_kwargs": '{"dpi": 72}'}
    before = counters(server)
    first = grpc_stream(server.grpc_url, request)
    after_first = counters(server)
    assert after_first["rendered"] - before["rendered"] == 3
    assert after_first["encoded"] - before["encoded"] == 3
    again = grpc_stream(server.grpc_url, dict(request, text_input="What shape is it?"))
    after_again = counters(server)
    assert after_again["rendered"] == after_first["rendered"]  # no page rendered
    assert after_again["encoded"] == after_first["encoded"]  # no page encoded
    assert after_again["encoder_hits"] - after_first["encoder_hits"] == 3
    assert after_again["processed"] - after_first["processed"] == 3  # the pages' crops, from preprocess's cache
    assert again["num_cached_tokens"] > 0  # and the pages' KV came from the prefix cache
    images = [png(p) for p in render_pages(pdf, 72)]
    for got, question in ((first, QUESTION), (again, "What shape is it?")):
        want = reference.generate(reference.chat_prompt(question, 3), images, MAX_TOKENS)
        assert (got["text"], got["num_input_tokens"]) == (want["text"], want["num_input_tokens"])


@pytest.mark.parametrize("name, pdf, options, message", [
    ("encrypted", encrypted_pdf(), None, "encrypted"),
    ("huge page", huge_page_pdf(), None, "max_image_pixels="),
    ("not a pdf", b"%PDF-1.7\nthis is no PDF", None, "not a valid PDF"),
    ("over the page limit", many_pages_pdf(InputLimits.max_document_pages + 1), None, "max_document_pages="),
    ("page outside", PDF, '{"pages": "2-4"}', "outside the document's pages 1-3"),
    ("dpi over the limit", PDF, '{"dpi": 100000}', "max_document_dpi="),
])
def test_grpc_bad_documents_get_an_error_naming_the_limit(server, name, pdf, options, message):
    request = {"text_input": QUESTION, "document": [pdf], "apply_chat_template": True, "max_tokens": 4}
    if options:
        request["mm_processor_kwargs"] = options
    got = grpc_stream(server.grpc_url, request)
    assert message in got.get("error", ""), got
    ok = grpc_stream(server.grpc_url, {"text_input": "Say hello.", "apply_chat_template": True, "max_tokens": 4})
    assert "error" not in ok  # the server stays up


def test_a_deeply_nested_pdf_is_answered_or_refused(server):
    got = grpc_stream(server.grpc_url, {"text_input": QUESTION, "document": [deeply_nested_pdf()],
                                        "apply_chat_template": True, "max_tokens": 4})
    assert "error" not in got or "document 0" in got["error"], got
    assert "error" not in grpc_stream(server.grpc_url, {"text_input": "Say hello.", "max_tokens": 2})


@pytest.fixture(scope="module")
def client(openai_front) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{openai_front.url}/v1", api_key="unused", max_retries=0, timeout=300)


def test_openai_file_part_equals_transformers(client, reference):
    """The file part stands where it is: the second page, then the question (the pages of the
    template's image entries)."""
    messages = [{"role": "user", "content": [file_part(PDF, pages="2"), {"type": "text", "text": QUESTION}]}]
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=MAX_TOKENS)
    want = expected(reference, [1])
    assert r.choices[0].message.content == want["text"]
    assert r.usage.prompt_tokens == want["num_input_tokens"]

    whole = [{"role": "user", "content": [file_part(PDF), {"type": "text", "text": QUESTION}]}]
    r = client.chat.completions.create(model=MODEL, messages=whole, temperature=0, max_tokens=MAX_TOKENS,
                                       extra_body={"mm_processor_kwargs": {"dpi": 72}})
    want = expected(reference, None, dpi=72)
    assert r.choices[0].message.content == want["text"]
    assert r.usage.prompt_tokens == want["num_input_tokens"]


@pytest.mark.parametrize("part, message, param", [
    (file_part(encrypted_pdf()), "encrypted", None),
    (file_part(PDF, pages="9"), "outside the document's pages 1-3", None),
    (file_part(many_pages_pdf(InputLimits.max_document_pages + 1)), "max_document_pages=", None),
    ({"type": "file", "file": {"file_id": "file-abc"}}, "file_id", "messages[0].content[0].file.file_id"),
    ({"type": "file", "file": {"file_data": "data:image/png;base64,AAAA"}}, "only PDFs", None),
    (file_part(PDF, dpi=0), "dpi must be a positive integer", "mm_processor_kwargs"),
])
def test_openai_bad_documents_are_400s(openai_front, part, message, param):
    body = {"model": MODEL, "max_tokens": 4,
            "messages": [{"role": "user", "content": [part, {"type": "text", "text": QUESTION}]}]}
    r = httpx.post(f"{openai_front.url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"]
    if param:
        assert error["param"] == param
