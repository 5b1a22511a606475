#!/usr/bin/env bash
# One call on a GPU machine (the device tool): build the extension against the machine's torch,
# run the test suite (CUDA tests included), run the benchmarks, and leave logs and JSON in $OUT.
#   bash bench/gpu_run.sh [bench_certify bench_hvp mixed_precision ...]   (default: every bench/bench_*.py
#                                                                       and bench/experiments/mixed_precision/mixed_precision.py)
#   SKIP_TESTS=1 bash bench/gpu_run.sh ...                   (benchmarks only, e.g. a second call)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # bench/*.py import engine (installed editable below)
PY=${PYTHON:-python3}
{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} | tee "$OUT/env.txt"
$PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
$PY -c "import engine, engine._ext as e; print('extension', e.available(), 'cuda ops', e.has_cuda_ops())" | tee -a "$OUT/env.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  $PY -m pytest tests -q -x -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -15
  # compiled Triton kernels on the GPU (tests/conftest.py otherwise selects the interpreter)
  TRITON_INTERPRET=0 $PY -m pytest tests -q -m gpu -p no:cacheprovider 2>&1 | tee "$OUT/tests-gpu.log" | tail -15
fi
benches=("$@")
if [ ${#benches[@]} -eq 0 ]; then
  for f in bench/bench_*.py; do benches+=("$(basename "$f" .py)"); done
  benches+=(mixed_precision)
fi
dev=$($PY -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))")
for b in "${benches[@]}"; do
  echo "== $b"
  if [ "$b" = mixed_precision ]; then  # bf16 vs fp32 certified decisions on the GPU (paired, same noise)
    $PY bench/experiments/mixed_precision/mixed_precision.py --device cuda --sigma 0.5 --epochs 2 --images 300 --n 10000 \
      --checkpoint "$OUT/lenet_mixed_precision.safetensors" --out-json "$OUT/mixed_precision-$dev.json" \
      --out-md "$OUT/mixed_precision-$dev.md" 2>&1 | tee "$OUT/$b.log" | tail -30
    continue
  fi
  $PY "bench/$b.py" --out "$OUT/${b#bench_}-$dev.json" 2>&1 | tee "$OUT/$b.log" | tail -20
done
