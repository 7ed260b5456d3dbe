#!/usr/bin/env bash
# One prepared check of medray's CUDA path, for the GPU machine a task may be lent (issue 20).
#
#   scripts/gpu-check.sh prepare          # here, without a GPU: builds everything into .gpu-check/
#   scripts/gpu-check.sh run              # on the GPU machine: one call, everything to $OUT
#   scripts/gpu-check.sh run --cpu        # here: the same steps on the CPU (tests the script)
#
# prepare (~25 min cold on 2 cores, most of it the release build):
#   * the compile-only CUDA toolkit pinned to the lent machines' CUDA (driver 580 = CUDA 13.0:
#     CUDA_TK_VERSION=13.0.2, in ~/.cache/medray-cuda-13.0) plus cuDNN 9;
#   * a stripped release `medray` built with --features cudnn, and the stripped cuDNN test
#     binaries (core's unit tests, with the cuDNN-vs-CPU test; the MONAI parity tests), built
#     with `cargo test --no-run` into their own target folder (target/gpu-check);
#   * the MONAI 1.6.1 wheel (pure Python; torch and numpy are on the GPU machine);
#   all in .gpu-check/ (ignored by git), packed as one xz archive so that the working tree
#   plus .gpu-check stays under the device tool's 64 MiB carry limit (checked, size printed).
#   Run it again after any change: `run` warns when the archive was built from another commit.
#
# run, on the device, in one call (the device tool, carrying .gpu-check):
#     command: bash scripts/gpu-check.sh run     carry: [".gpu-check"]     timeout_s: 540
#   Steps, each with its own time limit so the whole run ends inside 8 minutes, and every
#   result written to $OUT as it comes (a time-out still returns the log):
#     1. nvidia-smi; library paths from the machine's own CUDA/cuDNN (its Python's nvidia-*
#        wheels, /usr/local/cuda);
#     2. `medray predict --device cuda:0` on the MONAI fixture pair against MONAI's DDF and
#        warped image and against `--device cpu` (tools/gpu_parity.py, 1e-4);
#     3. the MONAI parity tests (LocalNet forward, gradients, Adam, warp, resize) with every
#        tensor on the GPU (MEDRAY_TEST_DEVICE=cuda:0);
#     4. the cuDNN test (convolutions and their gradients against the CPU);
#     5. `medray bench --device cuda:0 --compare-monai python3`: both presets, 96x96x104 and
#        192x192x208, train and infer, with peak GPU memory of both;
#     5b. one epoch of each newer objective (keypoints, LNCC, MIND) and predict with the MIND
#        and LNCC refinement pyramids, on the device;
#     6. a local cluster of 2 workers on cuda:0: ingest phantoms, `medray train`, `medray infer`;
#     7. $OUT/summary.json: every step's status and seconds, and the figures.
#   Files back in $OUT: gpu-check.log, summary.json, nvidia-smi.txt, parity.json, bench.jsonl,
#   cluster.log (at most 8, as the tool allows).
#
# run --cpu runs the same steps here with --device cpu (the cuDNN test is skipped, there is no
# GPU), at small sizes unless GPU_CHECK_SIZES says otherwise; PYTHON (default python3) must have
# numpy for step 2 and torch + MONAI for step 5's comparison, else those parts are recorded as
# skipped. Output goes to $OUT, else .gpu-check/out.
#
# Environment: GPU_CHECK_DIR (default .gpu-check), CUDA_TK_VERSION (prepare; default 13.0.2),
# GPU_CHECK_SIZES (run; default 96x96x104,192x192x208 on the GPU, 32 with --cpu), PYTHON.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DIR=${GPU_CHECK_DIR:-.gpu-check}
ARCHIVE=$DIR/gpu-check.tar.xz
LIMIT_MIB=64

