"""int8 weight-only (``quantization: int8``) against the exact path: quality and decode speed.

    python -m tools.int8_quality [--checkpoint DIR] [--variants float32:int8 bfloat16:none bfloat16:int8]
        [--compile-backend eager] [--speed-checkpoint DIR --speed-dtype float32 ...] [--out DIR]

Quality, on ``--checkpoint`` (the trained tiny one by default): the prompts of the end-to-end
tests, each served by an LLMService built as granite_llm builds its own, once exact in fp32 (the
reference) and once per variant (dtype:quantization), greedy, with the same image features (the
vision tower is never quantized). For each prompt: do the answers' tokens match the reference's,
where do they first differ, and the KL divergence KL(reference || variant) of the first step's
next-token distribution. The engine returns at most MAX_LOGPROBS alternatives a token, so the KL
is taken over the tokens both top lists hold plus one bucket for the rest of the vocabulary: a
lower bound of the full KL, equal to it as the rest's mass (printed as ``rest``) goes to 0.

Speed, on each ``--speed-checkpoint`` and ``--speed-dtype``: one decode step at batch 1 and 4 at
position 512 (``engine.probe.time_decode``, best of 10), exact and int8 one after the other in the
same process. Prints markdown tables; writes them as JSON under ``--out`` (results/int8).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from spyre_backend import DEFAULT_CHECKPOINT, PROJECT_ROOT
from spyre_backend.config import DeviceConfig, ServingConfig
from spyre_backend.device import plan_for, process
from spyre_backend.engine.probe import best_time
from spyre_backend.engine.sampling_params import MAX_LOGPROBS
from spyre_backend.preprocess.processor import Preprocessor
from spyre_backend.serving.llm_service import GenerateInputs, LLMService
from spyre_backend.vision.encoder import VisionEncoder
from testkit.images import shape_png

MAX_TOKENS = 24  # as the end-to-end tests
REFERENCE = ("float32", "none")  # dtype, quantization: the exact path

# The end-to-end tests' prompts (tests/test_end_to_end.py and tests/test_engine.py CASES), by name:
# question, then each image as shape_png's arguments.
PROMPTS = {
    "text_only": ("Say hello.", []),
    "text_only_capital": ("What is the capital of France?", []),
    "square_56": ("What is in the image?", [dict(shape="circle", color="red", background="blue", size=(56, 56))]),
    "landscape_200x150": ("What is in the image?", [dict(shape="triangle", color="green", background="white",
                                                         size=(200, 150))]),
    "portrait_90x160": ("What shape is it?", [dict(shape="square", color="yellow", background="black", size=(90, 160))]),
    "portrait_60x200": ("What shape is it?", [dict(shape="square", color="yellow", background="black", size=(60, 200))]),
    "tiny_1x1": ("What is in the image?", [dict(shape="circle", color="red", background="blue", size=(1, 1))]),
    "very_wide_400x20": ("What color is the background?", [dict(shape="square", color="blue", background="white",
                                                                size=(400, 20))]),
    "wide_300x40": ("What color is the background?", [dict(shape="circle", color="red", background="blue",
                                                           size=(300, 40))]),
    "large_300x300": ("What color is the shape?", [dict(shape="circle", color="purple", background="yellow",
                                                        size=(300, 300))]),
    "rgba_png": ("What is in the image?", [dict(shape="square", color="red", background="green", size=(120, 80),
                                                mode="RGBA")]),
    "grayscale_png": ("What is in the image?", [dict(shape="triangle", color="white", background="black",
                                                     size=(100, 100), mode="L")]),
    "palette_png": ("What is in the image?", [dict(shape="circle", color="orange", background="blue", size=(150, 100),
                                                   mode="P")]),
    "jpeg": ("What is in the image?", [dict(shape="square", color="green", background="red", size=(160, 120),
                                            fmt="JPEG")]),
    "two_images": ("What is in the second image?", [dict(shape="circle", color="red", background="blue", size=(80, 80)),
                                                    dict(shape="triangle", color="green", background="white",
                                                         size=(120, 90))]),
    "two_images_default_size": ("What is in the second image?", [dict(shape="circle", color="red", background="blue"),
                                                                 dict(shape="square", color="blue", background="white")]),
}


def service(checkpoint: str, quantization: str, dtype: str, backend: str, warmup: bool = True) -> LLMService:
    raw = {"checkpoint": checkpoint, "quantization": quantization, "dtype": dtype, "compile_backend": backend,
           "max_context": "1024", "max_running": "4", "decode_batch_sizes": "1 2 4"}
    return LLMService(ServingConfig.from_strings(raw), warmup=warmup)


def answer(llm: LLMService, ids: np.ndarray, features: np.ndarray | None) -> dict:
    """Greedy, MAX_TOKENS: the answer's token ids and text, and the first step's top logprobs."""
    done: list = []
    params = json.dumps({"temperature": 0.0, "logprobs": MAX_LOGPROBS})
    llm.submit(GenerateInputs(ids, features, max_tokens=MAX_TOKENS, sampling_parameters=params,
                              exclude_input_in_output=True), lambda text, out: done.append((text, out)))
    deadline = time.monotonic() + 120
    while not done and time.monotonic() < deadline:
        time.sleep(0.01)
    text, out = done[0]
    first = out.logprobs[0]
    return {"tokens": [lp["token_id"] for lp in out.logprobs], "text": text,
            "first": {t["token_id"]: t["logprob"] for t in first["top"]}}


def first_step_kl(exact: dict[int, float], other: dict[int, float]) -> tuple[float, float]:
    """KL(exact || other) over the tokens both top lists hold and one bucket for the rest; and the
    larger of the two rests' mass."""
    both = exact.keys() & other.keys()
    kl = sum(math.exp(exact[t]) * (exact[t] - other[t]) for t in both)
    rest_p = max(0.0, 1 - sum(math.exp(exact[t]) for t in both))
    rest_q = max(0.0, 1 - sum(math.exp(other[t]) for t in both))
    if rest_p > 0:
        kl += rest_p * math.log(rest_p / max(rest_q, 1e-30))
    return kl, max(rest_p, rest_q)


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def prompt_inputs(checkpoint: str, names: list[str]) -> dict[str, tuple]:
    """Each prompt's token ids and image features, as the preprocess and vision models send them."""
    pre, encoder = Preprocessor(checkpoint), VisionEncoder(checkpoint)
    inputs = {}
    for name in names:
        question, specs = PROMPTS[name]
        p = pre(question, [shape_png(**s) for s in specs], apply_chat_template=True)
        features = encoder.encode(torch.from_numpy(p.pixel_values), torch.from_numpy(p.image_sizes))
        inputs[name] = (p.input_ids, features.float().numpy() if features.numel() else None)
    return inputs


