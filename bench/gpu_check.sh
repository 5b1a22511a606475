#!/usr/bin/env bash
# The GPU check of issue 33 in one command (at most 8 minutes on one H100, the CUDA build of engine._C included):
#   OUT=/some/empty/dir bash bench/gpu_check.sh        (the device tool's `run` gives $OUT)
#   bash bench/gpu_check.sh DIR [gpu_check.py options, e.g. --skip-build on a warm machine]
# Writes env.txt here, then bench/gpu_check.py builds the extension (parallel jobs, sm_90 only), runs the GPU tests
# and the timed stages, each under its own time limit, and leaves build.log, tests-gpu.log, stages.log and
# timings.json beside env.txt (at most 8 files). Without a CUDA device it is a dry run (CUDA stages skipped).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then OUT=$1; shift; fi
if [ -z "${OUT:-}" ]; then echo "usage: OUT=DIR bash bench/gpu_check.sh, or bash bench/gpu_check.sh DIR" >&2; exit 2; fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}            # parallel compilation (ninja) of engine._C
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # H100 only
# torch guesses CUDA_HOME from nvcc's folder; where nvcc sits outside the toolkit (/usr/local/bin) the link step then
# misses libcudart: take the toolkit that has it
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc > /dev/null; then
  for d in /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"; do
    if [ -e "$d/lib64/libcudart.so" ] || [ -e "$d/lib/libcudart.so" ]; then export CUDA_HOME=$d; break; fi
  done
fi
PY=${PYTHON:-python3}
{
  echo "date $(date -u +%FT%TZ)"
  echo "host $(uname -srm), $(nproc) CPUs, $(free -g 2>/dev/null | awk '/Mem:/ {print $2 " GiB"}')"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null | sed 's/^/gpu /' \
    || echo "gpu: none (nvidia-smi missing or failed)"
  echo "nvcc $(nvcc --version 2>/dev/null | tail -1 || echo missing)"
  echo "ninja $(ninja --version 2>/dev/null || echo missing: engine._C compiles one source at a time)"
  $PY -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cuda available', torch.cuda.is_available())"
  $PY -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1
  $PY -c "import setuptools, pip; print('setuptools', setuptools.__version__, 'pip', pip.__version__)" 2>&1 | tail -1
  echo "git $(git rev-parse HEAD 2>/dev/null)$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo +dirty)"
  echo "MAX_JOBS=$MAX_JOBS TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST CUDA_HOME=${CUDA_HOME:-unset}"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
$PY bench/gpu_check.py --out "$OUT" "$@"
