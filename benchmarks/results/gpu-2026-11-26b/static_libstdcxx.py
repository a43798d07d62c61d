"""The suspected cause of the H100 segfault, reproduced on a CPU machine: fmt_variants.py's TORCH_CHECK
library linked with -static-libstdc++ (its own copy of libstdc++, beside the process's shared one).
Prints the library's message and whether it carries libstdc++ (the two things
tests/test_build.py::test_extension_uses_the_shared_libstdcxx checks)."""
import os, subprocess, sys, tempfile

import torch
from torch.utils import cpp_extension

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fmt_variants  # noqa: E402

tmp = tempfile.mkdtemp()
src, so = os.path.join(tmp, "fmt.cpp"), os.path.join(tmp, "fmt_static.so")
open(src, "w").write(fmt_variants.SRC)
libdir = os.path.join(os.path.dirname(torch.__file__), "lib")
subprocess.run(["g++", "-shared", "-fPIC", "-O2", "-std=c++17", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}",
                *[f"-I{p}" for p in cpp_extension.include_paths()], src, "-o", so, f"-L{libdir}", "-lc10",
                f"-Wl,-rpath,{libdir}", "-static-libstdc++"], check=True)
run = subprocess.run([sys.executable, "-c", fmt_variants.RUN, so, "torch-only"], capture_output=True, text=True)
print(f"rc={run.returncode}:", " | ".join(run.stdout.splitlines()), run.stderr[-300:].strip())
needed = [line.split("[")[-1].rstrip("]") for line in subprocess.run(["readelf", "-d", so], capture_output=True,
          text=True).stdout.splitlines() if "(NEEDED)" in line]
defined = subprocess.run(["nm", "-DC", "--defined-only", so], capture_output=True, text=True).stdout.splitlines()
print("NEEDED:", needed)
print("libstdc++ internals defined:", sum("codecvt<char16_t" in l or "std::locale::" in l for l in defined))
