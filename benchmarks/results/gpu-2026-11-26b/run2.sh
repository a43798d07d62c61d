#!/bin/bash
# the session's last device minutes: where AutoSelect's prefill overhead goes (overhead.py), the paper's
# Scorer alone (benchmarks/bench_scorer.py); no build (the compiled extension is absent: the reference ops run)
set -u
export PYTHONUNBUFFERED=1
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 3
timeout 150 python3 benchmarks/results/gpu-2026-11-26b/overhead.py > $OUT/overhead.log 2>&1; echo "== overhead rc=$? at $(( $(date +%s) - T0 )) s"
grep -v "^USDT" $OUT/overhead.log | cut -c1-200 | head -60
left=$(( 200 - $(date +%s) + T0 )); echo "== bench_scorer, $left s"
[ $left -gt 20 ] && timeout $left python3 benchmarks/bench_scorer.py --device cuda --results $OUT/scorer.csv > $OUT/scorer.log 2>&1
echo "== scorer rc=$? at $(( $(date +%s) - T0 )) s"; tail -8 $OUT/scorer.log
