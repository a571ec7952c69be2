"""The OpenAI front's reading of file parts, media uuids, media options and cache_salt, without a
server (the server tests send the same bodies through it)."""

from __future__ import annotations

import json

import pytest

from spyre_backend import DEFAULT_CHECKPOINT
from spyre_backend.openai_api.chat_template import ChatTemplate
from spyre_backend.openai_api.protocol import ApiError, cache_salt, parse_chat
from spyre_backend.preprocess.documents import DOCUMENT_TAG

TEMPLATE = ChatTemplate.from_checkpoint(DEFAULT_CHECKPOINT)
MODEL = DEFAULT_CHECKPOINT.name
PDF = "data:application/pdf;base64,JVBERi0xLjQK"
PNG = "data:image/png;base64,iVBORw0KGgo="


def chat(*parts, **body):
    return parse_chat({"model": MODEL, "messages": [{"role": "user", "content": list(parts)}], **body}, TEMPLATE, MODEL)


def test_a_file_part_stands_as_a_document_tag_where_it_is():
    gen = chat({"type": "image_url", "image_url": {"url": PNG}}, {"type": "file", "file": {"file_data": PDF}},
               {"type": "text", "text": "Compare."})
    assert f"<image>\n{DOCUMENT_TAG}Compare." in gen.prompt
    assert gen.image_urls == [PNG] and gen.media.payloads == [PDF] and gen.media_options == ""
    assert gen.media.inputs() == {"documents": [PDF.encode()]}  # no uuids: no uuid inputs


def test_part_options_and_request_options_merge_per_document():
    gen = chat({"type": "file", "file": {"file_data": PDF, "pages": "2"}}, {"type": "file", "file": {"file_data": PDF}},
               mm_processor_kwargs={"pages": "1", "dpi": 144}, media_io_kwargs={"image": {"max_image_side": 768}})
    assert json.loads(gen.media_options) == {"pages": ["2", "1"], "dpi": 144, "max_image_side": 768}
    assert json.loads(chat({"type": "text", "text": "x"}, max_image_tiles=4).media_options) == {"max_image_tiles": 4}


@pytest.mark.parametrize("body, param", [
    ({"mm_processor_kwargs": {"max_image_side": 100}, "max_image_side": 200}, "body"),
    ({"media_io_kwargs": {"video": {"num_frames": 4}}}, "media_io_kwargs"),
    ({"media_io_kwargs": {"image": {"pages": "1"}}}, "media_io_kwargs"),
    ({"mm_processor_kwargs": {"dpi": 0}}, "mm_processor_kwargs.dpi"),
    ({"mm_processor_kwargs": "dpi=72"}, "mm_processor_kwargs"),
])
def test_bad_media_options_are_400s_naming_the_parameter(body, param):
    with pytest.raises(ApiError) as err:
        chat({"type": "text", "text": "x"}, **body)
    assert err.value.status == 400 and err.value.param == param


def test_uuids_go_with_their_items_and_an_item_may_be_named_alone():
    gen = chat({"type": "image_url", "image_url": {"url": PNG}, "uuid": "a"}, {"type": "image_url", "uuid": "b"},
               {"type": "file", "uuid": "d"}, {"type": "image_url", "image_url": {"url": PNG}})
    assert gen.image_urls == [PNG, "", PNG]
    assert gen.media.inputs() == {"documents": [b""], "image_uuids": ["a", "b", ""], "document_uuids": ["d"]}
    for part in ({"type": "image_url"}, {"type": "file", "file": {}}, {"type": "image_url", "uuid": ""},
                 {"type": "file", "file": {"file_id": "file-1"}}):
        with pytest.raises(ApiError) as err:
            chat(part)
        assert err.value.status == 400


def test_cache_salt_and_user_salting():
    assert cache_salt({"cache_salt": "t"}, from_user=False) == "t"
    assert cache_salt({"user": "alice"}, from_user=False) == ""
    alice = cache_salt({"user": "alice"}, from_user=True)
    assert alice.startswith("user:") and alice != cache_salt({"user": "bob"}, from_user=True)
    assert cache_salt({"user": "alice", "cache_salt": "t"}, from_user=True) == "t"
    for bad in ("", 7, "x" * 1025):
        with pytest.raises(ApiError, match="cache_salt"):
            cache_salt({"cache_salt": bad}, from_user=False)
