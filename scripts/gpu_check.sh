#!/usr/bin/env bash
# The GPU check of issue 31 (tools/gpu_check), made for the device tool's lent machine as it is
# (its own python3, torch and transformers; no network, no tritonserver):
#   bash scripts/gpu_check.sh prepare     here: the wheels it lacks into .whl/, the size check, and
#                                         the one `run` call to make (command, carry, timeout)
#   bash scripts/gpu_check.sh [ARGS]      there: python -m tools.gpu_check ARGS (--out DIR, --help);
#                                         refuses at once (exit 2) without CUDA unless --device cpu
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if [ "${1:-}" = prepare ]; then
  shift
  exec "$PY" -m tools.gpu_check.prepare "$@"
fi
# the carried wheels, where this python lacks them (the lent machine; never the project's venv)
if compgen -G ".whl/*.whl" >/dev/null && ! "$PY" -m tools.gpu_check.wheels --missing; then
  SITE=${GPU_CHECK_SITE:-${TMPDIR:-/tmp}/gpu-check-site}
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PY" -m tools.gpu_check "$@"
