#!/usr/bin/env bash
# Build check for the CUDA sources on a machine without a GPU (or with a CPU-only torch):
# compiles every csrc/**/*.cu to an object file with nvcc for sm_90 (H100/H200).
# A CPU torch wheel lacks one generated header (c10/cuda/impl/cuda_cmake_macros.h); a stub with
# the content of the CUDA wheel's copy is supplied from a temporary folder for this check only.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
ARCH=${ARCH:-sm_90}
TORCH_INC=$($PY -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
PY_INC=$($PY -c "import sysconfig; print(sysconfig.get_paths()['include'])")
STUB=$(mktemp -d)
trap 'rm -rf "$STUB"' EXIT
mkdir -p "$STUB/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$STUB/c10/cuda/impl/cuda_cmake_macros.h"
status=0
for src in $(find csrc -name '*.cu' | sort); do
  obj="$STUB/$(basename "$src" .cu).o"
  if nvcc -c -arch="$ARCH" -std=c++17 -O3 -fmad=false --expt-relaxed-constexpr -DENGINE_WITH_CUDA \
      $TORCH_INC -I"$STUB" -I"$PY_INC" -Icsrc -o "$obj" "$src" 2> "$STUB/err.txt"; then
    echo "ok    $src ($(stat -c %s "$obj") bytes)"
  else
    echo "FAIL  $src"; grep -v "Warning: The" "$STUB/err.txt" | head -30; status=1
  fi
done
exit $status
