#!/usr/bin/env bash
# Inference figures (issue 6's "Measure and report"):
#   1. throughput: `medray infer` over CASES synthetic cases on a local cluster of 1 worker
#      and on one of 2 workers (`medray up` shares the cores out among its workers: 1 worker
#      computes on every core, 2 workers on half each), cases per minute from the job's
#      start to its end, REPEATS runs each;
#   2. per-case latency: medray's per-case runtime and network time (job log), against the
#      MONAI quickstart pipeline on the same files (tools/bench_monai_infer.py), when
#      MONAI_PY names the reference venv's python;
#   3. the effect of --refine REFINE on mean Dice and TRE.
# Settings (environment, defaults in brackets): CASES [12], SIZE ["96 96 104"] (phantom
# grid), NET ["64 64 64"] (network grid), PRESET [seed], CHANNELS [32], REFINE [20], REPEATS [3],
# MONAI_PY [unset: MONAI is skipped], OUT [infer-bench], PORT [50081].
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
CASES=${CASES:-12}
read -r -a SIZE <<<"${SIZE:-96 96 104}"
read -r -a NET <<<"${NET:-64 64 64}"
PRESET=${PRESET:-seed}
CHANNELS=${CHANNELS:-32}
REFINE=${REFINE:-20}
REPEATS=${REPEATS:-3}
OUT=${OUT:-infer-bench}
PORT=${PORT:-50081}

cargo build --release --locked -p medray-cli
M="$(cd "${CARGO_TARGET_DIR:-target}/release" && pwd)/medray"
rm -rf "$OUT" && mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
$M synth --out "$OUT/data" --cases "$CASES" --size "${SIZE[@]}" --seed 3 >/dev/null

cd "$OUT"
$M up --workers 2 --detach --listen "127.0.0.1:$PORT" --data-dir cluster-data
trap '$M down' EXIT
$M ingest dir "$OUT/data" --name bench >/dev/null
# A model to serve: two epochs on the cases (the timing does not depend on its quality).
$M train --dataset bench --model bench --preset "$PRESET" --channels "$CHANNELS" \
  --size "${NET[@]}" --epochs 2 --batch-size 2 --lr 1e-3 --workers 2 >/dev/null

# Seconds between two RFC 3339 timestamps.
span() { python3 -c "import sys,datetime as d; f=lambda s: d.datetime.fromisoformat(s.replace('Z','+00:00')); print((f(sys.argv[2])-f(sys.argv[1])).total_seconds())" "$1" "$2"; }
field() { python3 -c "import json,sys; j=json.load(sys.stdin); print($1)"; }

run_job() { # args: extra infer flags; prints the job id
  $M infer --dataset bench --model bench --no-wait "$@"
}
wait_job() {
  while :; do
    s=$($M job status "$1" --json 2>/dev/null || true)
    st=$(echo "$s" | field "j['state']" 2>/dev/null || echo "?")
    case "$st" in SUCCEEDED|FAILED|CANCELLED) echo "$s"; return;; esac
    sleep 1
  done
}

printf '\n%-22s %8s %10s %12s %14s %12s %12s\n' run workers seconds cases/min "case ms (med)" "Dice" "TRE mm"
infer_runs() { # arg: workers
  for _ in $(seq "$REPEATS"); do
    id=$(run_job)
    j=$(wait_job "$id")
    secs=$(span "$(echo "$j" | field "j['started_at']")" "$(echo "$j" | field "j['finished_at']")")
    med=$($M results --job "$id" --format json | field "sorted(r['runtime_ms'] for r in j)[len(j)//2]")
    net=$($M job logs "$id" | sed -n 's/.*network \([0-9]*\) ms.*/\1/p' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
    printf '%-22s %8s %10.1f %12.1f %14.0f %12s %12s   (network %s ms)\n' "infer $id" "$1" "$secs" \
      "$(python3 -c "print($CASES*60/$secs)")" "$med" \
      "$(echo "$j" | field "round(j['result']['mean_dice'],4)")" \
      "$(echo "$j" | field "round(j['result']['mean_tre_mm'],3)")" "$net"
  done
}
infer_runs 2
id=$(run_job --refine "$REFINE")
j=$(wait_job "$id")
secs=$(span "$(echo "$j" | field "j['started_at']")" "$(echo "$j" | field "j['finished_at']")")
printf '%-22s %8s %10.1f %12.1f %14s %12s %12s   (before: Dice %s, TRE %s mm)\n' "refine $REFINE: $id" 2 "$secs" \
  "$(python3 -c "print($CASES*60/$secs)")" "-" \
  "$(echo "$j" | field "round(j['result']['mean_dice'],4)")" \
  "$(echo "$j" | field "round(j['result']['mean_tre_mm'],3)")" \
  "$(echo "$j" | field "round(j['result']['mean_dice_before'],4)")" \
  "$(echo "$j" | field "round(j['result']['mean_tre_before_mm'],3)")"
$M down
# The same data directory (catalog, stage, model) on a cluster of one worker.
$M up --workers 1 --detach --listen "127.0.0.1:$PORT" --data-dir cluster-data >/dev/null
infer_runs 1
$M down
trap - EXIT

if [ -n "${MONAI_PY:-}" ]; then
  echo
  echo "MONAI quickstart pipeline, same files, one process:"
  "$MONAI_PY" "$REPO/tools/bench_monai_infer.py" --data "$OUT/data" --net "${NET[@]}" \
    --preset "$PRESET" --channels "$CHANNELS"
fi
