"""Here, before a session that is lent a GPU machine: the wheels that machine lacks into ``.whl/``
(pinned, built for its Python), a check that the working tree and the wheels fit what one call
carries, and the one call to make, printed as the device tool's ``run`` arguments.

    bash scripts/gpu_check.sh prepare        (the same as python -m tools.gpu_check.prepare)

The machine's own torch and transformers are used as they are (wheels of those would not fit).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

from tools.gpu_check.wheels import CARRIED, CARRIED_DEPENDENCIES, ROOT

WHEEL_DIR = ROOT / ".whl"
TRAVEL_LIMIT = 64 * 2**20  # the working tree and the carried paths, one call
MACHINE_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
COMMAND_LIMIT = 2000  # characters of one run command
RUN_TIMEOUT_S = 540  # the check's own budget is 450 s; the rest is start-up, the wheels' install and margin
RUN_COMMAND = 'bash scripts/gpu_check.sh --out "$OUT"'


def run_call() -> dict:
    """The device tool's ``run`` arguments for the whole check, in one call."""
    return {"command": RUN_COMMAND, "carry": [WHEEL_DIR.name], "timeout_s": RUN_TIMEOUT_S}


def wheel_name(pin: str) -> tuple[str, str]:
    """'ibm-fms==1.13.1' -> ('ibm_fms', '1.13.1'): how the wheel's file name starts."""
    name, version = pin.split("==")
    return re.sub(r"[-_.]+", "_", name).lower(), version


def download(pins=(*CARRIED.values(), *CARRIED_DEPENDENCIES), into: Path = WHEEL_DIR) -> list[Path]:
    """One wheel per pin for the machine's Python; other versions of the same package are removed
    (two versions stop the whole install there)."""
    into.mkdir(exist_ok=True)
    wheels = []
    for pin in pins:
        name, version = wheel_name(pin)
        for stale in into.glob("*.whl"):
            lower = stale.name.lower()
            if lower.startswith(name + "-") and not lower.startswith(f"{name}-{version}-"):
                stale.unlink()
        wanted = [w for w in into.glob("*.whl") if w.name.lower().startswith(f"{name}-{version}-")]
        if not wanted:
            platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                            "--python-version", MACHINE_PYTHON, "--implementation", "cp", *platforms, "-d", str(into),
                            pin], check=True)
            wanted = [w for w in into.glob("*.whl") if w.name.lower().startswith(f"{name}-{version}-")]
        wheels += wanted
    return wheels


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def ignore_wheel_dir() -> None:
    """``.whl/`` travels only as carried: never committed, never counted twice."""
    if subprocess.run(["git", "check-ignore", "-q", f"{WHEEL_DIR.name}/x.whl"], cwd=ROOT).returncode == 0:
        return
    exclude = ROOT / git("rev-parse", "--git-path", "info/exclude").strip()
    exclude.parent.mkdir(parents=True, exist_ok=True)
    with exclude.open("a") as f:
        f.write(f"/{WHEEL_DIR.name}/\n")


def travelling_bytes() -> int:
    """What one call sends: tracked and untracked-but-not-ignored files, shared/ if the checkout
    has one, and the carried wheel folder."""
    names = git("ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    files = [ROOT / n for n in names if n] + [p for d in ("shared", WHEEL_DIR.name) for p in (ROOT / d).rglob("*")]
    return sum(p.stat().st_size for p in set(files) if p.is_file() and not p.is_symlink())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.parse_args(argv)
    ignore_wheel_dir()
    wheels = download()
    commit = git("rev-parse", "HEAD").strip()
    dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    (WHEEL_DIR / "manifest.json").write_text(json.dumps(
        {"commit": commit, "uncommitted_changes": dirty, "wheels": sorted(w.name for w in wheels)}, indent=1) + "\n")
    size = travelling_bytes()
    call = run_call()
    print(f"wheels for Python {MACHINE_PYTHON}: {', '.join(w.name for w in wheels)}")
    print(f"travels: {size / 2**20:.1f} MiB of {TRAVEL_LIMIT / 2**20:.0f} MiB (working tree and {WHEEL_DIR.name}/)")
    if size > TRAVEL_LIMIT or len(call["command"]) > COMMAND_LIMIT:
        print("too large for one call: ignore or remove what need not travel", file=sys.stderr)
        return 1
    print("On a session lent a GPU machine, one call of the device tool's run, with:")
    print(json.dumps(call, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
