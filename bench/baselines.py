"""The transformers baseline: ``LlavaNextForConditionalGeneration.generate()``, one request at a time.

The same checkpoint, prompts and images as the served paths, greedy with exactly
``max_tokens`` new tokens (``min_new_tokens`` keeps eos away, as ``min_tokens`` does in the
engine). A streamer stamps each new token as generate() produces it, so TTFT and ITL come out of
the same arithmetic as the served paths'.
"""

from __future__ import annotations

import io
import time

import torch
from PIL import Image
from transformers import AutoProcessor, LlavaNextForConditionalGeneration
from transformers.generation.streamers import BaseStreamer

from bench.stats import RequestRecord
from bench.workload import Workload


class _TokenClock(BaseStreamer):
    """generate() calls put() once with the prompt, then once per new token."""

    def __init__(self, record: RequestRecord):
        self.record, self.seen_prompt = record, False

    def put(self, value):
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        self.record.arrivals.append((time.monotonic(), len(self.record.arrivals) + 1))

    def end(self):
        pass


class TransformersBaseline:
    def __init__(self, checkpoint: str):
        self.processor = AutoProcessor.from_pretrained(checkpoint)
        self.model = LlavaNextForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()

    @torch.no_grad()
    def run(self, workload: Workload, i: int) -> RequestRecord:
        content = [{"type": "image"}, {"type": "text", "text": workload.question(i)}]
        record = RequestRecord(time.monotonic())  # the clock starts before preprocessing, as a served request's
        prompt = self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                    add_generation_prompt=True, tokenize=False)
        image = Image.open(io.BytesIO(workload.image(i)))
        inputs = self.processor(images=[image], text=prompt, return_tensors="pt")
        out = self.model.generate(**inputs, max_new_tokens=workload.max_tokens, min_new_tokens=workload.max_tokens,
                                  do_sample=False, streamer=_TokenClock(record))
        produced = out.shape[1] - inputs["input_ids"].shape[1]
        if produced != workload.max_tokens or record.output_tokens != produced:
            record.error = f"generated {produced} tokens, streamed {record.output_tokens}, wanted {workload.max_tokens}"
        return record