def quality(checkpoint: str, variants: list[tuple[str, str]], backend: str,
            names: list[str] = tuple(PROMPTS)) -> dict[str, list[dict]]:
    """Each variant (dtype, quantization) against the exact fp32 reference, prompt by prompt (``names``)."""
    inputs = prompt_inputs(checkpoint, list(names))
    answers = {}
    for dtype, quantization in [REFERENCE, *variants]:
        llm = service(checkpoint, quantization, dtype, backend)
        answers[dtype, quantization] = {name: answer(llm, *args) for name, args in inputs.items()}
        llm.shutdown()
    reference = answers[REFERENCE]
    result = {}
    for variant in variants:
        rows = result[":".join(variant)] = []
        for name in inputs:
            exact, other = reference[name], answers[variant][name]
            kl, rest = first_step_kl(exact["first"], other["first"])
            rows.append({"prompt": name, "match": exact["tokens"] == other["tokens"],
                         "first_difference": first_difference(exact["tokens"], other["tokens"]),
                         "kl": kl, "rest": rest, "exact": exact["text"], "answer": other["text"]})
    return result


def summary(rows: list[dict]) -> dict:
    kls = [r["kl"] for r in rows]
    return {"prompts": len(rows), "same_answers": sum(r["match"] for r in rows), "mean_kl": sum(kls) / len(kls),
            "max_kl": max(kls), "max_rest": max(r["rest"] for r in rows)}


def speed(checkpoint: str, dtype: str, backend: str, batches=(1, 4), context: int = 512) -> list[dict]:
    rows = []
    for quantization in ("none", "int8"):
        llm = service(checkpoint, quantization, dtype, backend, warmup=False)
        probe = llm.engine.probe
        for batch in batches:
            rows.append({"checkpoint": Path(checkpoint).name, "dtype": str(probe.plan.dtype).removeprefix("torch."),
                         "compile_backend": probe.plan.compile_backend, "quantization": quantization,
                         "batch": batch, "context": context, "weights_mib": probe.weight_bytes / 2**20,
                         "decode_ms": 1000 * probe.time_decode(batch, context, repeats=10)})
        llm.shutdown()
    return rows


