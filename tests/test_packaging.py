"""Checks on files that cannot be exercised here (no Docker engine): they must agree with the project."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pins(text: str) -> dict[str, str]:
    found = {}
    for line in text.splitlines():
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s;#]+)", line)
        if m:
            found[m.group(1).lower()] = m.group(2)
    return found


def test_docker_image_is_triton_2_51_and_uses_the_project_pins():
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM nvcr\.io/nvidia/tritonserver:24\.10-py3\s*$", dockerfile, re.M)  # Triton 2.51
    assert "-r requirements-docker.txt" in dockerfile and "requirements.txt" in dockerfile
    assert "--shm-size" in dockerfile
    project = pins((ROOT / "requirements.txt").read_text())
    assert project["tritonclient"] == "2.51.0" and project["nvidia-pytriton"] == "0.7.0"
    assert project["numpy"].startswith("1.")  # the 2.51 stub needs numpy 1.x
    # every pin installed in the image is the project's own (the image only drops the server wheels)
    dropped = re.search(r"grep -vE '\^\(([^)]*)\)==", dockerfile).group(1).split("|")
    assert set(dropped) == {"nvidia-pytriton", "nvidia-cuda-runtime-cu12"}
    assert not pins(dockerfile)  # no second, divergent pin list inside the Dockerfile


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    first_commands = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, re.S)[0]
    assert "make serve" in first_commands and "make test" in first_commands
