#!/bin/bash
# The gates' share of a step in batches of 10, scoring the model itself (precision: model) against a bf16 copy
# (precision: auto, data/gates/long.yaml as shipped): the same N facts of CounterFact's edit split through the full
# flow, one stream after the other. Run it with nothing else on the machine. The streams' per-attempt timings land in
# OUT/gateprec_{model,auto}_steps.jsonl, the bench results in OUT/gateprec_{model,auto}.json, and the tables are
# printed (scripts/gate_precision_table.py OUT).
# ORDER: which stream runs first ("model auto" or "auto model"): a machine's speed drifts, so run both orders.
# usage: scripts/gate_precision.sh OUT [EDITOR] [N] [ORDER]
set -euo pipefail
OUT=$(realpath -m "$1"); EDITOR=${2:-alphaedit}; N=${3:-100}; ORDER=${4:-model auto}
cd "$(dirname "$0")/.."  # the paths below are the repository's
DATA=../shared/data/counterfact/counterfact-edit.easyedit.json
mkdir -p "$OUT"
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
sed 's/^precision: auto\b/precision: model/' data/gates/long.yaml > "$SCRATCH/long_model.yaml"
grep -q '^precision: model' "$SCRATCH/long_model.yaml" || { echo "data/gates/long.yaml has no top-level 'precision: auto'" >&2; exit 1; }
for P in $ORDER; do
  GATES=data/gates/long.yaml; [ "$P" = model ] && GATES="$SCRATCH/long_model.yaml"
  kedit bench stream --data "$DATA" --n "$N" --batch-size 10 --editor "$EDITOR" --threads 2 --gates "$GATES" \
      --work-dir "$SCRATCH/$P" --json "$OUT/gateprec_$P.json" > "$SCRATCH/$P.log" 2>&1 \
      || { tail -20 "$SCRATCH/$P.log" >&2; exit 1; }
  cp "$SCRATCH/$P/work/steps.jsonl" "$OUT/gateprec_${P}_steps.jsonl"
done
python3 scripts/gate_precision_table.py "$OUT"
