"""Images and documents sent once: a ``uuid`` given with an item lets later requests send the uuid
alone; an unknown one is refused with ``image_not_cached`` (a 409 on the OpenAI front), and a
tenant's uuids are its own. In the preprocessor, then through the real server."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest

from spyre_backend.config import InputLimits
from spyre_backend.errors import IMAGE_NOT_CACHED, InvalidRequest
from spyre_backend.preprocess.options import MediaIds, MediaOptions
from spyre_backend.preprocess.processor import Preprocessor
from testkit.documents import pdf_of, png, render_pages, shape_pages
from testkit.images import shape_png
from testkit.streaming import grpc_stream

QUESTION = "What is in the image?"
MODEL = "tiny-granite-vision"
IMAGE = shape_png("triangle", "blue", "white", (170, 120))
PDF = pdf_of(shape_pages(size=(160, 120)))


@pytest.fixture(scope="module")
def preprocessor(checkpoint):
    pre = Preprocessor(str(checkpoint), InputLimits(max_prompt_tokens=4096))
    yield pre
    pre.documents.close()


def same(a, b) -> bool:
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("input_ids", "pixel_values", "image_sizes"))


def test_an_image_sent_once_is_used_by_its_uuid(preprocessor):
    first = preprocessor(QUESTION, [IMAGE], apply_chat_template=True, ids=MediaIds(image_uuids=("img-1",)))
    again = preprocessor(QUESTION, [b""], apply_chat_template=True, ids=MediaIds(image_uuids=("img-1",)))
    assert same(first, again)
    with pytest.raises(InvalidRequest, match=f"^{IMAGE_NOT_CACHED}: image 0 .*'img-2'"):
        preprocessor(QUESTION, [b""], apply_chat_template=True, ids=MediaIds(image_uuids=("img-2",)))
    with pytest.raises(InvalidRequest, match=IMAGE_NOT_CACHED):  # another tenant's uuid is not its own
        preprocessor(QUESTION, [b""], apply_chat_template=True, ids=MediaIds(("img-1",), cache_salt="other"))
    with pytest.raises(InvalidRequest, match=IMAGE_NOT_CACHED):  # nor is it kept at another budget
        preprocessor(QUESTION, [b""], apply_chat_template=True, ids=MediaIds(("img-1",)),
                     options=MediaOptions(max_image_side=50))
    other = shape_png("circle", "red", "blue", (90, 90))  # the name given to other content follows it
    renamed = preprocessor(QUESTION, [other], apply_chat_template=True, ids=MediaIds(image_uuids=("img-1",)))
    assert same(renamed, preprocessor(QUESTION, [b""], apply_chat_template=True, ids=MediaIds(("img-1",))))
    assert not same(renamed, first)
    with pytest.raises(InvalidRequest, match="image_uuid has 2 entries for 1 item"):
        preprocessor(QUESTION, [IMAGE], apply_chat_template=True, ids=MediaIds(("a", "b")))


def test_a_document_sent_once_is_used_by_its_uuid(preprocessor):
    ids = MediaIds(document_uuids=("doc-1",))
    first = preprocessor(QUESTION, [], apply_chat_template=True, documents=[PDF], ids=ids)
    rendered = preprocessor.documents.pages_rendered
    again = preprocessor(QUESTION, [], apply_chat_template=True, documents=[b""], ids=ids)
    assert same(first, again) and preprocessor.documents.pages_rendered == rendered
    page = preprocessor("Q", [], apply_chat_template=True, documents=[b""], ids=ids, options=MediaOptions(pages="2"))
    assert page.pixel_values.shape[0] == 1
    with pytest.raises(InvalidRequest, match=f"{IMAGE_NOT_CACHED}: document 0 .*'doc-1'"):  # pages at 72 dpi: never made
        preprocessor("Q", [], apply_chat_template=True, documents=[b""], ids=ids, options=MediaOptions(dpi=72))
    with pytest.raises(InvalidRequest, match=IMAGE_NOT_CACHED):
        preprocessor("Q", [], apply_chat_template=True, documents=[b""], ids=MediaIds(document_uuids=("doc-2",)))
    other = pdf_of(shape_pages(size=(100, 100), label=False))  # the name given to another document
    renamed = preprocessor(QUESTION, [], apply_chat_template=True, documents=[other], ids=ids)
    assert same(renamed, preprocessor(QUESTION, [], apply_chat_template=True, documents=[b""], ids=ids))
    assert not same(renamed, first)


# -- through the real server ---------------------------------------------------------------------

def test_grpc_uuid_round_trip_and_refusal(server, reference):
    image = shape_png("circle", "green", "black", (110, 150))
    want = reference.generate(reference.chat_prompt(QUESTION, 1), [image], 12)
    base = {"text_input": QUESTION, "apply_chat_template": True, "max_tokens": 12, "exclude_input_in_output": True}
    for sent in (image, b""):  # with the image, then its uuid alone
        got = grpc_stream(server.grpc_url, dict(base, image=[sent], image_uuid=["grpc-img"]))
        assert (got.get("text"), got.get("num_input_tokens")) == (want["text"], want["num_input_tokens"]), got
    got = grpc_stream(server.grpc_url, dict(base, image=[b""], image_uuid=["grpc-unknown"]))
    assert f"{IMAGE_NOT_CACHED}: image 0" in got["error"] and "grpc-unknown" in got["error"]


@pytest.fixture(scope="module")
def client(openai_front) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{openai_front.url}/v1", api_key="unused", max_retries=0, timeout=300)


def test_openai_images_and_documents_sent_once(client, openai_front, reference):
    image = shape_png("square", "red", "white", (120, 160))
    uri = "data:image/png;base64," + base64.b64encode(image).decode()
    pdf_uri = "data:application/pdf;base64," + base64.b64encode(PDF).decode()

    def ask(*parts, question=QUESTION):
        r = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=12, messages=[
            {"role": "user", "content": [*parts, {"type": "text", "text": question}]}])
        return r.choices[0].message.content, r.usage.prompt_tokens

    want = reference.generate(reference.chat_prompt(QUESTION, 1), [image], 12)
    assert ask({"type": "image_url", "image_url": {"url": uri}, "uuid": "oa-img"}) == \
        (want["text"], want["num_input_tokens"])
    assert ask({"type": "image_url", "uuid": "oa-img"}) == (want["text"], want["num_input_tokens"])

    pages = [png(p) for p in render_pages(PDF, InputLimits.document_dpi, [0])]
    want = reference.generate(reference.chat_prompt(QUESTION, 1), pages, 12)
    first = ask({"type": "file", "file": {"file_data": pdf_uri, "pages": "1"}, "uuid": "oa-doc"})
    again = ask({"type": "file", "file": {"pages": "1"}, "uuid": "oa-doc"})
    assert first == again == (want["text"], want["num_input_tokens"])

    for part, what in (({"type": "image_url", "uuid": "oa-never"}, "image 0"),
                       ({"type": "file", "uuid": "oa-never-doc"}, "document 0")):
        r = httpx.post(f"{openai_front.url}/v1/chat/completions", timeout=60, json={
            "model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": [part]}]})
        assert r.status_code == 409, r.text
        error = r.json()["error"]
        assert error["code"] == IMAGE_NOT_CACHED and what in error["message"] and part["uuid"] in error["message"]


def test_grpc_a_session_turn_may_name_its_image_by_uuid(server):
    """A later turn of a session sends an image by its uuid alone: answered as the same turn that
    sends the image itself."""
    image = shape_png("triangle", "yellow", "blue", (140, 100))
    first = {"text_input": QUESTION, "apply_chat_template": True, "max_tokens": 8, "exclude_input_in_output": True}
    turn_2 = {"text_input": "\n<|user|>\n<image>\nWhat shape is it?\n<|assistant|>\n", "max_tokens": 8,
              "exclude_input_in_output": True}
    answers = []
    for sequence_id, image_input in ((880_001, image), (880_002, b"")):
        got = grpc_stream(server.grpc_url, first, sequence_id=sequence_id, sequence_start=True)
        assert "error" not in got, got
        got = grpc_stream(server.grpc_url, dict(turn_2, image=[image_input], image_uuid=["session-img"]),
                          sequence_id=sequence_id, sequence_end=True)
        assert "error" not in got, got
        answers.append((got["text"], got["num_input_tokens"]))
    assert answers[0] == answers[1]
