"""The benchmark run: every checkpoint through every path, then the report.

    python -m bench                      # full run (tiny and mid-size checkpoints)
    python -m bench --quick              # tiny checkpoint, fewer requests: a few minutes
    python -m bench --checkpoints mid --levels 1,16 --requests 4 --skip perf_analyzer,ensemble

Order per checkpoint: transformers, then the engine in-process (with the roofline timings on
its idle model), then a fresh tritonserver for the Triton paths. Only one of them holds the
model at a time, so each gets the whole machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from safetensors import safe_open

from spyre_backend import DEFAULT_CHECKPOINT, MODEL_REPOSITORY, PROJECT_ROOT
from spyre_backend.device.host_memory import keep_freed_memory

from bench import openai_front, peer_compare, perf_analyzer, prefix, proxy, report, roofline, session
from bench.loadgen import EngineTarget, TritonTarget, closed_loop
from bench.stats import summarize
from bench.workload import IMAGE_SIZE, Workload

# outside checkpoints/ (which the Docker image copies), in the uncommitted results/ folder
MID_CHECKPOINT = PROJECT_ROOT / "results" / "checkpoints" / "random-mid"
PHASES = ("transformers", "engine", "roofline", "triton", "perf_analyzer", "ensemble", "session", "peer", "prefix",
          "openai", "proxy")
# vision_encoder's cache of repeated images would skip the vision tower: every request here has a
# new image anyway, and the cache stays off.
SERVER_ENV = {"SPYRE_ENCODER_CACHE_MB": "0"}


@dataclass(frozen=True)
class Profile:
    """How much to run for one checkpoint. Requests per level: max(min_requests, rounds x level)."""

    checkpoint: Path
    max_tokens: int
    min_requests: int
    rounds: int
    transformers_requests: int
    ensemble_levels: tuple[int, ...] | None  # None: every level
    roofline: bool

    def requests(self, level: int) -> int:
        return max(self.min_requests, self.rounds * level)


PROFILES = {
    # tiny: cheap, so enough requests for stable percentiles
    "tiny": Profile(DEFAULT_CHECKPOINT, max_tokens=64, min_requests=16, rounds=4, transformers_requests=16,
                    ensemble_levels=None, roofline=False),
    # mid: a 1.4k-token image prompt costs seconds of vision and prefill on 2 cores, and decode
    # steps of 16 long sequences are slow: one round per level, 16 new tokens
    "mid": Profile(MID_CHECKPOINT, max_tokens=16, min_requests=3, rounds=1, transformers_requests=2,
                   ensemble_levels=(1,), roofline=True),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Throughput and latency of Granite Vision on Triton vs its baselines.")
    p.add_argument("--checkpoints", default="tiny,mid", help="comma-separated: tiny, mid")
    p.add_argument("--levels", default="1,4,16", help="concurrency levels")
    p.add_argument("--requests", type=int, help="requests per level (default: per checkpoint, see PROFILES)")
    p.add_argument("--max-tokens", type=int, help="new tokens per request (default: per checkpoint)")
    p.add_argument("--skip", default="", help=f"comma-separated phases to skip: {', '.join(PHASES)}")
    p.add_argument("--quick", action="store_true", help="tiny checkpoint only, fewer requests")
    p.add_argument("--mid-checkpoint", type=Path, default=MID_CHECKPOINT,
                   help="where the mid-size random model is built (a checkpoint not built there is used as it is)")
    p.add_argument("--out", type=Path, help="results folder (default: results/bench-<time>)")
    p.add_argument("--compile", choices=("inductor", "eager"), default="inductor",
                   help="compile_backend of every served and in-process path (default: inductor, the fastest on "
                        "the CPU; the first run compiles for a few minutes, later runs hit inductor's cache)")
    p.add_argument("--cpu-gemm", choices=("onednn", "mkl"), default="onednn",
                   help="cpu_gemm of every served and in-process path: who runs the large fp32 linears "
                        "(default: oneDNN with weights reordered at load; mkl: PyTorch's default)")
    args = p.parse_args(argv)
    args.levels = [int(x) for x in args.levels.split(",")]
    args.checkpoints = ["tiny"] if args.quick and args.checkpoints == "tiny,mid" else args.checkpoints.split(",")
    args.skip = {x for x in args.skip.split(",") if x}
    unknown = args.skip - set(PHASES) | set(args.checkpoints) - set(PROFILES)
    if unknown:
        p.error(f"unknown phase or checkpoint: {sorted(unknown)}")
    return args


def profile_for(name: str, args) -> Profile:
    prof = PROFILES[name]
    if name == "mid":
        prof = replace(prof, checkpoint=args.mid_checkpoint)
    if args.quick:
        prof = replace(prof, min_requests=4, rounds=2, transformers_requests=2)
    if args.requests:
        prof = replace(prof, min_requests=args.requests, rounds=0,
                       transformers_requests=min(prof.transformers_requests, args.requests))
    if args.max_tokens:
        prof = replace(prof, max_tokens=args.max_tokens)
    return prof


def log(message: str) -> None:
    print(f"[bench {datetime.now():%H:%M:%S}] {message}", flush=True)


def serving_config(model: str, checkpoint: Path):
    """A Triton model's config.pbtxt parameters (and SPYRE_* overrides, as the server applies them),
    so the in-process engine runs with the server's settings."""
    from spyre_backend.config import ServingConfig

    text = (MODEL_REPOSITORY / model / "config.pbtxt").read_text()
    found = dict(re.findall(r'key:\s*"(\w+)"\s*value:\s*\{\s*string_value:\s*"([^"]*)"', text))
    found["checkpoint"] = str(checkpoint)
    return ServingConfig.from_model_config({"parameters": {k: {"string_value": v} for k, v in found.items()}})


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- phases -------------------------------------------------------------------------------------
def run_transformers(prof: Profile, workload: Workload) -> dict:
    import torch

    from bench.baselines import TransformersBaseline
    from spyre_backend.device.process import TORCH_DEFAULT_THREADS

    torch.set_num_threads(TORCH_DEFAULT_THREADS)  # every core, whatever an earlier phase set
    baseline = TransformersBaseline(str(prof.checkpoint))
    baseline.run(workload, -1)  # warm: first-call costs are not what is compared
    records = [baseline.run(workload, i) for i in range(prof.transformers_requests)]
    return {**summarize(records), "loadavg": loadavg()}


