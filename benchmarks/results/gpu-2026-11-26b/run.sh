#!/bin/bash
# (the run itself used a copy of that segv.py in this folder, since removed as a duplicate)
# second GPU session: make gpu (build, GPU tests incl. the fp16 d=128 fix, sanitizers, kernel benchmarks),
# the TORCH_CHECK segfault's diagnostics, prefill at batch 1 and 8 with ceiling rows, the whole suite (xdist)
set -u
export PYTHONUNBUFFERED=1
D=benchmarks/results/gpu-2026-11-26b
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 3
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nvcc --version | tail -2; g++ --version | head -1
  python3 -c "import torch,triton,transformers;print('torch',torch.__version__,'cuda',torch.version.cuda,'triton',triton.__version__,'transformers',transformers.__version__,torch.cuda.get_device_name())"; nproc; } 2>&1 | tee $OUT/env.txt
GPU_BUDGET_S=${GPU_BUDGET:-240} make gpu > $OUT/make_gpu.log 2>&1; echo "== make gpu rc=$? at $(el) s" | tee -a $OUT/make_gpu.log
grep -E "passed|failed|FAILED|ERROR|== |errors|hazards" $OUT/make_gpu.log | tail -25
cp benchmarks/results/*.csv $OUT/
py=build/gpu-venv/bin/python; $py -c "import torch, triton, pytest, autoselect" 2>/dev/null || py=python3
so=$(ls autoselect/_C*.so | head -1)
{ echo "== nm -DC (defined) | _M_insert / num_put"; nm -DC --defined-only $so | grep -E "_M_insert|num_put" | head
  echo "== nm -DC (undefined) | _M_insert"; nm -DC --undefined-only $so | grep -E "_M_insert" | head
  echo "== readelf -d"; readelf -d $so | grep -E "NEEDED|RPATH|RUNPATH"
  echo "== libstdc++/libgomp mapped after import torch + extension"; $py -c "import torch, autoselect; autoselect._ext.extension(); print(open('/proc/self/maps').read())" | awk '{print $6}' | grep -E "stdc|gomp|gcc_s" | sort -u
  echo "== LD_DEBUG bindings of _M_insert"; LD_DEBUG=bindings timeout 60 $py benchmarks/results/gpu-2026-11-26/segv.py 2>&1 | grep -E "_M_insertIl|_M_insertIm|_M_insertId" | head -8
  echo "== LD_BIND_NOW=1"; LD_BIND_NOW=1 timeout 60 $py benchmarks/results/gpu-2026-11-26/segv.py 2>&1 | tail -3
  echo "== cuda-gdb: frames 0-3, pc"; timeout 90 cuda-gdb -q -batch -ex "set pagination off" -ex run -ex "bt 4" -ex "info symbol \$pc" -ex "x/4i \$pc" --args $py benchmarks/results/gpu-2026-11-26/segv.py 2>&1 | grep -v "^\[New Thread\|^\[Thread\|^warning" | tail -14
  echo "== fmt variants"; timeout 150 $py $D/fmt_variants.py; } > $OUT/segv.log 2>&1
echo "== segv diagnostics done at $(el) s"; cat $OUT/segv.log | cut -c1-300 | head -60
timeout 150 $py -m autoselect bench --op prefill --device cuda --repeats 10 --shape 4096,32,64,576,1 --shape 4096,32,64,576,8 \
  --results benchmarks/results > $OUT/prefill.log 2>&1; echo "== prefill rc=$? at $(el) s"; tail -22 $OUT/prefill.log | cut -c1-250
cp benchmarks/results/prefill.csv $OUT/
left=$(( ${TOTAL:-520} - $(el) )); echo "== full suite (xdist 8), $left s"
[ $left -gt 30 ] && timeout $left $py -m pytest tests -q -p no:cacheprovider -rfE -n 8 --dist loadfile --durations=15 \
  --deselect tests/test_noise_gate.py::test_compiled_op_checks_its_inputs \
  --deselect tests/test_select.py::test_compiled_kernel_checks_its_inputs > $OUT/full_suite.log 2>&1
echo "== full suite rc=$? at $(el) s"; grep -E "FAILED|ERROR|passed|failed" $OUT/full_suite.log | tail -20
