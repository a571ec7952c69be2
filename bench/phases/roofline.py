"""Phase ``roofline``: vision, prefill and decode timed on the engine phase's idle engine, against
this machine's matmul and bandwidth limits (the arithmetic is bench/roofline.py)."""

from __future__ import annotations

import json

from bench import roofline
from bench.phases import log, loadavg
from bench.profiles import Profile
from bench.workload import Workload


def run(service, pre, encoder, prof: Profile, workload: Workload, levels: list[int], machine: dict) -> dict:
    """``service``: the engine phase's LLMService; ``pre``, ``encoder``: its Preprocessor and VisionEncoder."""
    import torch

    log("roofline: machine limits again, then vision, prefill and decode on the idle engine")
    # the best limits seen in the run: other load on the machine only ever lowers them
    now = roofline.measure_machine()
    machine = {**machine, "matmul_gflops": max(machine["matmul_gflops"], now["matmul_gflops"]),
               "bandwidth_gbs": max(machine["bandwidth_gbs"], now["bandwidth_gbs"])}
    probe = service.engine.probe  # single steps on the idle engine
    prompt = pre(workload.question(0), [workload.image(0)], apply_chat_template=True)
    n_prompt = len(prompt.input_ids)
    context = n_prompt + workload.max_tokens // 2  # the mean context of the load's decode steps
    vision_s, crops = roofline.time_vision(encoder, prompt)
    prefill_s = probe.time_prefill(n_prompt)
    decode_s = {b: probe.time_decode(b, context) for b in sorted({1, max(levels)})}
    shape = roofline.ModelShape.from_config(json.loads((prof.checkpoint / "config.json").read_text()))
    roof = roofline.analyse(shape, machine, vision_s=vision_s, crops=crops, prefill_s=prefill_s,
                            prompt_tokens=n_prompt, decode_s=decode_s, context=context)
    roof.update(torch_threads=torch.get_num_threads(), matmul_gflops=machine["matmul_gflops"],
                bandwidth_gbs=machine["bandwidth_gbs"], loadavg=loadavg())
    return roof
