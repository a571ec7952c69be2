"""`make bench`: throughput and latency of Granite Vision served through Triton, next to its baselines.

    python -m bench [--quick] [--checkpoints tiny,mid] [--levels 1,4,16] ...

For each checkpoint (the shipped tiny one, and a mid-size random one built on the fly) the same
prompts and images go through: transformers ``generate()`` one request at a time, the
spyre_backend engine called in-process (no Triton), and a real tritonserver (Python load
generator on ``granite_vision`` and ``granite_vision_ensemble``, and perf_analyzer). The run
also measures this machine's matmul and memory-bandwidth limits and how close the mid-size
model's vision encoding, prefill and decode come to them. Results go to results/bench-<time>/.

Modules: ``main`` (the run: command line, the phases in order, the results folder), ``phases/``
(one module per phase, see its docstring), ``profiles`` (how much each checkpoint's run does),
``stats`` (latency arithmetic), ``workload`` (prompts, images, request inputs), ``loadgen``
(closed-loop load on Triton and on the engine), ``baselines`` (transformers), ``roofline`` (FLOP and
byte counts, machine limits), ``vllm_peer`` (the vLLM CPU server), ``targets`` and ``report``;
``grammar_compile`` (structured output's compile times, first and cached) runs on its own.
"""
