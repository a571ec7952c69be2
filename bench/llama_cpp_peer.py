"""The second peer: llama.cpp's ``llama-server`` (what Ollama runs granite3.2-vision on), on the CPU.

Built on first use from the llama.cpp tree vendored in the ``llama-cpp-python`` sdist (pinned
below; the repository itself is too large to fetch here), offline flags, only the server target,
cached under ``results/peer/llama-build/`` (never by ``make test``). A checkpoint is converted once
per weight type into ``results/peer/gguf/<name>/`` the way llama.cpp's granite-vision guide says:
the LLM through ``convert_hf_to_gguf.py``, the SigLIP tower and projector through the legacy
image-encoder converter (both with the mends in ``bench/llama_cpp_mends.py``). Facts found while
setting it up: ``../shared/notes/llama-cpp-peer.md``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bench.peer_process import stop_group, wait_until_ready
from spyre_backend import PROJECT_ROOT

LLAMA_CPP_PYTHON = "0.3.36"  # the sdist whose vendor/llama.cpp is built
PEER_DIR = PROJECT_ROOT / "results" / "peer"
HOME = PEER_DIR / "llama-src"  # the sdist and its unpacked tree
SOURCE = HOME / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
BUILD = PEER_DIR / "llama-build"
SERVER = BUILD / "bin" / "llama-server"
# Native, but without AMX: on these machines ggml's AMX kernels (q8_0 weights) die with SIGILL on
# their first tile instruction (`tilezero`, seen 2026-12-07); f16 never uses them.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_WEBUI=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DGGML_NATIVE=ON",
               f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"]
WEIGHT_TYPES = ("f16", "q8_0")
# what the converters import beyond the project's venv, installed beside it (never into it)
CONVERTER_PACKAGES = ("sentencepiece==0.2.1",)
CONVERTER_SITE = PEER_DIR / "llama-py"


# -- build -------------------------------------------------------------------------------------------
def ensure_built(log=print) -> Path:
    """``llama-server``, built if it is not yet (about 8 minutes on 2 cores)."""
    stamp, want = BUILD / ".peer-ready", " ".join([LLAMA_CPP_PYTHON, *CMAKE_FLAGS])
    if SERVER.exists() and stamp.exists() and stamp.read_text().strip() == want:
        return SERVER
    if not SOURCE.exists():
        log(f"llama.cpp: downloading the llama-cpp-python {LLAMA_CPP_PYTHON} sdist (77 MB) for its vendored tree")
        HOME.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
                        "--no-binary", ":all:", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(HOME)], check=True)
        with tarfile.open(HOME / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz") as tar:
            tar.extractall(HOME, filter="data")
    build_log = PEER_DIR / "llama-build.log"
    log(f"llama.cpp: building llama-server in {BUILD} (first use only, minutes; log: {build_log})")
    with open(build_log, "w") as out:
        subprocess.run(["cmake", "-S", str(SOURCE), "-B", str(BUILD), *CMAKE_FLAGS], check=True, stdout=out,
                       stderr=subprocess.STDOUT)
        subprocess.run(["cmake", "--build", str(BUILD), f"-j{os.cpu_count()}", "--target", "llama-server"],
                       check=True, stdout=out, stderr=subprocess.STDOUT)
    stamp.write_text(want)
    return SERVER


# -- conversion --------------------------------------------------------------------------------------
def _tensors(checkpoint: Path):
    """(name, tensor) of every weight of a checkpoint, single-file or sharded."""
    files = sorted(checkpoint.glob("model*.safetensors"))
    for path in files:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def split_checkpoint(checkpoint: Path, out: Path) -> tuple[Path, Path]:
    """The LLaVA-Next checkpoint as llama.cpp's converters want it: a Granite LLM folder, and a
    SigLIP folder with ``pytorch_model.bin`` (fp32) and ``llava.projector`` (docs/multimodal/granitevision.md)."""
    config = json.loads((checkpoint / "config.json").read_text())
    llm, vision = out / "llm", out / "vision"
    for d in (llm, vision):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    text, tower, projector = {}, {}, {}
    for key, t in _tensors(checkpoint):
        if key.startswith("language_model."):
            text[key.removeprefix("language_model.")] = t
        elif key.startswith("vision_tower."):
            tower[key.removeprefix("vision_tower.")] = t.float()
        elif key.startswith("multi_modal_projector.") or key == "image_newline":
            projector[key] = t.float()
    if config.get("tie_word_embeddings", config["text_config"].get("tie_word_embeddings")):
        text.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in text.items()}, str(llm / "model.safetensors"), metadata={"format": "pt"})
    (llm / "config.json").write_text(json.dumps({**config["text_config"], "architectures": ["GraniteForCausalLM"],
                                                 "model_type": "granite"}, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (checkpoint / name).exists():
            shutil.copy(checkpoint / name, llm / name)
    torch.save(tower, vision / "pytorch_model.bin")
    torch.save(projector, vision / "llava.projector")
    v = config["vision_config"]
    (vision / "config.json").write_text(json.dumps({
        "architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model",
        "image_grid_pinpoints": config["image_grid_pinpoints"], "mm_patch_merge_type": "spatial_unpad",
        "hidden_size": v["hidden_size"], "image_size": v["image_size"], "intermediate_size": v["intermediate_size"],
        "num_attention_heads": v["num_attention_heads"], "num_hidden_layers": v["num_hidden_layers"],
        "patch_size": v["patch_size"], "layer_norm_eps": v.get("layer_norm_eps", 1e-6),
        # "gelu" makes clip.cpp use GELU (else gelu_quick); SigLIP's gelu_pytorch_tanh is that approximation
        "hidden_act": "gelu", "projection_dim": 0, "vision_feature_layer": config["vision_feature_layer"],
    }, indent=2))
    return llm, vision


def ensure_converted(checkpoint: Path, weight_type: str, log=print) -> tuple[Path, Path]:
    """(LLM GGUF of ``weight_type``, mmproj GGUF in f16) of ``checkpoint``, converted once."""
    out = PEER_DIR / "gguf" / checkpoint.name
    llm_gguf, mmproj_gguf = out / f"llm-{weight_type}.gguf", out / "mmproj-f16.gguf"
    stamp = f"{checkpoint.resolve()} {max(p.stat().st_mtime_ns for p in checkpoint.glob('model*.safetensors'))}"
    if (out / ".converted-from").exists() and (out / ".converted-from").read_text() != stamp:
        shutil.rmtree(out)
    if llm_gguf.exists() and mmproj_gguf.exists():
        return llm_gguf, mmproj_gguf
    ensure_built(log)
    out.mkdir(parents=True, exist_ok=True)
    log(f"llama.cpp: converting {checkpoint.name} to GGUF ({weight_type})")
    if not (CONVERTER_SITE / ".ready").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                        "--target", str(CONVERTER_SITE), *CONVERTER_PACKAGES], check=True)
        (CONVERTER_SITE / ".ready").write_text(" ".join(CONVERTER_PACKAGES))
    llm_dir, vision_dir = split_checkpoint(checkpoint, out / "split")
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), str(SOURCE / "gguf-py"), str(CONVERTER_SITE)])}
    mends = [sys.executable, "-m", "bench.llama_cpp_mends"]
    subprocess.run([*mends, "llm", str(SOURCE), str(llm_dir), "--outfile", str(llm_gguf), "--outtype", weight_type],
                   check=True, env=env, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL)
    if not mmproj_gguf.exists():
        subprocess.run([*mends, "mmproj", str(SOURCE), "-m", str(vision_dir),
                        "--llava-projector", str(vision_dir / "llava.projector"), "--output-dir", str(vision_dir),
                        "--clip-model-is-vision", "--clip-model-is-siglip",
                        "--image-mean", "0.5", "0.5", "0.5", "--image-std", "0.5", "0.5", "0.5"],
                       check=True, env=env, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL)
        shutil.move(vision_dir / "mmproj-model-f16.gguf", mmproj_gguf)
    shutil.rmtree(out / "split")
    (out / ".converted-from").write_text(stamp)
    return llm_gguf, mmproj_gguf


# -- the server --------------------------------------------------------------------------------------
class LlamaServer:
    """``llama-server`` with our chat template (the GGUF carries none, and llama.cpp's built-in Granite
    template is not the checkpoint's), ``slots`` parallel sequences, ``threads`` threads."""

    def __init__(self, exe: Path, llm: Path, mmproj: Path, chat_template: Path, port: int, threads: int,
                 slots: int, log_path: Path, context: int = 4096):
        self.exe, self.llm, self.mmproj, self.chat_template = exe, llm, mmproj, chat_template
        self.port, self.threads, self.slots, self.log_path, self.context = port, threads, slots, log_path, context
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 300) -> float:
        started = time.monotonic()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")
        # -c is shared by the slots: each gets context tokens of its own
        self.proc = subprocess.Popen(
            [str(self.exe), "-m", str(self.llm), "--mmproj", str(self.mmproj), "--host", "127.0.0.1",
             "--port", str(self.port), "-c", str(self.context * self.slots), "-np", str(self.slots),
             "-t", str(self.threads), "--metrics", "--jinja", "--chat-template-file", str(self.chat_template),
             "--alias", "peer", "--no-webui"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return wait_until_ready(self.proc, self.port, "/health", timeout_s, "llama-server", self.log_path, started,
                                poll_s=0.5)

    def stop(self) -> int | None:
        return stop_group(self.proc, signal.SIGTERM, 30)