def run_engine(prof: Profile, workload: Workload, levels: list[int], machine: dict, with_roofline: bool,
               with_load: bool) -> tuple[dict, dict | None]:
    import torch

    from spyre_backend.device import plan_for
    from spyre_backend.preprocess.processor import Preprocessor
    from spyre_backend.serving.llm_service import LLMService
    from spyre_backend.vision.encoder import VisionEncoder

    service = LLMService(serving_config("granite_llm", prof.checkpoint))  # warms up like the Triton model
    try:
        pre = Preprocessor(str(prof.checkpoint))
        # no encoder cache here (the Triton model attaches one, where it has one; it is off there too)
        encoder = VisionEncoder(str(prof.checkpoint), plan_for(serving_config("vision_encoder", prof.checkpoint).device, str(prof.checkpoint)))
        roof = None
        if with_roofline:
            log("roofline: machine limits again, then vision, prefill and decode on the idle engine")
            # the best limits seen in the run: other load on the machine only ever lowers them
            now = roofline.measure_machine()
            machine = {**machine, "matmul_gflops": max(machine["matmul_gflops"], now["matmul_gflops"]),
                       "bandwidth_gbs": max(machine["bandwidth_gbs"], now["bandwidth_gbs"])}
            runner = service.engine.runner
            prompt = pre(workload.question(0), [workload.image(0)], apply_chat_template=True)
            n_prompt = len(prompt.input_ids)
            context = n_prompt + workload.max_tokens // 2  # the mean context of the load's decode steps
            vision_s, crops = roofline.time_vision(encoder, prompt)
            prefill_s = roofline.time_prefill(runner, service.engine.kv, n_prompt)
            decode_s = {b: roofline.time_decode(runner, service.engine.kv, b, context) for b in sorted({1, max(levels)})}
            shape = roofline.ModelShape.from_config(json.loads((prof.checkpoint / "config.json").read_text()))
            roof = roofline.analyse(shape, machine, vision_s=vision_s, crops=crops, prefill_s=prefill_s,
                                    prompt_tokens=n_prompt, decode_s=decode_s, context=context)
            roof.update(torch_threads=torch.get_num_threads(), matmul_gflops=machine["matmul_gflops"],
                        bandwidth_gbs=machine["bandwidth_gbs"], loadavg=loadavg())
        results = {}
        if with_load:
            target = EngineTarget(service, pre, encoder, workload)
            closed_loop(target.send, 1, 1)  # warm: also compiles the vision tower for this image size
            service.seal_compiled()  # as the Triton stubs do
            for level in levels:
                log(f"engine in-process: concurrency {level}, {prof.requests(level)} requests")
                records = closed_loop(target.send, prof.requests(level), level)
                results[level] = {**summarize(records), "loadavg": loadavg()}
        return results, roof
    finally:
        service.seal_compiled(False)  # the next checkpoint compiles its own graphs
        service.shutdown()


