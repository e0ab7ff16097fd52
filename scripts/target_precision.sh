#!/bin/bash
# The MEMIT family's target steps in the model's fp32 and on a bf16 copy (`targets.precision`), issue 16's two
# N = 20 tables (the first 20 CounterFact records, and the first 20 the unedited model already answers), one
# command after another in one sitting: run it with nothing else on the machine.
# usage: scripts/target_precision.sh [OUT_DIR] [extra --set ...]   (default docs/; writes OUT_DIR/bench_precision_*.json)
set -euo pipefail
OUT=${1:-docs}
shift || true
DATA=../shared/data/counterfact/counterfact_500.rome.json
KNOWN=out/known20.json
mkdir -p out
[ -s "$KNOWN" ] || kedit bench known --model smollm2-135m --data $DATA --n 20 --out $KNOWN
for data in first known; do
    file=$DATA; [ $data = known ] && file=$KNOWN
    for method in memit alphaedit; do
        for precision in model bfloat16; do
            kedit bench editors --model smollm2-135m --data $file --methods $method --n 20 --batch-size 10 \
                --set $method.targets.precision=$precision "$@" --json "$OUT/bench_precision_${data}_${method}_${precision}.json"
        done
    done
done
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
for data in ("first", "known"):
    for method in ("memit", "alphaedit"):
        row = {}
        for p in ("model", "bfloat16"):
            r = json.load(open(f"{out}/bench_precision_{data}_{method}_{p}.json"))["results"][method]
            row[p] = r
            print(f"{data:5} {method:9} {p:8} {r['seconds_per_edit']:.2f} s/edit",
                  " ".join(f"{k} {r[k]:.3f}" for k in ("efficacy", "generalization", "specificity", "fluency")))
        print(f"      speed-up {row['model']['seconds_per_edit'] / row['bfloat16']['seconds_per_edit']:.2f}x")
PY
