#!/usr/bin/env bash
# medray's main job on a fresh machine, on the embedded defaults:
#   1. build the `medray` binary (release),
#   2. synthesise paired lung-CT phantoms with a known breathing deformation,
#   3. start a local cluster (head + 2 workers), ingest the phantoms into its encrypted
#      stage and catalog, run the selftest on every worker,
#   4. train LocalNet (full preset, MI + bending energy) on the first 80% of the cases,
#      data-parallel on both workers, register the model and export it,
#   5. register a held-out case and print its quality (Dice, TRE, SSIM, folding).
# Needs only a Rust toolchain (https://rustup.rs). On 2 CPU cores: about 20 minutes for the
# first release build, then about 6-10 minutes for the job itself.
# Outputs go to ${MEDRAY_QUICKSTART_DIR:-quickstart}/. Prediction still runs in one process
# (`predict`): distributed inference is the next issue.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "cargo not found: install Rust from https://rustup.rs" >&2; exit 1; }

OUT=${MEDRAY_QUICKSTART_DIR:-quickstart}
SIZE=(48 48 48)
cargo build --release --locked -p medray-cli
M="$(cd "${CARGO_TARGET_DIR:-target}/release" && pwd)/medray"

echo "== 1/4 synthesising 10 phantoms at ${SIZE[*]} into $OUT/data"
$M synth --out "$OUT/data" --cases 10 --size "${SIZE[@]}" --seed 0

echo "== 2/4 local cluster in $OUT: ingest into its stage, selftest on every worker"
DATA="$(cd "$OUT/data" && pwd)"
cd "$OUT"
$M up --workers 2 --detach --listen 127.0.0.1:${MEDRAY_QUICKSTART_PORT:-50051} --data-dir cluster-data
trap '$M down' EXIT
$M ingest dir "$DATA" --name quickstart --replace
$M datasets show quickstart
$M selftest --dataset quickstart --size 48
$M status

echo "== 3/4 training LocalNet (full preset, MI + bending energy) on both workers"
$M train --dataset quickstart --model quickstart --preset full --channels 8 --loss mi-be \
  --epochs 12 --batch-size 2 --lr 1e-3 --size "${SIZE[@]}" --workers 2
$M models list
$M models export quickstart --out best.safetensors
$M down
trap - EXIT
cd - >/dev/null

echo "== 4/4 registering held-out case_010 with the best weights"
D="$OUT/data"
$M predict --weights "$OUT/best.safetensors" \
  --fixed "$D/scans/case_010_exp.nii.gz" --moving "$D/scans/case_010_insp.nii.gz" \
  --fixed-mask "$D/lungMasks/case_010_exp.nii.gz" --moving-mask "$D/lungMasks/case_010_insp.nii.gz" \
  --keypoints "$D/keypoints/case_010.csv" \
  --out-ddf "$OUT/case_010_ddf.nii.gz" --out-warped "$OUT/case_010_warped.nii.gz" --original-grid
