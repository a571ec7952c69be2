"""The GPU check, on the machine that runs it: build the checkpoint, transformers' fp32 answers, the
engine's fp32 answers against them token for token, then the engine's TTFT, ITL and tokens/s at
each concurrency in the checkpoint's dtype, eager and with the device's default compile backend.

    python -m tools.gpu_check --out DIR [--device cuda|cpu] [--checkpoint DIR] [--build ARGS] ...

Each phase is a process of its own (a model's memory is gone when the next one loads) under one
time budget: a phase still running at the deadline is stopped and reported as timed out, later
ones as skipped. ``DIR/gpu-check.json`` is rewritten after every phase, so a call cut short still
returns what was measured; ``DIR/gpu-check.log`` holds every phase's output. Exit: 0 when the
tokens are exact and every load ran without errors, 1 otherwise, 2 without the device asked for.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRESET_BUILD = "--preset granite-vision-3.2-2b"  # bf16, the published model's shapes
DISTRIBUTIONS = ("torch", "transformers", "ibm-fms", "tokenizers", "safetensors", "numpy", "pillow")
MIN_PHASE_S = 20  # a phase is not started with less time than this left


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "results" / "gpu-check"),
                   help="where gpu-check.json and gpu-check.log go (default: $OUT, else results/gpu-check)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: the dry run")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "gpu-check",
                   help="the checkpoint and phase files (default: gpu-check in the temporary folder)")
    p.add_argument("--checkpoint", type=Path, help="default: WORKDIR/checkpoint")
    p.add_argument("--build", default=PRESET_BUILD,
                   help="tools.tiny_checkpoint.random_checkpoint's arguments for the checkpoint ('': use it as it is)")
    p.add_argument("--budget-s", type=float, default=450.0, help="all phases together")
    p.add_argument("--exact-tokens", type=int, default=16)
    p.add_argument("--levels", type=int, nargs="+", default=[1, 16])
    p.add_argument("--requests-per-client", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--backends", nargs="*", default=["eager", "default"],
                   help="compile backends of the load phases, in order ('default': the device's own choice)")
    return p


def refuse_without_cuda(device: str) -> str:
    """The GPU's name; exits 2 at once where the device asked for is not there."""
    import torch

    if device == "cpu":
        return platform.processor() or platform.machine()
    if not torch.cuda.is_available():
        print(f"gpu_check: torch {torch.__version__} sees no CUDA device (CUDA build: {torch.version.cuda}); this "
              "check needs a CUDA GPU (`--device cpu` is its dry run). On the CPU, `make test-full-size` checks "
              "the same exactness.", file=sys.stderr)
        sys.exit(2)
    return torch.cuda.get_device_name(0)


def environment(device: str, processor: str) -> dict:
    import torch

    versions = {}
    for name in DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    manifest = ROOT / ".whl" / "manifest.json"  # written by tools.gpu_check.prepare, where the wheels came from
    return {"device": device, "processor": processor, "python": platform.python_version(), "cuda": torch.version.cuda,
            "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if device == "cuda" else None,
            "cpu_count": os.cpu_count(), "versions": versions,
            "prepared": json.loads(manifest.read_text()) if manifest.exists() else None}


