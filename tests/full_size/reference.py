"""transformers' fp32 answers on the full-size checkpoint, in a process of its own: the reference
model (12 GB in fp32) must be gone before the server loads its own copy.

    python -m tests.full_size.reference CHECKPOINT OUT.json  (prompts as JSON on stdin)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from tests.conftest import Reference

TOP = 20  # logprobs compared at the first step (the most the server returns)


@torch.no_grad()
def answers(checkpoint: Path, prompts: list[dict], max_new_tokens: int) -> list[dict]:
    started = time.monotonic()
    reference = Reference(checkpoint)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # scripts/gpu_check.sh: on the GPU
    reference.model.to(device)
    print(f"reference loaded in {time.monotonic() - started:.0f} s", flush=True)
    results = []
    for prompt in prompts:
        started = time.monotonic()
        images = [bytes.fromhex(h) for h in prompt["images"]]
        inputs = reference.inputs(reference.chat_prompt(prompt["question"], len(images)), images).to(device)
        out = reference.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                       output_logits=True, return_dict_in_generate=True)
        # transformers' LlavaNext applies its own lm_head and not Granite's logits_scaling (argmax is
        # the same either way); the served logits are after it, as in FMS and vLLM
        scaling = reference.model.config.text_config.logits_scaling
        first = torch.log_softmax(out.logits[0][0].float() / scaling, dim=-1)
        top = torch.topk(first, TOP)
        results.append({
            "num_input_tokens": int(inputs["input_ids"].shape[1]),
            "token_ids": out.sequences[0, inputs["input_ids"].shape[1]:].tolist(),
            "device": device,
            "first_logprobs": first.tolist(),
            "top_ids": top.indices.tolist(),
            "seconds": time.monotonic() - started,
        })
        print(f"reference: {results[-1]['num_input_tokens']} prompt tokens in {results[-1]['seconds']:.0f} s",
              flush=True)
    return results


def main(argv: list[str]) -> int:
    checkpoint, out = Path(argv[0]), Path(argv[1])
    request = json.loads(sys.stdin.read())
    out.write_text(json.dumps(answers(checkpoint, request["prompts"], request["max_new_tokens"])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
