#!/bin/bash
# The gates' share of one step in batches of 10 on a long stream's chain: copies the stream's work dir DIR
# (kedit bench stream --work-dir DIR) to DIR-gateshare, runs the next 10 facts there as one batch, and stops once
# that attempt is recorded (the bench's closing scores over every request are not needed). Run it with nothing
# else on the machine; the attempt's timings by phase land in DIR-gateshare/work/steps.jsonl.
# usage: scripts/gate_share.sh DIR DATA [EDITOR] [GATES]
set -euo pipefail
DIR=$1; DATA=$2; EDITOR=${3:-alphaedit}; GATES=${4:-data/gates/long.yaml}
OUT="$DIR-gateshare"
rm -rf "$OUT" && cp -r "$DIR" "$OUT" && rm -f "$OUT/work/steps.jsonl"
# the facts the stream settled are the first records of its plan: the next 10 follow them
N=$(python3 -c "
import json, sys
steps = [json.loads(l) for l in open(sys.argv[1])]
print(len({k for s in steps for k in s['keys']}))" "$DIR/work/steps.jsonl")
kedit bench stream --data "$DATA" --n $((N + 10)) --batch-size 10 --editor "$EDITOR" --threads 2 --gates "$GATES" \
    --work-dir "$OUT" > "$OUT.log" 2>&1 &
PID=$!
until grep -qs '"batch-000"' "$OUT/work/steps.jsonl"; do
  kill -0 $PID 2> /dev/null || { echo "the bench ended early: $OUT.log" >&2; exit 1; }
  sleep 5
done
sleep 20  # the batch's retries, if any
pkill -P $PID || true; kill $PID 2> /dev/null || true
python3 -c "
import json, sys
for line in open(sys.argv[1]):
    s = json.loads(line)
    gates = sum(v for k, v in s.items() if k.startswith('gate:'))
    print(s['attempt'], s['n'], s['verdict'], f\"edit {s['edit']:.1f} s, gates {gates:.1f} s, wall {s['wall']:.1f} s: gates {gates / s['wall']:.1%}\")
" "$OUT/work/steps.jsonl"
