#!/bin/bash
# Issue 16's two N = 20 tables (the first 20 CounterFact records, and the first 20 the unedited model already
# answers) for MEMIT and AlphaEdit, a checkout of an earlier commit against this working tree, each pair one command
# after the other in one sitting: the seconds per edit of a change to the target steps as a ratio. Run it with
# nothing else on the machine.
# usage: scripts/target_ab.sh BEFORE_CHECKOUT [OUT_DIR]   (e.g. git worktree add /tmp/before <commit>; default out/ab)
#        writes OUT_DIR/{before,after}_{first,known}_{memit,alphaedit}.json and prints the table
set -euo pipefail
BEFORE=$(cd "$1" && pwd)
OUT=${2:-out/ab}
DATA=../shared/data/counterfact/counterfact_500.rome.json
KNOWN=out/known20.json
mkdir -p "$OUT" out
[ -s "$KNOWN" ] || kedit bench known --model smollm2-135m --data $DATA --n 20 --out $KNOWN
for data in first known; do
    file=$DATA; [ $data = known ] && file=$KNOWN
    for method in memit alphaedit; do
        # the console script puts its own directory first on sys.path, then PYTHONPATH: the checkout's packages
        # win over the editable install's
        PYTHONPATH="$BEFORE" kedit bench editors --model smollm2-135m --data $file --methods $method --n 20 \
            --batch-size 10 --json "$OUT/before_${data}_${method}.json"
        kedit bench editors --model smollm2-135m --data $file --methods $method --n 20 --batch-size 10 \
            --json "$OUT/after_${data}_${method}.json"
    done
done
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
print("| N = 20, batches of 10 | s / edit before | after | speed-up | before: eff / gen / spec, fluency | after |")
print("|---|---:|---:|---:|---|---|")
for data in ("first", "known"):
    for method in ("memit", "alphaedit"):
        b, a = (json.load(open(f"{out}/{w}_{data}_{method}.json"))["results"][method] for w in ("before", "after"))
        q = lambda r: " / ".join(f"{r[k]:.3f}" for k in ("efficacy", "generalization", "specificity")) + f", {r['fluency']:.2f}"
        print(f"| {data} {method} | {b['seconds_per_edit']:.2f} | {a['seconds_per_edit']:.2f} | "
              f"{b['seconds_per_edit'] / a['seconds_per_edit']:.2f}x | {q(b)} | {q(a)} |")
PY
