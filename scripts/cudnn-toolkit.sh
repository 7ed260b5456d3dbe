#!/usr/bin/env bash
# Adds cuDNN 9 (PyPI wheel nvidia-cudnn-cu13, ~520 MB) to the compile-only CUDA toolkit of
# ../shared/tools/cuda-toolkit.sh, so that the `cudnn` cargo feature links on a machine
# without a GPU. Run that script first, with the same PREFIX.
#
#   scripts/cudnn-toolkit.sh [PREFIX]     # default PREFIX: $HOME/.cache/medray-cuda
#   source PREFIX/env.sh && cargo build --release --features cudnn ...
#
# On a GPU machine, LD_LIBRARY_PATH must also hold the wheel's lib folder (printed below)
# unless cuDNN 9 is installed system-wide.
set -euo pipefail
PREFIX=${1:-${HOME}/.cache/medray-cuda}
VER=${CUDNN_VERSION:-9.28.1.4}
[ -x "$PREFIX/venv/bin/python" ] && [ -d "$PREFIX/cuda/lib64" ] || {
  echo "no CUDA toolkit at $PREFIX: run ../shared/tools/cuda-toolkit.sh $PREFIX first" >&2
  exit 1
}
"$PREFIX/venv/bin/pip" install -q "nvidia-cudnn-cu13==${VER}"
LIB=$("$PREFIX/venv/bin/python" -c 'import os, nvidia.cudnn as c; print(os.path.join(list(c.__path__)[0], "lib"))')
[ -e "$LIB/libcudnn.so.9" ] || { echo "no libcudnn.so.9 in the wheel at $LIB" >&2; exit 1; }
for f in "$LIB"/libcudnn*.so.9; do
  b=${f##*/}
  ln -sfn "$f" "$PREFIX/cuda/lib64/$b"
  ln -sfn "$b" "$PREFIX/cuda/lib64/${b%%.so.*}.so"
done
echo "cuDNN ${VER} linked into $PREFIX/cuda/lib64 (runtime libraries: $LIB)"
