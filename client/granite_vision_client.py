"""Ask Granite Vision about images over gRPC and print the answer as it streams.

    python -m client.granite_vision_client "What is in the image?" --image shape.png
    python -m client.granite_vision_client "Say hello." --url localhost:8001 --max-tokens 32
    python -m client.granite_vision_client "What is on page 2?" --document report.pdf --pages 2
    python -m client.granite_vision_client "What is in the image?" --image shape.png --session 7 --start
    python -m client.granite_vision_client $'\n<|user|>\nWhat color?\n<|assistant|>\n' --raw --session 7 --end

Images and PDFs are sent as encoded bytes; the server applies the model's chat template and places
the documents' pages, then one ``<image>`` per image, before the question (``--raw`` sends the
prompt as is instead, with a ``<document>`` tag per PDF). A session
(``--session ID``) keeps its KV cache between turns; its id also goes as the ``x-session-id``
header, by which a proxy in front of several replicas keeps the session on one of them.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
from pathlib import Path

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from spyre_backend.protocol.client import finish_and_counts, infer_inputs
from spyre_backend.serving.routing import SESSION_HEADER  # the proxy's routing key


def build_inputs(prompt: str, images: list[bytes], *, max_tokens: int, chat_template: bool,
                 sampling: dict | None = None, documents: list[bytes] = (),
                 media_options: dict | None = None) -> list[grpcclient.InferInput]:
    values = {"text_input": prompt, "max_tokens": max_tokens, "stream": True, "apply_chat_template": chat_template}
    if images:
        values["image"] = images
    if documents:
        values["document"] = list(documents)
    if media_options:
        values["mm_processor_kwargs"] = json.dumps(media_options)
    if sampling:
        values["sampling_parameters"] = json.dumps(sampling)
    return infer_inputs(values)


MAX_TOKENS = 64  # this client's default (the server's own is default_max_tokens)


def stream_answer(url: str, prompt: str, images: list[bytes], *, model: str = "granite_vision",
                  max_tokens: int = MAX_TOKENS, chat_template: bool = True, sampling: dict | None = None,
                  session: int = 0, start: bool = False, end: bool = False, documents: list[bytes] = (),
                  media_options: dict | None = None, on_text=lambda text: None) -> dict:
    """Streams one answer; calls ``on_text`` per delta; returns text, finish reason and counts.
    ``session``: a sequence id whose KV cache the server keeps between turns (``start`` opens it,
    ``end`` frees it after this turn); 0 for a one-off request."""
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: results.put((result, error)),
                        headers={SESSION_HEADER: str(session)} if session else None)
    try:
        client.async_stream_infer(model, build_inputs(prompt, images, max_tokens=max_tokens,
                                                      chat_template=chat_template, sampling=sampling,
                                                      documents=documents, media_options=media_options),
                                  sequence_id=session, sequence_start=start, sequence_end=end)
        pieces = []
        while True:
            result, error = results.get(timeout=600)
            if error is not None:
                raise error
            text = result.as_numpy("text_output")[0].decode("utf-8")
            pieces.append(text)
            on_text(text)
            final = finish_and_counts(result)
            if final["finish_reason"]:
                return {"text": "".join(pieces), **final}
    finally:
        client.stop_stream()
        client.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("prompt")
    p.add_argument("--image", action="append", default=[], type=Path, help="image file (repeatable)")
    p.add_argument("--document", action="append", default=[], type=Path, help="PDF file (repeatable)")
    p.add_argument("--pages", help='pages of the documents, e.g. "1-3,7" (default: all)')
    p.add_argument("--max-image-side", type=int, help="resize images and pages to this longest side")
    p.add_argument("--url", default="localhost:8001", help="Triton gRPC endpoint")
    p.add_argument("--model", default="granite_vision")
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--raw", action="store_true", help="send the prompt as is (no chat template)")
    p.add_argument("--session", type=int, default=0, help="sequence id of a session (kept between turns)")
    p.add_argument("--start", action="store_true", help="this turn opens the session")
    p.add_argument("--end", action="store_true", help="the session ends after this turn")
    a = p.parse_args(argv)
    if (a.start or a.end) and not a.session:
        p.error("--start and --end need --session")
    sampling = {"temperature": a.temperature} if a.temperature else None
    media = {k: v for k, v in (("pages", a.pages), ("max_image_side", a.max_image_side)) if v is not None}
    try:
        out = stream_answer(a.url, a.prompt, [path.read_bytes() for path in a.image], model=a.model,
                            max_tokens=a.max_tokens, chat_template=not a.raw, sampling=sampling,
                            session=a.session, start=a.start, end=a.end,
                            documents=[path.read_bytes() for path in a.document], media_options=media,
                            on_text=lambda t: print(t, end="", flush=True))
    except InferenceServerException as exc:
        print(f"\nerror: {exc.message()}", file=sys.stderr)
        return 1
    print(f"\n[{out['finish_reason']}: {out['num_input_tokens']} prompt tokens "
          f"({out['num_cached_tokens']} from the prefix cache), {out['num_output_tokens']} generated]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