# The 2b shape's decoder linears (out, in): q/k/v fused, attention output, gate/up fused, down, LM head
LINEAR_SHAPES = [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192), (49156, 2048)]


def linear_timings(dtype: str, rows=(1, 4, 16, 512)) -> list[dict]:
    """One linear of each LINEAR_SHAPES, prepared as the plan prepares the decoder's (exact: oneDNN
    for fp32; int8), at each row count: best of a few, ms."""
    process.apply_serving_allocator()  # as a served model's process runs
    out = []
    for n, k in LINEAR_SHAPES:
        base = torch.nn.Linear(k, n, bias=False).to(getattr(torch, dtype))
        timings = {}
        for quantization in ("none", "int8"):
            layer = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False).to(base.weight.dtype))
            layer[0].weight.data.copy_(base.weight.data)
            plan_for(DeviceConfig(device="cpu", compile_backend="eager", dtype=dtype, quantization=quantization)
                     ).prepare(layer, decoder=True)
            for m in rows:
                x = torch.randn(m, k, dtype=base.weight.dtype)
                with torch.no_grad():
                    timings[quantization, m] = 1000 * best_time(lambda: layer(x), 3 if m > 16 else 20)
        out += [{"shape": f"{n}x{k}", "dtype": dtype, "rows": m, "exact_ms": timings["none", m],
                 "int8_ms": timings["int8", m]} for m in rows]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--variants", nargs="*", default=["float32:int8", "bfloat16:none", "bfloat16:int8"],
                   help="dtype:quantization pairs compared with float32:none")
    p.add_argument("--compile-backend", default="eager")
    p.add_argument("--speed-checkpoint", action="append", default=[], help="time decode steps on it (repeatable)")
    p.add_argument("--speed-dtype", action="append", default=[], help="dtypes to time (repeatable; default float32)")
    p.add_argument("--linears", action="store_true", help="time the 2b shape's linears alone in each --speed-dtype")
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "results" / "int8")
    args = p.parse_args()
    result: dict = {"checkpoint": args.checkpoint, "compile_backend": args.compile_backend}
    variants = [tuple(v.split(":")) for v in args.variants]
    if variants:
        result["quality"] = quality(args.checkpoint, variants, args.compile_backend)
        for variant, rows in result["quality"].items():
            print(f"\n{variant} against float32:none\n| prompt | same answer | first differing token | KL | rest |"
                  "\n|---|---|---|---|---|")
            for r in rows:
                print(f"| {r['prompt']} | {'yes' if r['match'] else 'no'} | {r['first_difference'] or '-'} | "
                      f"{r['kl']:.2e} | {r['rest']:.1e} |")
        result["summary"] = {variant: summary(rows) for variant, rows in result["quality"].items()}
        print("\n| variant | same answers | mean KL | max KL | max rest |\n|---|---|---|---|---|")
        for variant, s in result["summary"].items():
            print(f"| {variant} | {s['same_answers']}/{s['prompts']} | {s['mean_kl']:.2e} | {s['max_kl']:.2e} | "
                  f"{s['max_rest']:.1e} |")
    timings = result["speed"] = [row for ckpt in args.speed_checkpoint for dtype in (args.speed_dtype or ["float32"])
                                 for row in speed(ckpt, dtype, args.compile_backend)]
    if timings:
        print("\n| checkpoint | dtype | backend | quantization | batch | weights MiB | decode step ms |"
              "\n|---|---|---|---|---|---|---|")
        for r in timings:
            print(f"| {r['checkpoint']} | {r['dtype']} | {r['compile_backend']} | {r['quantization']} | {r['batch']} | "
                  f"{r['weights_mib']:.0f} | {r['decode_ms']:.2f} |")
    linears = result["linears"] = [row for dtype in (args.speed_dtype or ["float32"]) for row in linear_timings(dtype)
                                   ] if args.linears else []
    if linears:
        print("\n| linear | dtype | rows | exact ms | int8 ms |\n|---|---|---|---|---|")
        for r in linears:
            print(f"| {r['shape']} | {r['dtype']} | {r['rows']} | {r['exact_ms']:.2f} | {r['int8_ms']:.2f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"int8-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