def run_triton(prof: Profile, workload: Workload, levels: list[int], skip: set, out_dir: Path) -> dict:
    from spyre_backend.server.launcher import ServerOptions, TritonServer, free_port

    options = ServerOptions(checkpoint=prof.checkpoint, http_port=free_port(), grpc_port=free_port(),
                            metrics_port=free_port(), extra_env=dict(SERVER_ENV))
    server = TritonServer(options, log_path=out_dir / "server.log")
    started = time.monotonic()
    server.start(timeout_s=1200)
    results: dict = {"server_start_s": time.monotonic() - started}
    try:
        paths = []
        if "triton" not in skip:
            paths.append(("triton", "granite_vision", levels))
        if "ensemble" not in skip:
            ensemble_levels = [c for c in levels if prof.ensemble_levels is None or c in prof.ensemble_levels]
            paths.append(("ensemble", "granite_vision_ensemble", ensemble_levels))
        for key, model, path_levels in paths:
            results[key] = {}
            for level in path_levels:
                target = TritonTarget(server.grpc_url, workload, level, model=model)
                try:
                    if level == path_levels[0]:
                        closed_loop(target.send, 1, 1)  # warm: first connection, first request of the model
                    log(f"{model} (Python client): concurrency {level}, {prof.requests(level)} requests")
                    records = closed_loop(target.send, prof.requests(level), level)
                finally:
                    target.close()
                results[key][level] = {**summarize(records), "loadavg": loadavg()}
        if "session" not in skip:
            log("session: second turn vs a fresh request with the whole conversation and the image")
            results["session"] = session.measure(server.grpc_url, workload)
        if "perf_analyzer" not in skip:
            results["perf_analyzer"], results["perf_analyzer_own"] = {}, {}
            for level in levels:
                log(f"perf_analyzer: concurrency {level}, {prof.requests(level)} requests")
                records, own = perf_analyzer.run(server.grpc_url, workload, level, prof.requests(level), out_dir)
                results["perf_analyzer"][level] = {**summarize(records), "loadavg": loadavg()}
                results["perf_analyzer_own"][level] = {"own": own}
    finally:
        results["server_exit_code"] = server.stop()
    return results


# -- ratios and targets ---------------------------------------------------------------------------
def ratios(ck: dict, levels: list[int]) -> dict:
    lo, hi = min(levels), max(levels)
    out = {}

    def get(path, level, *keys):
        value = ck.get(path, {}).get(level, {})
        for key in keys:
            value = value.get(key, {}) if isinstance(value, dict) else {}
        return value if isinstance(value, (int, float)) else None

    itl_t, itl_e = get("triton", lo, "itl_ms", "mean"), get("engine", lo, "itl_ms", "mean")
    if itl_t is not None and itl_e is not None:
        out[f"Triton overhead per token, ms (mean ITL, Triton - engine, c={lo})"] = itl_t - itl_e
    for level in levels:
        tt, te = get("triton", level, "tokens_per_s"), get("engine", level, "tokens_per_s")
        if tt and te:
            out[f"Triton overhead per token, ms (1/throughput, Triton - engine, c={level})"] = 1e3 / tt - 1e3 / te
    for path in ("triton", "engine", "perf_analyzer"):
        a, b = get(path, hi, "tokens_per_s"), get(path, lo, "tokens_per_s")
        if a and b:
            out[f"batching gain {path} (tokens/s c={hi} / c={lo})"] = a / b
    hf = ck.get("transformers", {}).get("tokens_per_s")
    for level in (lo, hi):
        tt = get("triton", level, "tokens_per_s")
        if hf and tt:
            out[f"speed-up over transformers (Triton c={level} / transformers serial, tokens/s)"] = tt / hf
    return out


