#!/bin/bash
# Fourth GPU session (2026-11-27): make gpu (build, the GPU tests with the kernels' new finiteness flag,
# compute-sanitizer, kernel benchmarks), the selection profile (select_profile.py), then the whole suite
# under what is left of TOTAL seconds. Every log goes to $OUT as it is written.
set -u
export PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
TOTAL=${TOTAL:-500}
HERE=benchmarks/results/gpu-2026-11-27
# the machine's transformers is below the package floor: the 5.24.0 wheel travels in .whl/
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 3
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nvcc --version | tail -2
  python3 -c "import torch,triton,transformers;print('torch',torch.__version__,'cuda',torch.version.cuda,'triton',triton.__version__,'transformers',transformers.__version__,torch.cuda.get_device_name())"
  nproc; } 2>&1 | tee $OUT/env.txt
GPU_BUDGET_S=${GPU_BUDGET:-290} make gpu > $OUT/make_gpu.log 2>&1; echo "== make gpu rc=$? at $(el) s" | tee -a $OUT/make_gpu.log
grep -E "passed|failed|FAILED|ERROR|== |errors|hazards" $OUT/make_gpu.log | tail -30
mkdir -p $OUT/csv && cp benchmarks/results/*.csv $OUT/csv/
cp build/gpu-build.log $OUT/ 2>/dev/null
timeout 90 python3 $HERE/select_profile.py > $OUT/select_profile.log 2>&1; echo "== profile rc=$? at $(el) s"
grep -v Warning $OUT/select_profile.log | grep -v _warn_once | head -40
left=$(( TOTAL - $(el) )); echo "== whole suite (xdist 12), $left s"
timeout $left python3 -m pytest tests -q -p no:cacheprovider -rfE -n 12 --dist loadfile --durations=15 > $OUT/full_suite.log 2>&1
echo "== full suite rc=$? at $(el) s"; grep -E "FAILED|ERROR|passed|failed" $OUT/full_suite.log | tail -20; tail -c 600 $OUT/full_suite.log
