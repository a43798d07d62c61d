#!/bin/bash
# one device session: make gpu (build, GPU tests, sanitizers, kernel benchmarks), prefill on the GPU, full suite
set -u
export PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 3
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nvcc --version | tail -2; command -v compute-sanitizer;
  python3 -c "import torch,triton,transformers;print('torch',torch.__version__,'cuda',torch.version.cuda,'triton',triton.__version__,'transformers',transformers.__version__,torch.cuda.get_device_name())"; nproc; } 2>&1 | tee $OUT/env.txt
GPU_BUDGET_S=${GPU_BUDGET:-330} make gpu 2>&1 | tee $OUT/make_gpu.log
echo "== make gpu done at $(el) s" | tee -a $OUT/make_gpu.log
tar czf $OUT/results.tgz benchmarks/results
py=build/gpu-venv/bin/python; $py -c "import torch, triton, pytest, autoselect" 2>/dev/null || py=python3
echo "== python for the rest: $py"
timeout 100 $py benchmarks/bench_prefill.py --device cuda 2>&1 | tee $OUT/prefill.log
echo "== prefill done at $(el) s" | tee -a $OUT/prefill.log
tar czf $OUT/results.tgz benchmarks/results
left=$(( ${TOTAL:-545} - $(el) )); echo "== full suite, $left s left"
timeout $left $py -m pytest tests -q -p no:cacheprovider -rfE --durations=15 2>&1 | tee $OUT/full_suite.log
echo "== all done at $(el) s rc=${PIPESTATUS[0]}" | tee -a $OUT/full_suite.log
