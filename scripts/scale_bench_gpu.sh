#!/usr/bin/env bash
# Issue 26 on one GPU (<= ~8 min on an H100): NextStep-1.1 at its full shape with random weights, bf16, eager and
# CUDA-graphed (sampling/compiled.py reduce-overhead), a 256-token prefix of the 1024 extrapolated by the cost
# model (said in the JSON), then the same at --scale 0.5 over all 1024 tokens as a check of the extrapolation.
# Writes $OUT/scale_gpu.json and $OUT/scale_gpu_half.json (each rewritten after every execution, so a run cut
# short keeps what it measured). A shape that does not fit is refused before allocation (planned vs free bytes).
#
#   bash scripts/scale_bench_gpu.sh               # on the GPU machine
#   bash scripts/scale_bench_gpu.sh --cpu-dry-run # here: the same commands at the smallest scale on CPU, seconds
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${FASTARDIFF_PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-$ROOT/runs/scale_gpu}"
mkdir -p "$OUT"
if [ "${1:-}" = "--cpu-dry-run" ]; then
  "$PY" launcher/bench_scale.py --cpu-dry-run --json "$OUT/scale_gpu.json" || exit 1
  exec "$PY" launcher/bench_scale.py --cpu-dry-run --scale 0.05 --json "$OUT/scale_gpu_half.json"
fi
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 1
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv >&2 || true
timeout 330 "$PY" launcher/bench_scale.py --shape nextstep-1.1 --scale 1.0 --exec eager cudagraphs \
  --tokens 256 --reps 10 --json "$OUT/scale_gpu.json"
rc=$?
timeout 150 "$PY" launcher/bench_scale.py --shape nextstep-1.1 --scale 0.5 --exec cudagraphs --reps 10 \
  --accept 0.4 0.8 --json "$OUT/scale_gpu_half.json"
exit $rc
