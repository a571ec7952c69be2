"""Metrics on the real server's metrics port: token counters, latency histograms and the vision
encoder's cache, for one image sent twice."""

from __future__ import annotations

from testkit.images import shape_png
from testkit.metrics import read_metrics, wait_for
from testkit.streaming import grpc_stream

# an image no other test sends, so that its first request is a cache miss
IMAGE = shape_png("triangle", "orange", "black", (123, 77))
HISTOGRAMS = ("spyre_time_to_first_token_seconds", "spyre_time_per_output_token_seconds",
              "spyre_e2e_request_latency_seconds")


def snapshot(url: str) -> dict[str, float]:
    m = read_metrics(url)

    def value(name):  # a metric without labels may be written with or without "{}"
        return m.get(name, m.get(name + "{}", 0.0))

    out = {name: value(name) for name in ("spyre_prompt_tokens_total", "spyre_generation_tokens_total")}
    for name in HISTOGRAMS:
        out[name + "_count"] = value(name + "_count")
        out[name + "_sum"] = value(name + "_sum")
    for result in ("hit", "miss"):
        out[result] = m.get(f'spyre_encoder_cache{{result="{result}"}}', 0.0)
    for name in ("spyre_prefix_cache_queries_total", "spyre_prefix_cache_hits_total"):
        out[name] = value(name)
    out["cached_blocks"] = m.get('spyre_kv_blocks{state="cached"}', 0.0)
    out["cache_bytes"] = value("spyre_encoder_cache_bytes")
    return out


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


def test_repeated_image_hits_the_encoder_cache_and_metrics_add_up(server):
    url = server.metrics_url
    inputs = {"text_input": "What is in the image?", "apply_chat_template": True, "image": [IMAGE],
              "max_tokens": 12, "stream": True}
    start = snapshot(url)

    first = grpc_stream(server.grpc_url, inputs)
    assert "error" not in first, first
    expected_first = {"miss": 1, "hit": 0, "spyre_time_to_first_token_seconds_count": 1,
                      "spyre_e2e_request_latency_seconds_count": 1}
    mid = wait_for(lambda: (s := snapshot(url)) and all(delta(s, start)[k] == v for k, v in expected_first.items()) and s)
    assert mid, delta(snapshot(url), start)
    assert mid["cache_bytes"] > 0

    second = grpc_stream(server.grpc_url, inputs)
    assert "error" not in second, second
    assert second["text"] == first["text"] and second["num_output_tokens"] == first["num_output_tokens"]
    # and the prefix cache: every full 16-token segment of the prompt before its last token came
    # from the first request (the server runs on the CPU: Spyre's unit would be the 64-token block)
    n = second["num_input_tokens"]
    assert first["num_cached_tokens"] < second["num_cached_tokens"] == (n - 1) // 16 * 16 > 0

    n_in = first["num_input_tokens"] + second["num_input_tokens"]
    n_out = first["num_output_tokens"] + second["num_output_tokens"]
    expected = {"miss": 1, "hit": 1, "spyre_prompt_tokens_total": n_in, "spyre_generation_tokens_total": n_out,
                "spyre_prefix_cache_hits_total": first["num_cached_tokens"] + second["num_cached_tokens"],
                "spyre_prefix_cache_queries_total": n_in, **{name + "_count": 2 for name in HISTOGRAMS}}
    end = wait_for(lambda: (s := snapshot(url)) and all(delta(s, start)[k] == v for k, v in expected.items()) and s)
    assert end, (delta(snapshot(url), start), expected)
    grown = delta(end, start)
    assert end["cached_blocks"] >= second["num_cached_tokens"] // 64
    # seconds, not milliseconds: each request took well under a minute and more than nothing
    assert 0 < grown["spyre_time_to_first_token_seconds_sum"] <= grown["spyre_e2e_request_latency_seconds_sum"] < 120
    assert 0 < grown["spyre_time_per_output_token_seconds_sum"] < 10
