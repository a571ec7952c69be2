"""The GPU check (tools/gpu_check, issue 31 item 7) without a GPU: the device call it prepares fits
the device tool's limits, its carried wheels cover what it imports, its phases keep to their
budget, and its dry run (the same script with --device cpu on a small random checkpoint it builds)
gives transformers' tokens exactly and sane load figures."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tools.gpu_check import prepare, wheels
from tools.gpu_check.__main__ import Run, parser

ROOT = Path(__file__).resolve().parents[1]
# a 0.5 M-parameter checkpoint in bf16, like the 2b preset; init_std 1.0 so that its greedy tokens
# vary with the prompt (at 0.02 every answer is one token repeated, and exactness would say little)
SMALL_BUILD = ("--vision-hidden 32 --vision-heads 2 --text-hidden 64 --text-layers 2 --text-heads 4 "
               "--text-kv-heads 2 --crop 56 --dtype bfloat16 --no-verify --init-std 1.0")


def test_the_device_call_fits_one_run():
    call = prepare.run_call()
    assert len(call["command"]) < prepare.COMMAND_LIMIT == 2000
    assert call["carry"] == [".whl"]
    assert (ROOT / call["command"].split()[1]).exists()  # bash scripts/gpu_check.sh ...
    own_budget = parser().parse_args([]).budget_s
    assert own_budget + 60 <= call["timeout_s"] <= 600  # its own deadline comes first
    assert own_budget <= 8 * 60


def test_the_carried_wheels_cover_every_third_party_import():
    found = wheels.third_party_imports()
    assert {"fms", "torch", "transformers"} <= set(found)  # the scan sees the engine's imports
    assert wheels.uncovered() == {}, "add these to CARRIED (pinned) or, if the machine has them, ON_THE_MACHINE"
    pins = {line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()}
    assert set(wheels.CARRIED.values()) <= pins  # the versions the project is tested with


def test_prepare_keeps_one_version_of_each_wheel_and_downloads_only_what_is_missing(tmp_path):
    old = tmp_path / "ibm_fms-1.12.0-py3-none-any.whl"
    pinned = tmp_path / "ibm_fms-1.13.1-py3-none-any.whl"
    other = tmp_path / "something_else-1.0-py3-none-any.whl"
    for f in (old, pinned, other):
        f.write_bytes(b"")
    assert prepare.download(pins=("ibm-fms==1.13.1",), into=tmp_path) == [pinned]  # no pip: it is there
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([pinned.name, other.name])
    assert prepare.wheel_name("Ibm-Fms==1.13.1") == ("ibm_fms", "1.13.1")


def test_a_phase_past_the_deadline_is_stopped_and_the_rest_skipped(tmp_path):
    args = argparse.Namespace(budget_s=2.0, out=tmp_path)
    run = Run(args, {"phases": {}}, min_phase_s=0.5)
    run.log_path.write_text("")
    started = time.monotonic()
    slow = run.phase("slow", "timeit", "-n", "1", "-r", "1", "import time; time.sleep(30)")
    assert slow["status"] == "timed_out" and time.monotonic() - started < 10
    assert run.phase("next", "timeit", "-n", "1", "pass")["status"] == "skipped"
    saved = json.loads((tmp_path / "gpu-check.json").read_text())
    assert [p["status"] for p in saved["phases"].values()] == ["timed_out", "skipped"]
    assert "===== slow: python -m timeit" in (tmp_path / "gpu-check.log").read_text()


def test_the_dry_run_on_the_cpu_equals_transformers_and_measures_the_load(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    done = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--device", "cpu", "--out", str(out), "--workdir", str(work),
         "--build", SMALL_BUILD, "--levels", "1", "4", "--requests-per-client", "2", "--max-tokens", "8",
         "--exact-tokens", "8", "--backends", "eager", "--budget-s", "240"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PY": sys.executable})
    report = json.loads((out / "gpu-check.json").read_text())
    assert done.returncode == 0, done.stdout[-3000:] + (out / "gpu-check.log").read_text()[-3000:]
    assert report["ok"] and report["environment"]["versions"]["ibm-fms"]
    assert {name: p["status"] for name, p in report["phases"].items()} == {
        "build": "ok", "reference": "ok", "exact": "ok", "load_eager": "ok"}

    exact = report["phases"]["exact"]
    assert exact["exact"] and exact["dtype"] == "float32" and exact["compile_backend"] == "eager"
    for prompt in exact["prompts"]:
        assert prompt["token_ids"] == prompt["reference_token_ids"] and len(prompt["token_ids"]) == 8
        assert prompt["num_input_tokens"] == prompt["reference_input_tokens"] > 100  # the image's placeholders
        assert prompt["max_logprob_diff"] <= 1e-3
    answers = [tuple(p["reference_token_ids"]) for p in exact["prompts"]]
    assert len(set(answers)) == len(answers) and len(set(answers[0])) > 1  # the oracle says something

    load = report["phases"]["load_eager"]
    assert load["dtype"] == "bfloat16"  # the checkpoint's own, as served by default
    assert [lv["concurrency"] for lv in load["levels"]] == [1, 4]
    for level in load["levels"]:
        assert level["errors"] == 0 and level["requests"] == 2 * level["concurrency"]
        assert level["output_tokens"] == 8 * level["requests"]  # ignore_eos: every request runs to max_tokens
        assert 0 < level["ttft_s"]["p50"] <= level["ttft_s"]["max"] <= level["wall_s"]
        assert 0 < level["itl_ms"]["p50"] <= level["itl_ms"]["max"]
        assert abs(level["tokens_per_s"] * level["wall_s"] / level["output_tokens"] - 1) < 0.15  # wall_s is rounded
    assert '"exact": true' in done.stdout  # the summary the call's reply shows
