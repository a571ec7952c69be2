#!/usr/bin/env bash
# N local replicas (tritonserver + OpenAI front each) behind HAProxy, on one machine:
#   scripts/serve_replicas.sh 2 [--checkpoint DIR] [-- extra tritonserver flags]
# Sets up first (venv, Triton, haproxy); see spyre_backend/server/replicas.py for the ports.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
  echo "usage: $0 N [--checkpoint DIR] [--base-port 18000] [-- tritonserver flags]" >&2
  exit 2
fi
bash scripts/setup.sh
exec .venv/bin/python -m spyre_backend.server.replicas "$@"
