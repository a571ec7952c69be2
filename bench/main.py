"""The benchmark run: every checkpoint through every path, then the report.

    python -m bench                      # full run (tiny and mid-size checkpoints)
    python -m bench --quick              # tiny checkpoint, fewer requests: a few minutes
    python -m bench --checkpoints mid --levels 1,16 --requests 4 --skip perf_analyzer,ensemble
    python -m bench --checkpoints full   # the 2b shape against vLLM and llama.cpp (hours): phases/full.py

Order per checkpoint: transformers, then the engine in-process (with the roofline timings on
its idle model), then a fresh tritonserver for the Triton paths. Only one of them holds the
model at a time, so each gets the whole machine. The phases are in bench/phases/; this module
parses the command line, runs them in order and writes the results folder and its report.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import time
from datetime import datetime
from pathlib import Path

from safetensors import safe_open

from spyre_backend import PROJECT_ROOT
from spyre_backend.device.host_memory import keep_freed_memory

from bench import report, roofline, vllm_peer
from bench.phases import (PHASES, SERVER_ENV, documents, engine, full, log, loadavg, openai_front, peer_compare,
                          prefix, proxy, structured, transformers_baseline, triton)
from bench.profiles import MID_CHECKPOINT, PROFILES, Profile, profile_for
from bench.targets import ratios, targets
from bench.workload import IMAGE_SIZE, Workload


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Throughput and latency of Granite Vision on Triton vs its baselines.")
    p.add_argument("--checkpoints", default="tiny,mid",
                   help="comma-separated: tiny, mid, full (the 2b shape: bench/phases/full.py, its own servers)")
    p.add_argument("--full-servers", default=",".join(full.SERVERS),
                   help=f"full: which servers, comma-separated (default: all of {', '.join(full.SERVERS)})")
    p.add_argument("--full-rounds", type=int, default=full.ROUNDS, help="full: alternating rounds")
    p.add_argument("--full-workloads", default=",".join(full.WORKLOADS),
                   help=f"full: which workloads, comma-separated (default: all of {', '.join(full.WORKLOADS)})")
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
    args.full_servers, args.full_workloads = args.full_servers.split(","), args.full_workloads.split(",")
    unknown = (args.skip - set(PHASES) | set(args.checkpoints) - set(PROFILES) - {"full"}
               | set(args.full_servers) - set(full.SERVERS) | set(args.full_workloads) - set(full.WORKLOADS))
    if unknown:
        p.error(f"unknown phase or checkpoint: {sorted(unknown)}")
    return args


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
        ck["transformers"] = transformers_baseline.run(prof, workload)
        gc.collect()
    want_roof = prof.roofline and "roofline" not in skip
    if "engine" not in skip or want_roof:
        log(f"{name}: engine in-process")
        ck["engine"], roof = engine.run(prof, workload, args.levels, machine, want_roof, "engine" not in skip)
        if roof:
            ck["roofline"] = roof
            ck["prompt_tokens"] = roof["prompt_tokens"]
        gc.collect()
    if {"triton", "perf_analyzer", "ensemble", "session"} - skip:
        log(f"{name}: tritonserver")
        ck.update(triton.run(prof, workload, args.levels, skip, ck_dir))
    if "peer" not in skip:
        log(f"{name}: side by side with vLLM CPU ({peer_compare.ROUNDS} alternating rounds)")
        ck["peer"] = peer_compare.run(name, prof.checkpoint, workload, prof.requests, ck_dir, log, SERVER_ENV)
    if "structured" not in skip:
        log(f"{name}: structured output, ours and vLLM CPU ({structured.ROUNDS} alternating rounds)")
        ck["structured"] = structured.run(name, prof.checkpoint, workload, ck_dir, log, SERVER_ENV)
    if "openai" not in skip:
        log(f"{name}: the OpenAI front against generate_stream ({openai_front.ROUNDS} alternating rounds), then aiperf")
        ck["openai"] = openai_front.run(prof.checkpoint, workload, prof.requests, ck_dir, log, SERVER_ENV)
    if "proxy" not in skip and name == "tiny":  # the proxy's cost does not depend on the model's size
        log(f"{name}: two replicas behind HAProxy against one direct ({proxy.ROUNDS} alternating rounds)")
        ck["proxy"] = proxy.run(prof.checkpoint, workload, prof.requests, ck_dir, log, SERVER_ENV)
    if "prefix" not in skip:
        log(f"{name}: prefix caching, ours and vLLM CPU")
        ck["prefix"] = prefix.run(name, prof.checkpoint, workload, 4 if name == "tiny" else 2, ck_dir, log, SERVER_ENV)
    if "documents" not in skip:  # against vLLM where the peer is: this run's, or installed by an earlier one
        with_peer = "peer" not in skip or vllm_peer.is_installed()
        log(f"{name}: documents, ours{' and vLLM CPU' if with_peer else ' (no vLLM peer installed)'}")
        ck["documents"] = documents.run(name, prof.checkpoint, workload, 4 if name == "tiny" else 2, ck_dir, log,
                                        SERVER_ENV, peer=with_peer)
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
        if name == "full":
            log("full: the 2b shape, ours against vLLM CPU and llama.cpp, one server at a time")
            result["full"] = full.run(machine, out_dir, log, args.full_servers, args.full_rounds,
                                      workloads=args.full_workloads)
            result["targets"] += full.targets(result["full"])
            report.write_json(out_dir, result)
            continue
        ck = run_checkpoint(name, profile_for(name, args), args, machine, out_dir)
        result["checkpoints"][name] = ck
        result["targets"] += targets(name, ck, args.levels)
        if "peer" in ck:
            result["targets"] += peer_compare.targets(name, ck["peer"]["comparison"])
        if "prefix" in ck:
            result["targets"] += prefix.targets(name, ck["prefix"])
        if "structured" in ck:
            result["targets"] += structured.targets(name, ck["structured"])
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
