"""The smallest useful example: a two-turn session about an image with a running server.

    python -m client.example [image.png]

The session keeps its KV cache between turns, so the second turn sends only its own text; its
id also goes as the x-session-id header, which keeps it on one replica behind a proxy.
"""

import random
import sys

from client.granite_vision_client import stream_answer

image = open(sys.argv[1], "rb").read() if len(sys.argv) > 1 else None
session = random.randrange(1, 1 << 62)
show = lambda text: print(text, end="", flush=True)  # noqa: E731

first = stream_answer("localhost:8001", "What is in the image?" if image else "Say hello.",
                      [image] if image else [], session=session, start=True, on_text=show)
print(f"\n({first['finish_reason']}, {first['num_output_tokens']} tokens)")
second = stream_answer("localhost:8001", "\n<|user|>\nSay it in one word.\n<|assistant|>\n", [],
                       chat_template=False, session=session, end=True, on_text=show)
print(f"\n({second['finish_reason']}, {second['num_output_tokens']} tokens)")
