#!/bin/bash
# MEND's edit time against MEMIT's, one session, one command after another (run it with nothing else on the
# machine): MEND's 200 independent single edits with its frozen parts in fp32 and in bf16, then MEMIT's 20
# (7 s an edit: 20 are enough for its mean). Needs a MEND network registered for the model (kedit train mend).
# usage: scripts/mend_speed.sh [OUT_DIR]   (default docs/)
set -euo pipefail
OUT=${1:-docs}
DATA=../shared/data/counterfact/counterfact_500.rome.json
single="kedit bench editors --model smollm2-135m --data $DATA --batch-size 1 --no-sequential"
# the presets say auto (bf16 where native): the fp32 run pins both to the model's own precision
$single --methods mend --n 200 --set mend.stem_dtype=null --set mend.head_dtype=null \
    --json "$OUT/bench_mend_single_n200_fp32.json"
$single --methods mend --n 200 --set mend.stem_dtype=bfloat16 --set mend.head_dtype=bfloat16 \
    --json "$OUT/bench_mend_single_n200_bf16.json"
$single --methods memit --n 20 --json "$OUT/bench_memit_single_n20_beside_mend.json"
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
memit = json.load(open(f"{out}/bench_memit_single_n20_beside_mend.json"))["results"]["memit"]["seconds_per_edit"]
for name in ("fp32", "bf16"):
    r = json.load(open(f"{out}/bench_mend_single_n200_{name}.json"))["results"]["mend"]
    print(f"MEND {name}: {r['seconds_per_edit']:.4f} s/edit, MEMIT {memit:.2f} s/edit: {memit / r['seconds_per_edit']:.0f}x;",
          " ".join(f"{k} {r[k]:.3f}" for k in ("efficacy", "generalization", "specificity", "fluency")))
PY
