#!/bin/bash
set -u
export PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 3
AUTOSELECT_CUDA_ARCHS=90 MAX_JOBS=16 timeout 200 python3 -m pip install --no-build-isolation --no-deps --no-index -q -e . > $OUT/build.log 2>&1 || { tail -30 $OUT/build.log; exit 4; }
echo "== built at $(el) s"
{ echo "== segv standalone"; timeout 60 python3 .whl/segv.py; echo "rc=$?";
  echo "== segv in pytest"; timeout 90 python3 -X faulthandler -m pytest tests/test_noise_gate.py -q -p no:cacheprovider -k compiled_op 2>&1 | tail -15;
  echo "== cuda-gdb bt"; timeout 90 cuda-gdb -q -batch -ex "set pagination off" -ex run -ex bt --args python3 .whl/segv.py 2>&1 | grep -v "^\[New Thread\|^\[Thread" | tail -40; } > $OUT/segv.log 2>&1
echo "== segv done at $(el) s"; head -c 3000 $OUT/segv.log
timeout 110 python3 .whl/diag_fp16.py > $OUT/diag_fp16.log 2>&1; echo "== diag done at $(el) s rc=$?"; cat $OUT/diag_fp16.log | tail -25
timeout 60 python3 -m pytest -q -p no:cacheprovider -rfE tests/test_sync_free.py tests/test_scorer.py 2>&1 | tail -15
echo "== targeted done at $(el) s"
left=$(( 300 - $(el) )); echo "== full suite (xdist), $left s"
timeout $left python3 -m pytest tests -q -p no:cacheprovider -rfE -n 8 --dist loadfile --deselect tests/test_noise_gate.py::test_compiled_op_checks_its_inputs > $OUT/full_suite.log 2>&1
echo "== full done at $(el) s rc=$?"; grep -E "FAILED|ERROR|passed|failed" $OUT/full_suite.log | tail -20
left=$(( 390 - $(el) )); [ $left -gt 20 ] && timeout $left python3 -m autoselect bench --op prefill --device cuda --repeats 10 --results benchmarks/results > $OUT/prefill.log 2>&1
echo "== prefill done at $(el) s"; tail -12 $OUT/prefill.log; cp benchmarks/results/prefill.csv $OUT/ 2>/dev/null
