"""Does formatting an integer in a TORCH_CHECK message crash in *any* library built on this machine, or only
with the extension's flags? Builds a tiny shared library (no pybind: extern "C", loaded with ctypes after
`import torch`, linked to libc10) once per flag set, and calls it in a fresh process per variant."""
import os, subprocess, sys, tempfile

SRC = r'''
#include <c10/util/Exception.h>
#include <cstring>
#include <string>
extern "C" int fmt(long n, char* out, int cap) {
  try { TORCH_CHECK(n < 0, "fmt: n must be negative, got ", n, " of ", n + 1); }
  catch (const c10::Error& e) { std::string m = e.what_without_backtrace(); std::strncpy(out, m.c_str(), cap - 1); return 1; }
  return 0;
}
extern "C" int fmt_str(long n, char* out, int cap) {
  try { TORCH_CHECK(n < 0, std::string("fmt_str: n must be negative, got ") + std::to_string(n)); }
  catch (const c10::Error& e) { std::string m = e.what_without_backtrace(); std::strncpy(out, m.c_str(), cap - 1); return 1; }
  return 0;
}
'''
VARIANTS = {
    "torch-default(-O2,c++17)": ["-O2", "-std=c++17"],
    "extension(-O3,c++20,-fopenmp)": ["-O3", "-std=c++20", "-fno-math-errno", "-fopenmp", "-Wno-psabi"],
    "extension-without-fopenmp": ["-O3", "-std=c++20", "-fno-math-errno", "-Wno-psabi"],
    "extension-with-c++17": ["-O3", "-std=c++17", "-fno-math-errno", "-fopenmp", "-Wno-psabi"],
}
RUN = r'''
import ctypes, sys, torch
if sys.argv[2] == "after-autoselect":
    import autoselect; autoselect._ext.extension()
lib = ctypes.CDLL(sys.argv[1]); buf = ctypes.create_string_buffer(256)
for name in ("fmt_str", "fmt"):
    rc = getattr(lib, name)(ctypes.c_long(2), buf, 256); print(name, rc, buf.value.decode()[:60], flush=True)
'''

if __name__ == "__main__":
    import torch
    from torch.utils import cpp_extension
    inc = cpp_extension.include_paths()
    libdir = os.path.join(os.path.dirname(torch.__file__), "lib")
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"
    tmp = tempfile.mkdtemp()
    src = os.path.join(tmp, "fmt.cpp"); open(src, "w").write(SRC)
    builds = {}
    for i, (name, flags) in enumerate(VARIANTS.items()):
        so = os.path.join(tmp, f"fmt{i}.so")
        link = ["-fopenmp"] if "-fopenmp" in flags else []
        cmd = ["g++", "-shared", "-fPIC", abi, *flags, *[f"-I{p}" for p in inc], src, "-o", so, f"-L{libdir}", "-lc10",
               f"-Wl,-rpath,{libdir}", *link]
        builds[name] = (so, subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True))
    print("g++:", subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout.splitlines()[0])
    for name, (so, proc) in builds.items():
        err = proc.communicate()[1]
        if proc.returncode:
            print(f"{name}: build failed: {err[-500:]}"); continue
        for when in ("torch-only", "after-autoselect"):
            r = subprocess.run([sys.executable, "-c", RUN, so, when], capture_output=True, text=True, timeout=120)
            print(f"{name} [{when}] rc={r.returncode}: {' | '.join(r.stdout.splitlines())} {r.stderr[-200:].strip()}")
