"""A/B of the context buckets on one decode step, in one process (so machine noise hits both alike).

    python -m bench.decode_buckets [--checkpoint results/checkpoints/random-mid] [--context 1373]

Times ModelRunner.forward on decode inputs at batch 1, 4 and 16 with the old power-of-two buckets
and with the current ones (a midpoint between powers of two from 8 blocks on).
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.main import MID_CHECKPOINT
from spyre_backend.device import resolve
from spyre_backend.engine.model_runner import ModelRunner
from spyre_backend.models import get_spec


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(MID_CHECKPOINT))
    p.add_argument("--context", type=int, default=1373, help="tokens already in every sequence")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    runner = ModelRunner(args.checkpoint, plan=resolve("cpu", "eager", torch.float32), spec=get_spec(args.checkpoint),
                         num_kv_blocks=1025, block_size=64, max_context=4096, prefill_chunk=512,
                         decode_batch_sizes=[1, 2, 4, 8, 16])
    blocks = args.context // runner.block_size + 1
    power_of_two = [b for b in runner.context_buckets if b & (b - 1) == 0]
    variants = {"powers of two": power_of_two, "current": list(runner.context_buckets)}
    for round_ in range(args.rounds):
        for name, buckets in variants.items():
            runner.context_buckets = buckets
            for batch in (1, 4, 16):
                tables = [[(blocks * row + j) % 1024 + 1 for j in range(blocks)] for row in range(batch)]
                step = runner.decode_inputs(torch.zeros(batch, runner.hidden_size), [args.context - 1] * batch, tables)
                runner.forward(step)  # first call of a shape
                started = time.perf_counter()
                for _ in range(3):
                    runner.forward(step)
                ms = (time.perf_counter() - started) / 3 * 1000
                print(f"round {round_}  {name:14s}  batch {batch:2d}  decode step {ms:7.1f} ms", flush=True)


if __name__ == "__main__":
    main()
