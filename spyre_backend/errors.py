"""Errors and error texts that several layers share: the engine and preprocess raise or write
them, the Triton adapters and the fronts (granite_vision, the OpenAI front) read them.

A leaf module: it imports nothing of the package, so every layer may import it.
"""

from __future__ import annotations


class InvalidRequest(ValueError):
    """A client error: reported back as an error response, never raised past the model."""


# Starts every error that says a session's state is not on the replica that got its turn (the
# engine lost or evicted it, or Triton refused a turn without START): the client must resend the
# whole conversation with START. The fronts look for it anywhere in a message, since it may come
# behind a prefix such as "granite_vision: " (serving/routing.py; the OpenAI front answers 409).
SESSION_LOST = "session lost:"


# Starts every error about a media uuid sent without its image or document that preprocess no
# longer holds (preprocess raises it; the OpenAI front answers 409 with it as the code): resend it.
IMAGE_NOT_CACHED = "image_not_cached"