# The issue sets the serving targets for the tiny checkpoint (where the serving path, not the
# matmuls, is what is measured) and the roofline targets for the mid-size one.
SERVING_TARGETS_FOR = ("tiny",)


def targets(name: str, ck: dict, levels: list[int]) -> list[dict]:
    lo, hi = min(levels), max(levels)
    serving = name in SERVING_TARGETS_FOR
    r = ck.get("ratios", {}) if serving else {}
    wanted = [(f"Triton overhead per token, ms (mean ITL, Triton - engine, c={lo})", "<= 1 ms", lambda v: v <= 1.0),
              (f"batching gain triton (tokens/s c={hi} / c={lo})", ">= 6x", lambda v: v >= 6.0),
              (f"speed-up over transformers (Triton c={hi} / transformers serial, tokens/s)", ">= 10x",
               lambda v: v >= 10.0)]
    out = [{"checkpoint": name, "name": key, "target": goal, "value": r[key], "met": ok(r[key])}
           for key, goal, ok in wanted if key in r]
    if "session" in ck and serving:
        value = ck["session"]["ratio"]
        out.append({"checkpoint": name, "name": "session second-turn TTFT vs fresh whole conversation (p50 ratio)",
                    "target": ">= 5x", "value": value, "met": value >= 5.0})
    roof = ck.get("roofline") or {}
    for phase in ("prefill", "vision"):
        if phase in roof:
            value = roof[phase]["fraction"]
            out.append({"checkpoint": name, "name": f"{phase} fraction of roofline", "target": ">= 0.7",
                        "value": value, "met": value >= 0.7})
    return out


# -- the run --------------------------------------------------------------------------------------
def run_checkpoint(name: str, prof: Profile, args, machine: dict, out_dir: Path) -> dict:
    if name == "mid":
        from tools.tiny_checkpoint import random_checkpoint

        if (prof.checkpoint / "config.json").exists() and not (prof.checkpoint / random_checkpoint.STAMP).exists():
            log(f"mid: using the checkpoint in {prof.checkpoint} as it is (not built by random_checkpoint)")
        else:
            log(f"mid-size random checkpoint at {prof.checkpoint} (built once, then reused)")
            random_checkpoint.build(random_checkpoint.parser().parse_args(["--out", str(prof.checkpoint)]), log)
    workload = Workload(prof.max_tokens)
    config = json.loads((prof.checkpoint / "config.json").read_text())
    with safe_open(str(prof.checkpoint / "model.safetensors"), "pt") as f:
        # the tied LM head is stored next to the embedding: count it once
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if not k.endswith("lm_head.weight"))
    ck: dict = {"checkpoint": str(prof.checkpoint), "params_m": params / 1e6, "max_tokens": prof.max_tokens,
                "image_size": list(IMAGE_SIZE), "requests_per_level": {c: prof.requests(c) for c in args.levels},
                "shape": roofline.asdict(roofline.ModelShape.from_config(config))}
    ck_dir = out_dir / name
    ck_dir.mkdir(parents=True, exist_ok=True)
    skip = args.skip

    if "transformers" not in skip:
        log(f"{name}: transformers generate(), {prof.transformers_requests} requests one at a time")
        ck["transformers"] = run_transformers(prof, workload)
        gc.collect()
    want_roof = prof.roofline and "roofline" not in skip
    if "engine" not in skip or want_roof:
        log(f"{name}: engine in-process")
        ck["engine"], roof = run_engine(prof, workload, args.levels, machine, want_roof, "engine" not in skip)
        if roof:
            ck["roofline"] = roof
            ck["prompt_tokens"] = roof["prompt_tokens"]
        gc.collect()
    if {"triton", "perf_analyzer", "ensemble", "session"} - skip:
        log(f"{name}: tritonserver")
        ck.update(run_triton(prof, workload, args.levels, skip, ck_dir))
    if "peer" not in skip:
        log(f"{name}: side by side with vLLM CPU ({peer_compare.ROUNDS} alternating rounds)")
        ck["peer"] = peer_compare.run(name, prof.checkpoint, workload, prof.requests, ck_dir, log, SERVER_ENV)
    if "openai" not in skip:
        log(f"{name}: the OpenAI front against generate_stream ({openai_front.ROUNDS} alternating rounds), then aiperf")
        ck["openai"] = openai_front.run(prof.checkpoint, workload, prof.requests, ck_dir, log, SERVER_ENV)
    if "proxy" not in skip and name == "tiny":  # the proxy's cost does not depend on the model's size
        log(f"{name}: two replicas behind HAProxy against one direct ({proxy.ROUNDS} alternating rounds)")
        ck["proxy"] = proxy.run(prof.checkpoint, workload, prof.requests, ck_dir, log, SERVER_ENV)
    if "prefix" not in skip:
        log(f"{name}: prefix caching, ours and vLLM CPU")
        ck["prefix"] = prefix.run(name, prof.checkpoint, workload, 4 if name == "tiny" else 2, ck_dir, log, SERVER_ENV)
    ck.setdefault("prompt_tokens", _prompt_tokens(prof, workload))
    ck["ratios"] = ratios(ck, args.levels)
    return ck


