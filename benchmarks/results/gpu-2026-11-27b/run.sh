#!/bin/bash
# Fifth GPU session (2026-11-27, second of the day): build the extension, then the whole suite with -v
# (each test's name and worker as it finishes) to name the file that kept the fourth session's two runs
# from finishing. A watcher writes the pytest processes (CPU share, elapsed) and the GPU's state every
# 20 s, so a waiting worker shows itself. Every log goes to $OUT as it is written.
set -u
export PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
TOTAL=${TOTAL:-540}
# the machine's transformers is below the package floor: the 5.24.0 wheel travels in .whl/
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 3
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nvcc --version | tail -2
  python3 -c "import torch,triton,transformers;print('torch',torch.__version__,'cuda',torch.version.cuda,'triton',triton.__version__,'transformers',transformers.__version__,torch.cuda.get_device_name())"
  python3 -m pytest --version; python3 -c "import xdist; print('xdist', xdist.__version__)"; nproc; } 2>&1 | tee $OUT/env.txt
archs=$(python3 -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")
AUTOSELECT_CUDA_ARCHS=$archs MAX_JOBS=16 timeout 240 python3 -m pip install --no-build-isolation --no-deps --no-index -v -e . \
  > $OUT/build.log 2>&1; echo "== build rc=$? at $(el) s"
python3 -m autoselect info 2>&1 | tail -15
timeout 60 python3 -m pytest tests --collect-only -q -p no:cacheprovider > $OUT/collected.txt 2>&1
echo "== collected: $(grep -c '::' $OUT/collected.txt) at $(el) s"
( while sleep 20; do echo "--- t=$(el) s"; ps -eo pid,ppid,etimes,pcpu,rss,args --sort=-pcpu | grep -E "pytest|python" | grep -v grep | cut -c1-220 | head -24
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader; done ) > $OUT/ps.log 2>&1 &
W=$!
left=$(( TOTAL - $(el) )); echo "== whole suite -v (xdist 16, loadfile), $left s"
timeout $left python3 -m pytest tests -v -p no:cacheprovider -rfE -n 16 --dist loadfile --durations=40 \
  -o faulthandler_timeout=100 > $OUT/full_suite_v.log 2>&1
echo "== full suite rc=$? at $(el) s"; kill $W
grep -cE " PASSED | SKIPPED | FAILED | ERROR " $OUT/full_suite_v.log
grep -E "FAILED|ERROR|passed|failed" $OUT/full_suite_v.log | tail -20; tail -c 1500 $OUT/full_suite_v.log
