#!/bin/bash
# Third GPU session (2026-11-26): where the device's link gets a static libstdc++ (the compilers'
# libstdc++ files, Python's link variables, the link command of the build), then make gpu (build, GPU
# tests including the reworked select kernel, sanitizers, kernel benchmarks).
set -u
export PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
# the machine has transformers 5.17, below the package floor: the 5.24.0 wheel travels in .whl/
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 3
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nvcc --version | tail -2; g++ --version | head -1
  python3 -c "import torch,triton,transformers;print('torch',torch.__version__,'cuda',torch.version.cuda,'triton',triton.__version__,'transformers',transformers.__version__,torch.cuda.get_device_name())"; nproc; } 2>&1 | tee $OUT/env.txt
{ echo "== python"; command -v python3; readlink -f "$(command -v python3)"
  python3 -c "import sys, sysconfig; print('prefix', sys.prefix, 'base', sys.base_prefix); [print(k, '=', sysconfig.get_config_var(k)) for k in ('CC', 'CXX', 'LDSHARED', 'LDCXXSHARED', 'LDFLAGS', 'CFLAGS', 'BLDSHARED')]"
  echo "== environment"; env | grep -E "^(CC|CXX|LDFLAGS|CFLAGS|CXXFLAGS|LDSHARED|CUDA_HOME|TORCH_CUDA_ARCH_LIST|LIBRARY_PATH|LD_LIBRARY_PATH)="
  for c in c++ g++ gcc cc x86_64-linux-gnu-gcc x86_64-linux-gnu-g++; do
    command -v $c >/dev/null && echo "$c -> $(readlink -f "$(command -v $c)"): libstdc++.so=$($c -print-file-name=libstdc++.so) libstdc++.a=$($c -print-file-name=libstdc++.a)"; done
  ls -l "$(g++ -print-file-name=libstdc++.so)" 2>&1
  echo "== a one-function C++ library linked by g++ -shared, then by gcc -shared: NEEDED"
  printf '#include <string>\nstd::string f(long x) { return std::to_string(x); }\n' > /tmp/t.cpp
  g++ -shared -fPIC /tmp/t.cpp -o /tmp/t1.so && readelf -d /tmp/t1.so | grep NEEDED
  gcc -shared -fPIC /tmp/t.cpp -o /tmp/t2.so && readelf -d /tmp/t2.so | grep NEEDED
  python3 -c "import torch.utils.cpp_extension as c; print('cpp_extension CUDA_HOME', c.CUDA_HOME)"
} > $OUT/linkage.txt 2>&1
cat $OUT/linkage.txt
echo "== linkage diagnostics done at $(el) s"
GPU_BUDGET_S=${GPU_BUDGET:-300} make gpu > $OUT/make_gpu.log 2>&1; echo "== make gpu rc=$? at $(el) s" | tee -a $OUT/make_gpu.log
grep -E "passed|failed|FAILED|ERROR|== |errors|hazards" $OUT/make_gpu.log | tail -30
grep -A12 "== link command" $OUT/make_gpu.log | cut -c1-2500
grep -E "^ *(select|Scorer|score)" $OUT/make_gpu.log | head -20
cp build/gpu-build.log $OUT/ 2>/dev/null
cp benchmarks/results/*.csv $OUT/
echo "== done at $(el) s"