def _prompt_tokens(prof: Profile, workload: Workload) -> int:
    from spyre_backend.preprocess.processor import Preprocessor

    return len(Preprocessor(str(prof.checkpoint))(workload.question(0), [workload.image(0)], True).input_ids)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = args.out or PROJECT_ROOT / "results" / f"bench-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"results in {out_dir}")
    # read by serving_config() in-process and inherited by every tritonserver the run starts
    os.environ["SPYRE_COMPILE_BACKEND"] = args.compile
    os.environ["SPYRE_CPU_GEMM"] = args.cpu_gemm
    # as every serving process sets it (spyre_backend/device/process.py): every in-process path here,
    # the transformers baseline included, runs with the same allocator settings
    keep_freed = keep_freed_memory()
    result: dict = {"started": stamp, "levels": args.levels, "args": {k: (sorted(v) if isinstance(v, set) else v)
                                                                     for k, v in vars(args).items()},
                    "checkpoints": {}, "targets": [], "keep_freed_memory": keep_freed}
    log("machine limits: fp32 matmul and memory bandwidth")
    machine = {**roofline.measure_machine(), "cpus": os.cpu_count(), "loadavg_start": loadavg()}
    result["machine"] = machine
    for name in args.checkpoints:
        ck = run_checkpoint(name, profile_for(name, args), args, machine, out_dir)
        result["checkpoints"][name] = ck
        result["targets"] += targets(name, ck, args.levels)
        if "peer" in ck:
            result["targets"] += peer_compare.targets(name, ck["peer"]["comparison"])
        if "prefix" in ck:
            result["targets"] += prefix.targets(name, ck["prefix"])
        if "openai" in ck and name == "tiny":
            result["targets"] += openai_front.targets(ck["openai"]["comparison"])
        report.write_json(out_dir, result)  # partial results survive a later failure
    end = roofline.measure_machine()
    machine.update(loadavg_end=loadavg(), matmul_gflops_end=end["matmul_gflops"],
                   bandwidth_gbs_end=end["bandwidth_gbs"])
    result["wall_s"] = time.monotonic() - started
    report.write_json(out_dir, result)
    (out_dir / "report.md").write_text(report.markdown(result))
    report.plots(out_dir, result)
    print(report.markdown(result))
    log(f"done in {result['wall_s'] / 60:.1f} min: {out_dir}")
    return 0
