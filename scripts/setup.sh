#!/usr/bin/env bash
# One-step, idempotent setup: a project-local virtualenv with pinned packages, the Triton 2.51
# server tree from the nvidia-pytriton wheel with the Python-backend stub for this Python, and
# the one system library perf_analyzer needs. Re-running only redoes what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv

# System packages from Debian: libb64-0d (perf_analyzer, from the tritonclient wheel, links
# against libb64.so.0d) and haproxy (the proxy in front of several replicas: scripts/serve_replicas.sh).
missing=()
ldconfig -p 2>/dev/null | grep -q 'libb64.so.0d' || missing+=(libb64-0d)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
if [ ${#missing[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing Debian package(s) ${missing[*]}"
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "[setup] warning: ${missing[*]} missing and cannot be installed here (needs root and apt-get):" \
         "perf_analyzer and the replicas behind HAProxy will not run" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi

# Reinstall only when requirements.txt changed since the last successful install.
stamp="$VENV/.requirements.sha256"
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing pinned packages (torch CPU build from local disk where available)"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r requirements.txt
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -e .
  echo "$want" > "$stamp"
fi

# The pytriton wheel ships stubs per Python version; the Python backend looks for the stub
# next to libtriton_python.so, so copy the one matching the venv's Python there.
"$VENV/bin/python" -m spyre_backend.server.triton_install
# The decode kernel, compiled for this CPU once (spyre_backend/device/cpu_kernels.py).
"$VENV/bin/python" -m spyre_backend.device.cpu_kernels
echo "[setup] ready"
