#!/bin/bash
# Third GPU session, run 2: the environment's CXX=/opt/gcc/bin/g++ linked the extension (run.sh's
# link command). What that compiler does with libstdc++; the same build with Ubuntu's g++ (CXX=g++):
# its NEEDED libraries, the linkage test and the two TORCH_CHECK-message tests that crashed before;
# then where select_topk's time goes (select_profile.py).
set -u
export PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 3
D=benchmarks/results/gpu-2026-11-26c
{ echo "== /opt/gcc/bin/g++"; file -L /opt/gcc/bin/g++; /opt/gcc/bin/g++ --version | head -1
  echo "libstdc++.so=$(/opt/gcc/bin/g++ -print-file-name=libstdc++.so) libstdc++.a=$(/opt/gcc/bin/g++ -print-file-name=libstdc++.a)"
  /opt/gcc/bin/g++ -v 2>&1 | grep -o -- "--[a-z-]*static[a-z-]*[=a-z0-9,+-]*\|--prefix=[^ ]*\|--with-[a-z-]*=[^ ]*" | head
  /opt/gcc/bin/g++ -dumpspecs 2>/dev/null | grep -n "static-libstdc\|static-libgcc" | head -5
  ls /opt/gcc/lib64 2>/dev/null | grep -E "stdc|gcc_s" | head
  printf '#include <string>\nstd::string f(long x) { return std::to_string(x); }\n' > /tmp/t.cpp
  echo "== a one-function C++ library linked by /opt/gcc/bin/g++ -shared: NEEDED, defined num_put"
  /opt/gcc/bin/g++ -shared -fPIC /tmp/t.cpp -o /tmp/t3.so && readelf -d /tmp/t3.so | grep NEEDED; nm -DC --defined-only /tmp/t3.so | grep -c "num_put"
} > $OUT/optgcc.txt 2>&1
cat $OUT/optgcc.txt
echo "== build with CXX=g++ CC=gcc (Ubuntu's), arch 90, 16 jobs"
CXX=g++ CC=gcc AUTOSELECT_CUDA_ARCHS=90 MAX_JOBS=16 timeout 240 python3 -m pip install --no-build-isolation --no-deps --no-index -v -e . > $OUT/build_system_gxx.log 2>&1; echo "build rc=$? at $(el) s"
grep -E -e "-shared .*-o [^ ]*autoselect/_C" $OUT/build_system_gxx.log | tail -1 | cut -c1-600
readelf -d autoselect/_C*.so | grep NEEDED
timeout 120 python3 -m pytest -q -p no:cacheprovider -rfE tests/test_build.py -k "libstdcxx or loads" \
  tests/test_noise_gate.py::test_compiled_op_checks_its_inputs tests/test_select.py::test_compiled_kernel_checks_its_inputs \
  2>&1 | tail -8 | tee $OUT/libstdcxx_tests.log
echo "== select profile at $(el) s"
timeout 150 python3 $D/select_profile.py 2>&1 | tee $OUT/select_profile.log | tail -30
echo "== done at $(el) s"
