#!/bin/bash
# Third GPU session, run 3: (1) select_profile.py on the select kernel of commit 4a32045 (one block per
# image, eight radix passes; its two files carried in build/old-select), built in a copy of the tree;
# (2) the default build (the environment's CXX=/opt/gcc/bin/g++) with _build_flags.libstdcxx_link_args:
# NEEDED, the linkage tests and the two TORCH_CHECK-message tests that crashed before.
set -u
export PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 3
D=benchmarks/results/gpu-2026-11-26c
rm -rf /tmp/old && mkdir /tmp/old && cp -r autoselect csrc setup.py pyproject.toml README.md /tmp/old/ && cp build/old-select/* /tmp/old/csrc/
(cd /tmp/old && CXX=g++ CC=gcc AUTOSELECT_CUDA_ARCHS=90 MAX_JOBS=16 timeout 200 python3 setup.py -q build_ext --inplace > $OUT/build_old.log 2>&1); echo "old build rc=$? at $(el) s"
PYTHONPATH=/tmp/old:/tmp/site timeout 100 python3 $D/select_profile.py 2>&1 | grep -v -i "warn" | tee $OUT/select_profile_old.log | tail -24
echo "== default build with the fix at $(el) s (CXX=${CXX:-})"
AUTOSELECT_CUDA_ARCHS=90 MAX_JOBS=16 timeout 200 python3 -m pip install --no-build-isolation --no-deps --no-index -v -e . > $OUT/build_fixed.log 2>&1; echo "build rc=$? at $(el) s"
grep -E "autoselect build:" $OUT/build_fixed.log | head -2
grep -E -e "-shared .*-o [^ ]*autoselect/_C" $OUT/build_fixed.log | tail -1 | cut -c1-700
readelf -d autoselect/_C*.so | grep NEEDED
timeout 120 python3 -m pytest -q -p no:cacheprovider -rfE tests/test_build.py -k "libstdcxx or loads" 2>&1 | tail -3 | tee $OUT/libstdcxx_tests.log
timeout 120 python3 -m pytest -q -p no:cacheprovider -rfE tests/test_noise_gate.py::test_compiled_op_checks_its_inputs \
  tests/test_select.py::test_compiled_kernel_checks_its_inputs 2>&1 | tail -3 | tee -a $OUT/libstdcxx_tests.log
echo "== done at $(el) s"
