"""Locate the Triton 2.51 server shipped in the nvidia-pytriton wheel and make it usable.

The wheel carries the server, the Python backend and one backend stub per Python version;
the backend looks for ``triton_python_backend_stub`` beside ``libtriton_python.so``, so the
stub matching this interpreter is copied there (inside the venv, keeping the wheel's layout
so the binaries still find their bundled libraries through a relative RPATH).
"""

from __future__ import annotations

import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TritonInstall:
    root: Path  # .../pytriton/tritonserver

    @property
    def server_binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def backends_dir(self) -> Path:
        return self.root / "backends"

    @property
    def stub(self) -> Path:
        return self.backends_dir / "python" / "triton_python_backend_stub"


def find_triton() -> TritonInstall:
    try:
        import pytriton  # noqa: F401  (only to find the wheel's files)
    except ImportError as exc:  # pragma: no cover - setup problem
        raise RuntimeError("nvidia-pytriton is not installed; run `make setup`") from exc
    root = Path(pytriton.__file__).resolve().parent / "tritonserver"
    install = TritonInstall(root)
    if not install.server_binary.exists():
        raise RuntimeError(f"tritonserver binary not found in the pytriton wheel at {root}")
    return install


def libpython_dir() -> str:
    """Directory of libpython3.X.so of the interpreter the venv was made from (the stub links it)."""
    return sysconfig.get_config_var("LIBDIR") or ""


def install_stub(install: TritonInstall | None = None) -> Path:
    install = install or find_triton()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    source = install.root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not source.exists():
        raise RuntimeError(f"the pytriton wheel has no Python-backend stub for Python {version}")
    if not install.stub.exists() or install.stub.stat().st_size != source.stat().st_size:
        shutil.copy2(source, install.stub)
    return install.stub


def perf_analyzer_env() -> dict[str, str]:
    """LD_LIBRARY_PATH additions perf_analyzer needs (libcudart from nvidia-cuda-runtime-cu12)."""
    try:
        import nvidia.cuda_runtime as cr

        lib = str(Path(list(cr.__path__)[0]) / "lib")
    except ImportError:
        lib = ""
    return {"LD_LIBRARY_PATH": lib}


if __name__ == "__main__":
    stub = install_stub()
    print(f"[setup] Triton Python-backend stub for Python {sys.version_info.major}.{sys.version_info.minor}: {stub}")
