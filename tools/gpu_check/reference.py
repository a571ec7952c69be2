"""Phase ``reference``: transformers' LlavaNext ``generate()``, greedy, in fp32 on the check's device,
on the exactness prompts: the oracle the engine must equal token for token. A process of its own,
so its fp32 copy of the model is gone before the engine loads one.

    python -m tools.gpu_check.reference --checkpoint DIR --device cuda --tokens 16 --out reference.json
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import torch


def fp32_exactly() -> None:
    """fp32 means fp32 in both processes that are compared: no TF32 in matmuls or in the vision
    tower's patch convolution (cuDNN allows TF32 by default). No effect on the CPU."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@torch.no_grad()
def answer(model, processor, question: str, image: bytes, tokens: int, device: str) -> dict:
    from PIL import Image

    content = [{"type": "image"}, {"type": "text", "text": question}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                           tokenize=False)
    inputs = processor(images=[Image.open(io.BytesIO(image))], text=prompt, return_tensors="pt").to(device)
    out = model.generate(**inputs, max_new_tokens=tokens, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    prompt_len = int(inputs["input_ids"].shape[1])
    ids = out.sequences[0, prompt_len:].tolist()
    # LlavaNext's own LM head leaves out Granite's logits_scaling, which the engine's logprobs
    # include (as FMS and vLLM do): the same argmax, and logprobs comparable once divided
    scaling = getattr(model.config.text_config, "logits_scaling", 1.0) or 1.0
    steps = [torch.log_softmax(logits[0].float() / scaling, dim=-1) for logits in out.logits]
    return {"num_input_tokens": prompt_len, "token_ids": ids,
            "logprobs": [float(step[token]) for step, token in zip(steps, ids)],
            # how far the best token is ahead of the second: a mismatch at a near-tie says less
            "margins": [float(top[0] - top[1]) for top in (step.topk(2).values for step in steps)]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    from tools.gpu_check.prompts import exact_prompts

    fp32_exactly()
    started = time.monotonic()
    processor = AutoProcessor.from_pretrained(args.checkpoint)
    model = LlavaNextForConditionalGeneration.from_pretrained(args.checkpoint, dtype=torch.float32)
    model = model.to(args.device).eval()
    loaded_s = time.monotonic() - started
    answers = [answer(model, processor, q, image, args.tokens, args.device) for q, image in exact_prompts()]
    args.out.write_text(json.dumps({"loaded_s": round(loaded_s, 1), "seconds": round(time.monotonic() - started, 1),
                                    "processor": type(processor.image_processor).__name__,
                                    "answers": answers}, indent=1))
    print(f"reference: loaded in {loaded_s:.0f} s; prompt tokens {[a['num_input_tokens'] for a in answers]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
