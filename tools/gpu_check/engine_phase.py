"""Phases ``exact`` and ``load``: the engine as the Triton models run it, in this process, without
Triton (the lent machine has no tritonserver). Each model's settings are its config.pbtxt
parameters and SPYRE_* variables (``ServingConfig.from_pbtxt``, as the server applies them), and
the services are the ones the Triton adapters wrap (LLMService, VisionService, Preprocessor), each
warmed up and sealed as there; a request goes preprocess -> vision -> LLM, as the ensemble sends it.

    python -m tools.gpu_check.engine_phase exact --checkpoint DIR --device cuda --reference ref.json --out exact.json
    python -m tools.gpu_check.engine_phase load --checkpoint DIR --device cuda --backend eager --out load.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import threading
import time
from pathlib import Path

from tools.gpu_check import prompts

LOGPROB_TOLERANCE = 1e-3  # the full-size exactness test's limit (docs/full-size.md)
REQUEST_TIMEOUT_S = 300


class Answer:
    """One streamed request: when it started, each response's arrival and output-token count, the
    sampled token ids (where logprobs were asked for) and the final output."""

    def __init__(self, started: float, num_prompt_tokens: int):
        self.started, self.num_prompt_tokens = started, num_prompt_tokens
        self.arrivals: list[tuple[float, int]] = []
        self.logprobs: list[dict] = []
        self.final = None
        self.done = threading.Event()

    def on_response(self, text: str, out) -> None:  # on the engine thread, as granite_llm's sender is
        self.arrivals.append((time.monotonic(), out.num_output_tokens))
        self.logprobs.extend(out.logprobs or [])
        if out.finished:
            self.final = out
            self.done.set()

    @property
    def error(self) -> str | None:
        if self.final is None:
            return f"no final response after {REQUEST_TIMEOUT_S} s"
        return self.final.error

    @property
    def ttft_s(self) -> float | None:
        """From the request's start (preprocessing and vision included) to its first token."""
        timing = self.final.timing if self.final else None
        return None if timing is None or timing.first_token is None else timing.first_token - self.started

    def token_gaps(self) -> list[float]:
        """Seconds between consecutive output tokens (a response carrying k tokens: k equal gaps)."""
        gaps = []
        for (t0, n0), (t1, n1) in itertools.pairwise(self.arrivals):
            gaps += [(t1 - t0) / (n1 - n0)] * (n1 - n0) if n1 > n0 else []
        return gaps


class Stack:
    def __init__(self, checkpoint: Path, device: str, dtype: str = "", backend: str = ""):
        from spyre_backend import MODEL_REPOSITORY
        from spyre_backend.config import ServingConfig
        from spyre_backend.preprocess.processor import Preprocessor
        from spyre_backend.serving.llm_service import LLMService
        from spyre_backend.serving.vision_service import VisionService

        given = {"checkpoint": str(checkpoint), "device": device, "dtype": dtype, "compile_backend": backend}
        params = {k: v for k, v in given.items() if v}  # unset: the model's own setting

        def config(model: str):
            return ServingConfig.from_pbtxt(MODEL_REPOSITORY / model / "config.pbtxt", **params)

        started = time.monotonic()
        # the LLM first: the vision service seals compiling process-wide once warm (here one
        # process holds both; under Triton each seals its own stub after its warmup)
        self.llm = LLMService(config("granite_llm"))
        self.vision = VisionService(config("vision_encoder"))
        self.ready_s = time.monotonic() - started
        front = config("preprocess")
        self.pre = Preprocessor(str(checkpoint), front.input_limits(), image_cache_mb=front.vision.processed_image_cache_mb)
        self._pre_lock, self._vision_lock = threading.Lock(), threading.Lock()  # one instance each

    def describe(self) -> dict:
        probe = self.llm.engine.probe
        plan = probe.plan
        return {"ready_s": round(self.ready_s, 1), "device": plan.kind, "compile_backend": plan.compile_backend,
                "dtype": str(plan.dtype).removeprefix("torch."), "kv_blocks": probe.num_kv_blocks,
                "weights_gib": round(probe.weight_bytes / 2**30, 2), "kv_pool_gib": round(probe.kv_pool_bytes / 2**30, 2),
                "processor": type(self.pre.processor.image_processor).__name__}

    def ask(self, question: str, image: bytes, max_tokens: int, **sampling) -> Answer:
        from spyre_backend.serving.llm_service import GenerateInputs

        started = time.monotonic()
        with self._pre_lock:
            prompt = self.pre(question, [image], apply_chat_template=True)
        with self._vision_lock:
            features = self.vision.encode(prompt.pixel_values, prompt.image_sizes)
        answer = Answer(started, len(prompt.input_ids))
        self.llm.submit(GenerateInputs(input_ids=prompt.input_ids, image_features=features, stream=True,
                                       max_tokens=max_tokens, sampling_parameters=json.dumps(sampling)),
                        answer.on_response)
        answer.done.wait(REQUEST_TIMEOUT_S)
        return answer

    def close(self) -> None:
        self.llm.seal_compiled(False)
        self.llm.shutdown()