usage() {
  sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

tree_bytes() {
  # What the device tool sends: tracked files plus untracked files git does not ignore.
  git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s -- 2>/dev/null \
    | awk '{ s += $1 } END { print s + 0 }'
}

prepare() {
  set -e
  local tk_version=${CUDA_TK_VERSION:-13.0.2}
  local prefix=${MEDRAY_GPU_CHECK_CUDA:-$HOME/.cache/medray-cuda-${tk_version%.*}}
  local shared_tk=../shared/tools/cuda-toolkit.sh
  [ -f "$shared_tk" ] || { echo "gpu-check prepare: $shared_tk not found (the compile-only CUDA toolkit script)" >&2; exit 1; }
  command -v xz >/dev/null || { echo "gpu-check prepare: xz not found (apt-get install xz-utils)" >&2; exit 1; }
  echo "== 1/4 compile-only CUDA ${tk_version} toolkit and cuDNN in $prefix"
  CUDA_TK_VERSION=$tk_version bash "$shared_tk" "$prefix"
  # nvidia-cuda-nvcc 13.0 leaves nvvm (cicc) and crt unpinned: pip takes the newest (13.5),
  # whose PTX (ISA 9.5) the 13.0 ptxas, and the driver 580 of the lent machines, refuse.
  "$prefix/venv/bin/pip" install -q "nvidia-nvvm==${tk_version%.*}.*" "nvidia-cuda-crt==${tk_version%.*}.*"
  "$prefix/venv/bin/pip" list 2>/dev/null | grep -E '^(cuda-toolkit|nvidia-)' | tr -s ' '
  bash scripts/cudnn-toolkit.sh "$prefix"
  # shellcheck disable=SC1091
  source "$prefix/env.sh"
  export CARGO_TARGET_DIR=$ROOT/target/gpu-check
  echo "== 2/4 release build with --features cudnn (CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP) into $CARGO_TARGET_DIR"
  cargo build --release --locked -p medray-cli --features cudnn
  local tests_json
  tests_json=$(mktemp)
  cargo test --release --locked -p medray-core --features cudnn --lib --test monai_parity --no-run \
    --message-format=json >"$tests_json"
  local stage
  stage=$(mktemp -d)
  mkdir -p "$stage/bin"
  cp "$CARGO_TARGET_DIR/release/medray" "$stage/bin/medray"
  # The test executables: core's unit tests (the cuDNN test) and the MONAI parity tests.
  local lib_test parity_test
  lib_test=$(grep '"executable":"' "$tests_json" | grep '"kind":\["lib"\]' | sed 's/.*"executable":"\([^"]*\)".*/\1/' | head -1)
  parity_test=$(grep '"executable":"' "$tests_json" | grep '"name":"monai_parity"' | sed 's/.*"executable":"\([^"]*\)".*/\1/' | head -1)
  rm -f "$tests_json"
  [ -n "$lib_test" ] && [ -n "$parity_test" ] || { echo "gpu-check prepare: test executables not found in cargo's output" >&2; exit 1; }
  cp "$lib_test" "$stage/bin/core-tests"
  cp "$parity_test" "$stage/bin/monai-parity"
  strip "$stage"/bin/*
  echo "== 3/4 MONAI 1.6.1 wheel"
  mkdir -p "$stage/wheels"
  "$prefix/venv/bin/pip" download -q --no-deps --only-binary=:all: -d "$stage/wheels" monai==1.6.1
  {
    echo "commit $(git rev-parse HEAD)$(git diff --quiet HEAD -- . ':!.gpu-check' || echo ' (with uncommitted changes)')"
    echo "cuda-toolkit $tk_version, CUDA_COMPUTE_CAP $CUDA_COMPUTE_CAP, cuDNN ${CUDNN_VERSION:-9.28.1.4}"
    echo "built $(date -u +%FT%TZ) on $(uname -m)"
    (cd "$stage" && ls -l bin wheels)
  } >"$stage/MANIFEST"
  echo "== 4/4 packing $ARCHIVE"
  mkdir -p "$DIR"
  rm -f "$ARCHIVE"
  tar -C "$stage" -cf - . | xz -T0 -6 >"$ARCHIVE.tmp"
  mv "$ARCHIVE.tmp" "$ARCHIVE"
  cp "$stage/MANIFEST" "$DIR/MANIFEST"
  rm -rf "$stage"
  local tree carry total
  tree=$(tree_bytes)
  carry=$(du -sb "$DIR" | cut -f1)
  total=$((tree + carry))
  cat "$DIR/MANIFEST"
  awk -v t="$tree" -v c="$carry" -v d="$DIR" -v l="$LIMIT_MIB" 'BEGIN {
    printf "working tree %.1f MiB + %s %.1f MiB = %.1f MiB (limit %d MiB)\n", t / 1048576, d, c / 1048576, (t + c) / 1048576, l }'
  if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
    echo "gpu-check prepare: over the device tool's ${LIMIT_MIB} MiB carry limit" >&2
    exit 1
  fi
  echo "ready: device run with command 'bash scripts/gpu-check.sh run', carry [\"$DIR\"], timeout_s 540"
}

# ---------------------------------------------------------------------------------------------
# run

STEPS_JSON=""
record() { # name status seconds [detail]
  local detail=${4:-}
  detail=${detail//\\/\\\\}
  detail=${detail//\"/\\\"}
  STEPS_JSON+="${STEPS_JSON:+,}{\"step\":\"$1\",\"status\":\"$2\",\"seconds\":$3,\"detail\":\"$detail\"}"
  echo "-- step $1: $2 (${3} s)${detail:+: $detail}"
}

# step NAME LIMIT_S COMMAND...: runs it with a time limit, records ok / failed / timed out.
step() {
  local name=$1 limit=$2
  shift 2
  echo
  echo "== $name (limit ${limit} s): $*"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  local dt=$(($(date +%s) - t0))
  case $rc in
    0) record "$name" ok "$dt" ;;
    124 | 137) record "$name" "timed out" "$dt" "after ${limit} s" ;;
    *) record "$name" failed "$dt" "exit status $rc" ;;
  esac
  return 0
}

lib_paths() {
  # The machine's own CUDA and cuDNN: every lib folder of its Python's nvidia-* wheels
  # (cuBLAS, cuRAND, NVRTC, cuDNN for CUDA 13), then /usr/local/cuda.
  local paths
  paths=$("$PYTHON" - <<'PY' 2>/dev/null
import glob, os
try:
    import nvidia
except ImportError:
    raise SystemExit(0)
seen = []
for root in list(nvidia.__path__):
    for lib in sorted(glob.glob(os.path.join(root, "*", "lib")) + glob.glob(os.path.join(root, "*", "*", "lib"))):
        if lib not in seen:
            seen.append(lib)
print(":".join(seen))
PY
)
  for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -d "$d" ] && paths=${paths:+$paths:}$d
  done
  echo "$paths"
}

run_check() {
  local cpu=0
  for a in "$@"; do
    case $a in
      --cpu) cpu=1 ;;
      *) usage ;;
    esac
  done
  PYTHON=${PYTHON:-python3}
  OUT=${OUT:-$ROOT/$DIR/out}
  mkdir -p "$OUT"
  OUT=$(cd "$OUT" && pwd)
  # This run's files only (the device's $OUT starts empty; a local one may hold a past run's).
  rm -f "$OUT"/{gpu-check.log,summary.json,nvidia-smi.txt,parity.json,bench.jsonl,cluster.log}
  exec > >(tee "$OUT/gpu-check.log") 2>&1
  local device=cuda:0 sizes=${GPU_CHECK_SIZES:-96x96x104,192x192x208} repeats=3
  if [ $cpu = 1 ]; then
    device=cpu
    sizes=${GPU_CHECK_SIZES:-32}
    repeats=1
  fi
  local started
  started=$(date +%s)
  echo "gpu-check run on $(hostname) $(date -u +%FT%TZ), device $device, sizes $sizes"

  # The prepared binaries.
  local work=/tmp/medray-gpu-check
  rm -rf "$work" && mkdir -p "$work"
  if [ ! -f "$ARCHIVE" ]; then
    echo "no $ARCHIVE: run 'scripts/gpu-check.sh prepare' here and carry $DIR" >&2
    record unpack failed 0 "no $ARCHIVE"
    write_summary "$device" "$started"
    exit 1
  fi
  xz -dc "$ARCHIVE" | tar -C "$work" -xf - || { record unpack failed 0 "cannot unpack $ARCHIVE"; write_summary "$device" "$started"; exit 1; }
  cat "$work/MANIFEST"
  local built head
  built=$(sed -n 's/^commit \([0-9a-f]*\).*/\1/p' "$work/MANIFEST")
  head=$(git rev-parse HEAD 2>/dev/null || true)
  if [ -n "$head" ] && [ "$built" != "$head" ]; then
    echo "WARNING: $ARCHIVE was built from $built, this tree is $head: run 'prepare' again"
  fi
  local M=$work/bin/medray

  if [ $cpu = 1 ]; then
    # The prepared binaries link CUDA's libraries dynamically (candle's cudarc): here they load
    # against the compile-only toolkit of `prepare` (libcuda is its link stub, never called on
    # --device cpu).
    local tk=${MEDRAY_GPU_CHECK_CUDA:-$HOME/.cache/medray-cuda-13.0}/cuda/lib64
    local cudnn_lib
    cudnn_lib=$(ls -d "${tk%/cuda/lib64}"/venv/lib/python3*/site-packages/nvidia/cudnn/lib 2>/dev/null | head -1)
    mkdir -p "$work/stub"
    ln -sf "$tk/stubs/libcuda.so" "$work/stub/libcuda.so.1"
    export LD_LIBRARY_PATH=$tk:$work/stub${cudnn_lib:+:$cudnn_lib}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  else
    step nvidia-smi 30 bash -c "set -o pipefail; nvidia-smi | tee '$OUT/nvidia-smi.txt'; nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv | tee -a '$OUT/nvidia-smi.txt'"
    local libs
    libs=$(lib_paths)
    export LD_LIBRARY_PATH=${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  fi
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  if ldd "$M" | grep -q "not found"; then
    ldd "$M" | grep "not found"
    record libraries failed 0 "medray needs libraries this machine lacks: $(ldd "$M" | grep 'not found' | awk '{print $1}' | paste -sd' ')"
  fi
  step version 30 "$M" --version

  # 2. predict on the MONAI fixture pair, GPU against MONAI and against the CPU.
  local fx=$ROOT/core/tests/fixtures
  local pred_args=(predict --weights "$fx/localnet_seed_weights.safetensors"
    --fixed "$fx/predict/fixed.nii.gz" --moving "$fx/predict/moving.nii.gz"
    --fixed-mask "$fx/predict/fixed_mask.nii.gz" --moving-mask "$fx/predict/moving_mask.nii.gz")
  step predict-reference-cpu 60 "$M" --device cpu "${pred_args[@]}" --out-ddf "$work/cpu_ddf.nii.gz" --out-warped "$work/cpu_warped.nii.gz" --json
  step predict-device 60 "$M" --device "$device" "${pred_args[@]}" --out-ddf "$work/dev_ddf.nii.gz" --out-warped "$work/dev_warped.nii.gz" --json
  if "$PYTHON" -c 'import numpy' 2>/dev/null; then
    step predict-parity 30 bash -c "set -o pipefail; '$PYTHON' '$ROOT/tools/gpu_parity.py' --expected '$fx/predict/predict_expected.safetensors' \
      --gpu-ddf '$work/dev_ddf.nii.gz' --gpu-warped '$work/dev_warped.nii.gz' \
      --cpu-ddf '$work/cpu_ddf.nii.gz' --cpu-warped '$work/cpu_warped.nii.gz' | tee '$OUT/parity.json'"
  else
    record predict-parity skipped 0 "$PYTHON has no numpy"
  fi

  # 3. MONAI parity tests with every tensor on the device. 4. the cuDNN test.
  # The test binaries find their fixtures through the path cargo baked in; point them here.
  step monai-parity 120 env MEDRAY_TEST_DEVICE="$device" CARGO_MANIFEST_DIR="$ROOT/core" \
    bash -c "cd '$ROOT/core' && '$work/bin/monai-parity' --test-threads 1"
  if [ $cpu = 0 ]; then
    step cudnn-test 120 bash -c "cd '$ROOT/core' && '$work/bin/core-tests' --ignored cudnn --test-threads 1"
  else
    record cudnn-test skipped 0 "--cpu: no GPU"
  fi

  # 5. medray bench against MONAI on the same device.
  local monai_args=()
  mkdir -p /tmp/gpu-check-site
  if ls "$work"/wheels/monai-*.whl >/dev/null 2>&1 \
    && "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu-check-site "$work"/wheels/monai-*.whl 2>/dev/null \
    && PYTHONPATH=/tmp/gpu-check-site "$PYTHON" -c 'import torch, monai' 2>/dev/null; then
    export PYTHONPATH=/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}
    monai_args=(--compare-monai "$PYTHON" --monai-script "$ROOT/tools/bench_monai.py")
  else
    record monai-install skipped 0 "$PYTHON cannot import torch and the carried MONAI wheel: medray timed alone"
  fi
  local size
  for size in ${sizes//,/ }; do
    step "bench-$size" 200 bash -c "set -o pipefail; '$M' --device '$device' bench --presets seed,full --sizes '$size' --kinds train,infer \
      --repeats $repeats ${monai_args[*]} --json | tee -a '$OUT/bench.jsonl'"
  done

  # 5b. the newer objectives and the refinement on the device: one epoch of each training
  # objective beyond the quickstart's, and predict with both pyramid similarities.
  step objectives 150 bash -c "set -eo pipefail; cd '$work'; M='$M'
    \$M synth --out obj-data --cases 4 --size 32 32 32 --seed 5 >/dev/null
    for loss in mse-dice-kp-be lncc-dice-diff mind-diff; do
      \$M --device '$device' train-local --data obj-data --loss \$loss --channels 8 --size 32 32 32 \
        --epochs 1 --batch-size 2 --val-fraction 0.25 --out obj-\$loss | tail -2
    done
    for sim in mind lncc; do
      \$M --device '$device' predict --weights obj-mse-dice-kp-be/best.safetensors \
        --fixed obj-data/scans/case_004_exp.nii.gz --moving obj-data/scans/case_004_insp.nii.gz \
        --keypoints obj-data/keypoints/case_004.csv --out-ddf obj-\$sim.nii.gz --original-grid \
        --refine 5 --refine-sim \$sim | grep -E 'TRE|refined'
    done"

  # 6. a local cluster of 2 workers on the device: ingest, train, infer.
  step cluster 240 bash -c "set -eo pipefail; cd '$work'; M='$M'; exec > >(tee '$OUT/cluster.log') 2>&1
    \$M synth --out data --cases 6 --size 48 48 48 --seed 3
    \$M --device '$device' up --workers 2 --detach --listen 127.0.0.1:50077 --data-dir cluster-data
    trap '\$M down' EXIT
    \$M ingest dir data --name gpu-check --replace
    \$M status
    \$M train --dataset gpu-check --model gpu-check --preset seed --channels 8 --loss mse-dice-be \
      --epochs 2 --batch-size 2 --lr 1e-3 --size 48 48 48 --workers 2
    \$M infer --dataset gpu-check --model gpu-check"

  write_summary "$device" "$started"
}

write_summary() { # device started
  local total=$(($(date +%s) - $2))
  local gpu=""
  [ -f "$OUT/nvidia-smi.txt" ] && gpu=$(tail -1 "$OUT/nvidia-smi.txt" | cut -d, -f1)
  local bench="[]"
  [ -f "$OUT/bench.jsonl" ] && bench="[$(grep '^{' "$OUT/bench.jsonl" | paste -sd, -)]"
  local parity="null"
  [ -s "$OUT/parity.json" ] && parity=$(tail -1 "$OUT/parity.json")
  printf '{"device":"%s","gpu":"%s","seconds":%d,"steps":[%s],"parity":%s,"bench":%s}\n' \
    "$1" "$gpu" "$total" "$STEPS_JSON" "$parity" "$bench" >"$OUT/summary.json"
  echo
  echo "== summary ($total s): $OUT/summary.json"
  echo "$STEPS_JSON" | tr '}' '\n' | sed -n 's/.*"step":"\([^"]*\)","status":"\([^"]*\)".*/  \1: \2/p'
}

case ${1:-} in
  prepare) shift; [ $# -eq 0 ] || usage; prepare ;;
  run) shift; run_check "$@" ;;
  *) usage ;;
esac
