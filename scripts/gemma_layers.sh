#!/bin/bash
# Which five consecutive layers MEMIT and AlphaEdit should edit on gemma-3-270m (issue 16, item 6), chosen on
# development records only: CounterFact's train split 0-39 (never scored by a benchmark), 4 batches of 10, the
# gemma3 presets with only `layers` overridden. One command after another: run it with nothing else on the machine.
# usage: scripts/gemma_layers.sh [OUT_DIR] [FIRST_LAYERS...]   (default out/gemma_layers, first layers 1 2 3 4 5 6 8)
# writes OUT_DIR/layers_S.json per window S..S+4 and prints the table
set -euo pipefail
OUT=${1:-out/gemma_layers}
shift || true
STARTS=("$@")
[ ${#STARTS[@]} -gt 0 ] || STARTS=(1 2 3 4 5 6 8)
DATA=../shared/data/counterfact/counterfact-train.easyedit.json
mkdir -p "$OUT"
# the key statistics of every layer a window can name, in one pass (cached under $KEDIT_HOME/stats; the pass stops
# after the highest layer): each window then reads its five from the cache
max=$(( $(printf '%s\n' "${STARTS[@]}" | sort -n | tail -1) + 4 ))
all=$(seq -s, 1 $max)
[ -s "$OUT/stats.json" ] || kedit bench editors --model gemma3-270m --data $DATA --methods memit --n 1 --batch-size 1 \
    --set "memit.layers=[$all]" --json "$OUT/stats.json"
for s in "${STARTS[@]}"; do
    layers="[$s,$((s + 1)),$((s + 2)),$((s + 3)),$((s + 4))]"
    [ -s "$OUT/layers_$s.json" ] || kedit bench editors --model gemma3-270m --data $DATA --n 40 --batch-size 10 \
        --methods memit,alphaedit --set "memit.layers=$layers" --set "alphaedit.layers=$layers" --json "$OUT/layers_$s.json"
done
python3 - "$OUT" "${STARTS[@]}" <<'PY'
import json, sys
out, starts = sys.argv[1], sys.argv[2:]
first = json.load(open(f"{out}/layers_{starts[0]}.json"))
u = first["unedited"]
print(f"unedited             {u['efficacy']:.3f} / {u['generalization']:.3f} / {u['specificity']:.3f}  fluency {u['fluency']:.2f}")
for s in starts:
    res = json.load(open(f"{out}/layers_{s}.json"))["results"]
    for m, r in res.items():
        print(f"layers {s}-{int(s) + 4:<3} {m:9} {r['efficacy']:.3f} / {r['generalization']:.3f} / {r['specificity']:.3f}"
              f"  fluency {r['fluency']:.2f}  {r['seconds_per_edit']:.2f} s/edit")
PY