def compare(got: Answer, want: dict) -> dict:
    """The engine's greedy answer against transformers': token ids, prompt length, logprobs."""
    ids = [entry["token_id"] for entry in got.logprobs]
    agree = next((i for i, (a, b) in enumerate(zip(ids, want["token_ids"])) if a != b), min(len(ids), len(want["token_ids"])))
    diffs = [abs(entry["logprob"] - ref) for entry, ref in zip(got.logprobs[:agree], want["logprobs"])]
    result = {"num_input_tokens": got.num_prompt_tokens, "reference_input_tokens": want["num_input_tokens"],
              "token_ids": ids, "reference_token_ids": want["token_ids"], "tokens_agreeing": agree,
              "max_logprob_diff": max(diffs, default=0.0), "error": got.error,
              "distinct_reference_tokens": len(set(want["token_ids"]))}  # 1: an answer that says little
    if agree < len(want["token_ids"]):  # how close transformers' own choice was there
        result["reference_margin_at_difference"] = want["margins"][agree]
    result["exact"] = (got.error is None and ids == want["token_ids"] and result["max_logprob_diff"] <= LOGPROB_TOLERANCE
                       and got.num_prompt_tokens == want["num_input_tokens"])
    return result


def exact(args) -> dict:
    from tools.gpu_check.reference import fp32_exactly

    fp32_exactly()
    reference = json.loads(args.reference.read_text())
    stack = Stack(args.checkpoint, args.device, dtype="float32", backend="eager")
    try:
        compared = [compare(stack.ask(q, image, max_tokens=len(want["token_ids"]), temperature=0, logprobs=0), want)
                    for (q, image), want in zip(prompts.exact_prompts(), reference["answers"])]
        return {**stack.describe(), "reference_processor": reference["processor"],
                "exact": all(c["exact"] for c in compared), "prompts": compared}
    finally:
        stack.close()


def percentiles(values: list[float], scale: float = 1.0) -> dict:
    if not values:
        return {}
    cuts = statistics.quantiles(values, n=10, method="inclusive") if len(values) > 1 else [values[0]] * 9
    return {"p50": round(statistics.median(values) * scale, 3), "p90": round(cuts[8] * scale, 3),
            "max": round(max(values) * scale, 3)}


def closed_loop(stack: Stack, level: int, requests: int, max_tokens: int, images: itertools.count) -> dict:
    """``level`` clients, each sending its next request when the last one has finished; request
    ``i`` of the run gets the image ``next(images)``, never one an earlier request had."""
    numbers = iter(range(requests))
    answers: list[Answer] = []

    def client() -> None:
        for _ in numbers:
            i = next(images)
            answers.append(stack.ask(prompts.LOAD_QUESTION, prompts.load_image(i), max_tokens,
                                     temperature=0, ignore_eos=True))

    started = time.monotonic()
    clients = [threading.Thread(target=client) for _ in range(level)]
    for t in clients:
        t.start()
    for t in clients:
        t.join()
    wall = time.monotonic() - started
    errors = [a.error for a in answers if a.error]
    tokens = sum(a.final.num_output_tokens for a in answers if a.final)
    return {"concurrency": level, "requests": len(answers), "errors": len(errors), "first_error": errors[0] if errors else None,
            "wall_s": round(wall, 2), "prompt_tokens": statistics.median(a.num_prompt_tokens for a in answers),
            "output_tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
            "ttft_s": percentiles([a.ttft_s for a in answers if a.ttft_s is not None]),
            "itl_ms": percentiles([g for a in answers for g in a.token_gaps()], scale=1000.0)}


def load(args) -> dict:
    stack = Stack(args.checkpoint, args.device, backend=args.backend)
    try:
        images = itertools.count()
        warm = stack.ask(prompts.LOAD_QUESTION, prompts.load_image(next(images)), args.max_tokens, temperature=0,
                         ignore_eos=True)
        stack.llm.seal_compiled()  # as the granite_llm stub does once warm
        levels = [closed_loop(stack, level, level * args.requests_per_client, args.max_tokens, images)
                  for level in args.levels]
        return {**stack.describe(), "warm_request_error": warm.error, "max_tokens": args.max_tokens, "levels": levels}
    finally:
        stack.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("phase", choices=("exact", "load"))
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--reference", type=Path, help="exact: the reference phase's answers")
    p.add_argument("--backend", default="", help="load: compile backend (empty: the device's default)")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 16])
    p.add_argument("--requests-per-client", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args(argv)
    result = exact(args) if args.phase == "exact" else load(args)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result)[:2000])
    failed = not result["exact"] if args.phase == "exact" else any(level["errors"] for level in result["levels"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
