"""IBM Spyre (AIU) specifics, kept in this one file.

The Spyre software stack provides ``torch_sendnn``, which registers the ``sendnn`` torch.compile
backend that turns static-shape graphs into programs for the card. Nothing here runs without it.
"""

from __future__ import annotations

import importlib

MODULE = "torch_sendnn"
BACKEND = "sendnn"


def available() -> bool:
    try:
        importlib.import_module(MODULE)
    except Exception:
        return False
    return True


def require() -> None:
    try:
        importlib.import_module(MODULE)
    except Exception as exc:
        raise RuntimeError(
            f"device 'spyre' needs IBM's Spyre software stack: the Python module {MODULE!r} "
            f"(which provides the {BACKEND!r} torch.compile backend) could not be imported "
            f"({type(exc).__name__}: {exc}). Install the Spyre stack, or set device to cpu or cuda."
        ) from None


def compile_backend() -> str:
    require()
    return BACKEND