class Run:
    """The phases under one deadline, and the report they fill."""

    def __init__(self, args: argparse.Namespace, report: dict, min_phase_s: float = MIN_PHASE_S):
        self.args, self.report, self.min_phase_s = args, report, min_phase_s
        self.started = time.monotonic()
        self.deadline = self.started + args.budget_s
        self.json_path, self.log_path = args.out / "gpu-check.json", args.out / "gpu-check.log"

    def save(self) -> None:
        self.report["wall_s"] = round(time.monotonic() - self.started, 1)
        self.json_path.write_text(json.dumps(self.report, indent=1) + "\n")

    def phase(self, name: str, module: str, *argv: str, result: Path | None = None) -> dict:
        left = self.deadline - time.monotonic()
        if left < self.min_phase_s:
            return self._record(name, {"status": "skipped", "why": f"{left:.0f} s of the budget left"})
        print(f"gpu_check: {name} ({left:.0f} s of the budget left)", flush=True)
        started = time.monotonic()
        with self.log_path.open("a") as log:
            log.write(f"\n===== {name}: python -m {module} {shlex.join(argv)}\n")
            log.flush()
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            # a session of its own: at the deadline its whole group goes (inductor's compile workers too)
            child = subprocess.Popen([sys.executable, "-m", module, *argv], cwd=ROOT, stdout=log,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                status = "ok" if child.wait(timeout=left) == 0 else "failed"
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                status = "timed_out"
        found = json.loads(result.read_text()) if result is not None and result.exists() else {}
        record = {"status": status, "seconds": round(time.monotonic() - started, 1), **found}
        if status != "ok":
            self._show_tail(name)
        return self._record(name, record)

    def _record(self, name: str, record: dict) -> dict:
        self.report["phases"][name] = record
        self.save()
        print(f"gpu_check: {name}: {record['status']} ({record.get('seconds', 0)} s)", flush=True)
        return record

    def _show_tail(self, name: str, lines: int = 40) -> None:
        """The end of a failed phase's output, where the call's reply shows it."""
        text = self.log_path.read_text(errors="replace").rsplit(f"===== {name}:", 1)[-1]
        print("\n".join(text.splitlines()[-lines:]), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    processor = refuse_without_cuda(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint or args.workdir / "checkpoint"
    for stale in args.workdir.glob("*.json"):
        stale.unlink()  # a phase's result is read back only if this run wrote it
    report = {"ok": False, "budget_s": args.budget_s, "checkpoint": str(checkpoint), "build": args.build,
              "environment": environment(args.device, processor), "phases": {}}
    run = Run(args, report)
    run.log_path.write_text("")
    common = ["--checkpoint", str(checkpoint), "--device", args.device]
    built = not args.build or run.phase("build", "tools.tiny_checkpoint.random_checkpoint",
                                        *shlex.split(args.build), "--out", str(checkpoint))["status"] == "ok"
    reference, exact = args.workdir / "reference.json", args.workdir / "exact.json"
    answered = built and run.phase("reference", "tools.gpu_check.reference", *common, "--tokens",
                                   str(args.exact_tokens), "--out", str(reference), result=reference)["status"] == "ok"
    ok = answered and run.phase("exact", "tools.gpu_check.engine_phase", "exact", *common, "--reference",
                                str(reference), "--out", str(exact), result=exact).get("exact", False)
    for backend in args.backends if built else ():  # timed even where the tokens differ: separate findings
        out = args.workdir / f"load_{backend}.json"
        ok = run.phase(f"load_{backend}", "tools.gpu_check.engine_phase", "load", *common, "--backend",
                       "" if backend == "default" else backend, "--levels", *map(str, args.levels),
                       "--requests-per-client", str(args.requests_per_client), "--max-tokens", str(args.max_tokens),
                       "--out", str(out), result=out)["status"] == "ok" and ok
    report["ok"] = ok
    run.save()
    print(json.dumps(summary(report), indent=1))
    return 0 if ok else 1


def summary(report: dict) -> dict:
    """The figures worth reading in the call's reply (the whole report is gpu-check.json)."""
    phases = report["phases"]
    short = {"ok": report["ok"], "wall_s": report["wall_s"], "gpu": report["environment"]["processor"],
             "phases": {name: p["status"] for name, p in phases.items()},
             "exact": phases.get("exact", {}).get("exact")}
    for name, p in phases.items():
        for level in p.get("levels", []):
            short[f"{name}_c{level['concurrency']}"] = {
                "ttft_p50_s": level["ttft_s"].get("p50"), "itl_p50_ms": level["itl_ms"].get("p50"),
                "tokens_per_s": level["tokens_per_s"], "errors": level["errors"]}
    return short


if __name__ == "__main__":
    sys.exit(main())
