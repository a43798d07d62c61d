#!/bin/bash
# Third GPU session, run 4: the default build (with the libstdc++ fix) and the whole suite on the GPU,
# the two direct-call TORCH_CHECK tests included (deselected in the earlier sessions), under a limit.
set -u
export PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 3
AUTOSELECT_CUDA_ARCHS=90 MAX_JOBS=16 timeout 120 python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . > $OUT/build4.log 2>&1; echo "build rc=$? at $(el) s"
readelf -d autoselect/_C*.so | grep -c "libstdc++.so.6"
left=$(( ${TOTAL:-225} - $(el) )); echo "== whole suite (xdist 12), $left s"
timeout $left python3 -m pytest tests -q -p no:cacheprovider -rfE -n 12 --dist loadfile --durations=10 > $OUT/full_suite.log 2>&1
echo "== full suite rc=$? at $(el) s"; grep -E "FAILED|ERROR|passed|failed" $OUT/full_suite.log | tail -20; tail -c 400 $OUT/full_suite.log
