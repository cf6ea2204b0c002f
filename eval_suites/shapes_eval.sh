#!/usr/bin/env bash
# One inference mode of a tiny-preset checkpoint through all three suites on the synthetic shapes domain:
# shapes-GenEval (all 164 held-out prompts x 4 images; SHAPES_LIMIT=N for an evenly spread N-prompt subset), domain
# FID against shapes reference renders (per GenEval tag), tiny-CLIP score. The README's per-mode quality tables were
# made with it; the noise level of a row is the spread between two seeds of the same exact mode (--seed 1).
#
#   bash eval_suites/shapes_eval.sh CKPT OUTDIR MODE [--set inference.key=value ...]
#   bash eval_suites/shapes_eval.sh runs/bench_joint/export runs/eval/fastardiff fastardiff
#   bash eval_suites/shapes_eval.sh assets/tiny_teacher runs/eval/baseline_s1 baseline --seed 1
#
# Writes OUTDIR/images (GenEval layout), OUTDIR/{geneval,fid,clip}.json with plots. The reference renders and their
# feature statistics are made once under ${SHAPES_REF:-runs/eval/shapes_ref_n100} and ${SHAPES_STATS:-runs/eval/stats}.
set -euo pipefail
if [ $# -lt 3 ]; then sed -n 2,9p "$0"; exit 2; fi
ckpt=$1; out=$2; mode=$3; shift 3
ref=${SHAPES_REF:-runs/eval/shapes_ref_n100}; stats=${SHAPES_STATS:-runs/eval/stats}
[ -f "$ref/meta_data.json" ] || python -m eval_suites.shapes_reference --out "$ref" --n-per-category 100
python -m eval_suites.geneval generate --metadata shapes --ckpt "$ckpt" --mode "$mode" --outdir "$out/images" \
    --limit "${SHAPES_LIMIT:-0}" --threads 1 "$@"
python -m eval_suites.geneval score --images "$out/images" --detector shapes --out "$out/geneval.json"
python -m eval_suites.mjhq_fid score --images "$out/images" --mjhq-root "$ref" --features shapes --category-key tag \
    --stats-cache "$stats" --out "$out/fid.json"
python -m eval_suites.clip_score score --images "$out/images" --clip-model shapes --out "$out/clip.json"
