"""The smallest useful example: stream an answer about an image from a running server."""

import sys

from client.granite_vision_client import stream_answer

image = open(sys.argv[1], "rb").read() if len(sys.argv) > 1 else None
answer = stream_answer(
    "localhost:8001",
    "What is in the image?" if image else "Say hello.",
    [image] if image else [],
    on_text=lambda text: print(text, end="", flush=True),
)
print(f"\n({answer['finish_reason']}, {answer['num_output_tokens']} tokens)")
