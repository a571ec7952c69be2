"""Unit tests of spyre_backend pieces that need no server and no model."""

from __future__ import annotations

import base64
import time

import pytest
import torch

from spyre_backend.config import ConfigError, ServingConfig
from spyre_backend.engine.detokenizer import IncrementalDetokenizer
from spyre_backend.engine.kv_cache_manager import BlockPool, KVCacheManager, OutOfBlocks
from spyre_backend.engine.sampling_params import InvalidRequest, SamplingParams
from spyre_backend.models import ImageFeatureMismatch, merge_image_features
from spyre_backend.preprocess.images import decode_image, image_bytes
from testkit.images import shape_png


class ByteTokenizer:
    """Each token is one UTF-8 byte: the hardest case for incremental decoding."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_detokenizer_never_splits_a_utf8_character():
    text = "héllo, 世界 🙂!"
    detok = IncrementalDetokenizer(ByteTokenizer())
    deltas = [detok.add(b) for b in text.encode("utf-8")]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas  # some bytes completed no character yet


def test_detokenizer_flush_releases_an_incomplete_tail():
    detok = IncrementalDetokenizer(ByteTokenizer())
    assert detok.add("é".encode()[0]) == ""
    assert detok.flush() == "\ufffd"


def test_sampling_params_defaults_and_overrides():
    p = SamplingParams.from_request('{"temperature": 0.5, "top_p": 0.9, "stop": "x"}', default_max_tokens=7)
    assert (p.max_tokens, p.temperature, p.top_p, p.stop) == (7, 0.5, 0.9, ["x"])
    assert SamplingParams.from_request('{"max_tokens": 3}', default_max_tokens=7).max_tokens == 3
    assert SamplingParams.from_request('{"max_tokens": 3}', max_tokens=5).max_tokens == 5


@pytest.mark.parametrize("text,message", [
    ("{", "not valid JSON"), ('"x"', "JSON object"), ('{"n": 2}', "unsupported"),
    ('{"max_tokens": -1}', "max_tokens"), ('{"top_p": 0}', "top_p"), ('{"top_k": -3}', "top_k"),
    ('{"seed": -1}', "seed"), ('{"temperature": "hot"}', "temperature"), ('{"stop": [1]}', "stop"),
])
def test_sampling_params_rejects_bad_values(text, message):
    with pytest.raises(InvalidRequest, match=message):
        SamplingParams.from_request(text)


def test_block_pool_reserves_the_padding_block():
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    assert 0 not in blocks and pool.num_free == 0
    with pytest.raises(OutOfBlocks):
        pool.allocate(1)
    pool.release(blocks)
    assert pool.num_free == 3


def test_kv_manager_grows_block_lists_by_whole_blocks():
    kv = KVCacheManager(num_blocks=5, block_size=4)
    assert kv.allocate("a", 5)
    assert len(kv.block_ids("a")) == 2 and kv.num_free == 2
    assert kv.free("a") == 2
    assert kv.block_ids("a") == [] and kv.num_free == 4


def test_merge_writes_features_into_every_row():
    ids = torch.tensor([[1, 9, 9, 2], [9, 3, 4, 9]])
    embeds = torch.zeros(2, 4, 3)
    features = torch.arange(12, dtype=torch.float32).view(2, 2, 3)
    merged = merge_image_features(ids, embeds, features, image_token_id=9)
    assert torch.equal(merged[0, 1:3], features[0]) and torch.equal(merged[1, [0, 3]], features[1])
    assert torch.equal(merged[0, 0], torch.zeros(3))


def test_merge_refuses_a_count_mismatch():
    with pytest.raises(ImageFeatureMismatch, match="3 image placeholder"):
        merge_image_features(torch.tensor([[9, 9, 9]]), torch.zeros(1, 3, 2), torch.zeros(1, 2, 2), 9)


def test_images_accept_raw_base64_and_data_uri():
    png = shape_png(size=(30, 20))
    b64 = base64.b64encode(png)
    assert image_bytes(png, 0) == png
    assert image_bytes(b64, 0) == png
    assert image_bytes(b"data:image/png;base64," + b64, 0) == png
    assert decode_image(b64).size == (30, 20)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P"])
def test_images_of_any_mode_become_rgb(mode):
    assert decode_image(shape_png(size=(10, 10), mode=mode)).mode == "RGB"


def test_config_errors_name_the_parameter():
    with pytest.raises(ConfigError, match="'max_context'"):
        ServingConfig.from_strings({"max_context": "100"})
    with pytest.raises(ConfigError, match="'max_running'"):
        ServingConfig.from_strings({"max_running": "lots"})
    assert ServingConfig.from_strings({"decode_batch_sizes": "1 4 16"}).cache.decode_batch_sizes == [1, 4, 16]
    with pytest.raises(ConfigError, match="'decode_batch_sizes'.*max_running"):  # checked across sections
        ServingConfig.from_strings({"decode_batch_sizes": "1 2", "max_running": "4"})


def test_config_sections_take_flat_parameter_names(monkeypatch):
    from spyre_backend.config import EngineLimits, SchedulerConfig

    raw = {"max_running": "4", "block_size": "32", "max_context": "256", "session_ttl_s": "5", "device": "cpu",
           "max_images": "2", "encoder_cache_mb": "0", "stream_interval_ms": "0", "decode_batch_sizes": "4",
           "some_other_models_key": "x"}
    config = ServingConfig.from_strings(raw)
    assert (config.scheduler.max_running, config.cache.block_size, config.engine.session_ttl_s, config.device.device,
            config.inputs.max_images, config.vision.encoder_cache_mb, config.stream_interval_ms) == (4, 32, 5, "cpu", 2, 0, 0)
    assert config.scheduler.prefill_chunk == SchedulerConfig().prefill_chunk  # untouched: the section's own default
    assert ServingConfig().engine == EngineLimits()
    assert config.input_limits().max_prompt_tokens == 256  # 0 means max_context
    monkeypatch.setenv("SPYRE_MAX_RUNNING", "2")  # environment overrides reach sections too
    assert ServingConfig.from_model_config({"parameters": {"max_running": {"string_value": "8"}}}).scheduler.max_running == 2


def test_stop_side_channel_carries_the_engine_answer_back(tmp_path):
    from spyre_backend.serving.control import StopListener, request_stop, send_stop

    calls = []

    def on_stop(sequence_id, end, reply):
        calls.append((sequence_id, end))
        reply(None if sequence_id == 7 else f"sequence {sequence_id} has no open session")

    path = tmp_path / "llm.sock"
    listener = StopListener(on_stop, path=path)
    try:
        assert request_stop(7, end=False, path=path) is None
        assert request_stop(8, end=True, path=path) == "sequence 8 has no open session"
        assert send_stop(9, path=path)  # fire and forget: no reply expected, none sent
        assert request_stop(7, end=True, path=path) is None
        assert calls == [(7, False), (8, True), (9, True), (7, True)]
    finally:
        listener.close()
    assert request_stop(7, end=True, path=path) == "granite_llm is not running"
    assert not send_stop(7, path=path)


def test_outbox_merges_a_streams_outputs_while_the_sender_is_busy():
    import threading

    from spyre_backend.engine.request import FinishReason, RequestOutput
    from spyre_backend.serving.outbox import Outbox

    gate, delivered = threading.Event(), []

    def deliver(text, out):
        gate.wait(10)
        delivered.append((text, out.num_output_tokens, out.finished, out.logprobs))

    outbox = Outbox()
    send = outbox.stream(deliver)
    send("a", RequestOutput("a", False, 5, 1, logprobs=[{"t": 1}]))  # taken by the sender at once
    while outbox._pending:
        pass
    send("b", RequestOutput("b", False, 5, 2, logprobs=[{"t": 2}]))  # these two wait and merge
    send("c", RequestOutput("c", True, 5, 3, FinishReason.LENGTH, logprobs=[{"t": 3}]))
    gate.set()
    outbox.close()
    assert delivered == [("a", 1, False, [{"t": 1}]), ("bc", 3, True, [{"t": 2}, {"t": 3}])]


def test_outbox_min_gap_holds_and_merges_a_streams_responses_but_never_its_first_or_final():
    import time

    from spyre_backend.engine.request import FinishReason, RequestOutput
    from spyre_backend.serving.outbox import Outbox

    delivered = []
    outbox = Outbox(min_gap_s=0.3)
    send = outbox.stream(lambda text, out: delivered.append((time.monotonic(), text, out.finished)))
    started = time.monotonic()
    send("a", RequestOutput("a", False, 5, 1))  # the first response goes at once
    time.sleep(0.05)
    send("b", RequestOutput("b", False, 5, 2))  # held: within the gap
    send("c", RequestOutput("c", False, 5, 3))
    time.sleep(0.6)
    send("d", RequestOutput("d", False, 5, 4))  # held again, then overtaken by the final one
    send("e", RequestOutput("e", True, 5, 5, FinishReason.LENGTH))
    outbox.close()
    assert [(text, finished) for _, text, finished in delivered] == [("a", False), ("bc", False), ("de", True)]
    first, merged, final = (at - started for at, _, _ in delivered)
    assert first < 0.1
    assert 0.28 < merged < 0.45  # one gap after the first response, not when "b" arrived
    assert final < 0.75  # the final response did not wait for another gap


def test_deferred_release_keeps_an_object_alive_until_its_delay_has_passed():
    import time
    import weakref

    from spyre_backend.serving.deferred_release import DeferredRelease

    class Stream:
        pass

    release = DeferredRelease(delay_s=3600)
    try:
        stream = Stream()
        alive = weakref.ref(stream)
        release.later(stream)
        del stream
        assert alive() is not None and len(release) == 1
        assert release.release_due(now=time.monotonic()) == 0 and alive() is not None
        assert release.release_due(now=time.monotonic() + 3601) == 1
        assert alive() is None and len(release) == 0
    finally:
        release.close()


def test_cancellation_is_polled_at_most_once_per_interval():
    from spyre_backend.serving.control import polled_every

    calls = []
    poll = polled_every(lambda: calls.append(1) or True, interval_s=0.05)
    assert [poll() for _ in range(5)] == [False] * 5  # not at once: the request just arrived
    assert calls == []
    time.sleep(0.06)
    assert poll() is True  # one interval later the check goes through
    assert [poll() for _ in range(5)] == [False] * 5  # later ones wait for the next interval
    assert len(calls) == 1


def test_greedy_rows_with_banned_tokens_pick_the_best_allowed_token():
    from spyre_backend.engine.sampler import SampleRow, sample

    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    logits[1, 7] = logits[3, 7] = 100.0  # the banned token would win these rows
    greedy = SamplingParams(max_tokens=4)
    banned = [[], [7], [], [7, 9], [int(logits[4].argmax())]]
    rows = [SampleRow(greedy, None, torch.zeros(1, dtype=torch.long), [], b) for b in banned]
    got = [s.token for s in sample(logits.clone(), rows)]
    expected = []
    for row, ban in zip(logits, banned):
        allowed = row.clone()
        allowed[ban] = float("-inf")
        expected.append(int(allowed.argmax()))
    assert got == expected
    assert got[1] != 7 and got[3] not in (7, 9) and got[0] == int(logits[0].argmax())
