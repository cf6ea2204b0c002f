#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py): the main job on one GPU over NCCL, killed and resumed, exported, sampled in
# the four modes eager and compiled, benchmarked; prints ONE JSON, also written to $OUT/gpu_check.json if OUT is set.
#
#   bash scripts/gpu_check.sh                  # on a machine with a GPU: <= ~10 min
#   bash scripts/gpu_check.sh --cpu-dry-run    # the same stages on CPU (gloo, tiny settings): tests the check
#
# Python, in this order: $FASTARDIFF_PYTHON; the repo's .venv; else python3 if it imports the project's needs;
# else python3 plus wheels from ./.whl (offline: a GPU box that reaches no registry; make them with
# scripts/gpu_wheels.sh); else the README's install (a venv at .venv; --system-site-packages when python3 already
# has torch, so a CUDA torch is kept). The project itself is never installed: it runs from this folder (PYTHONPATH).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
NEEDS="import torch, deepspeed, transformers, safetensors, sentencepiece, PIL, yaml, tqdm, pyarrow, scipy, numpy"
NEEDS="$NEEDS, braceexpand, webdataset"
log() { echo "[gpu_check.sh] $*" >&2; }

fail_json() {  # the environment could not be set up: still print one JSON (and write it to $OUT)
  local msg="${1//\\/\\\\}"
  msg="${msg//\"/\'}"
  local json="{\"check\": \"fastardiff-ds gpu_check\", \"complete\": false, \"ok\": false, \"failed\": [\"environment\"],"
  json="$json \"stages\": {\"environment\": {\"ok\": false, \"error\": \"${msg//$'\n'/ }\"}}}"
  [ -n "${OUT:-}" ] && mkdir -p "$OUT" && echo "$json" > "$OUT/gpu_check.json"
  echo "$json"
  exit 1
}

imports_ok() { "$1" -c "$NEEDS" >/dev/null 2>&1; }

pick_python() {
  if [ -n "${FASTARDIFF_PYTHON:-}" ]; then PY="$FASTARDIFF_PYTHON"; return; fi
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; return; fi
  PY="$(command -v python3 || command -v python || true)"
  [ -n "$PY" ] || fail_json "no python3 on PATH and no .venv in $ROOT"
  imports_ok "$PY" && return
  if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
    local site="${TMPDIR:-/tmp}/fastardiff_gpu_check_site"
    log "$PY lacks some of the project's needs: installing ./.whl offline into $site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      "$ROOT"/.whl/*.whl >&2 \
      || fail_json "pip could not install ./.whl into $site (see stderr)"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    return
  fi
  local sys_site=""
  "$PY" -c "import torch" >/dev/null 2>&1 && sys_site="--system-site-packages"
  log "no .venv and $PY lacks some of the project's needs: the README install" \
      "(python -m venv $sys_site .venv && pip install -e '.[test]')"
  "$PY" -m venv $sys_site .venv >&2 && .venv/bin/python -m pip install -q -e ".[test]" >&2 \
    || fail_json "the README install failed (no network? then bring wheels in ./.whl, see scripts/gpu_wheels.sh)"
  PY="$ROOT/.venv/bin/python"
}

pick_python
imports_ok "$PY" || fail_json "$PY cannot import the project's needs: $("$PY" -c "$NEEDS" 2>&1 | tail -1)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
log "python: $PY"
"$PY" "$ROOT/scripts/gpu_check.py" "$@"
rc=$?
# a crash of the driver itself (not of a stage) would leave no JSON: say so in one
[ $rc -le 1 ] || fail_json "scripts/gpu_check.py crashed with exit code $rc (its stderr is above)"
exit $rc
