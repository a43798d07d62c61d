"""Builds autoselect and its compiled extension autoselect._C.

The C++ CPU kernels are always built. The CUDA kernels are built when the installed torch has CUDA
(torch.version.cuda) and nvcc is found. Knobs (environment variables):

  AUTOSELECT_SKIP_CUDA_BUILD=1   build the CPU kernels only, even with a CUDA torch and nvcc
  AUTOSELECT_CUDA_ARCHS="80;90"  compute capabilities to compile the CUDA kernels for
  MAX_JOBS=N                     parallel compile jobs (read by torch's build extension)
  AUTOSELECT_PREBUILT_EXTENSION=path/to/_C.<EXT_SUFFIX>
                                 package this already-built autoselect._C instead of compiling it
                                 (its file name must be the one this build would write); the wheel
                                 check of tests/test_build.py uses the extension that `make install`
                                 built rather than compiling every kernel a second time

Install with `pip install --no-build-isolation -e .` (or without -e): build isolation would pull a
different torch than the one the extension must match.
"""

import importlib.util
import os
import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent


def load_build_flags():
    spec = importlib.util.spec_from_file_location("_build_flags", HERE / "autoselect" / "_build_flags.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_version() -> str:
    text = (HERE / "autoselect" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


def extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    flags = load_build_flags()
    version = read_version()
    skip_cuda = flags.env_flag("AUTOSELECT_SKIP_CUDA_BUILD")
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and not skip_cuda
    sources = sorted(str(p.relative_to(HERE)) for p in (HERE / "csrc").glob("*.cpp"))
    link = flags.LINK_FLAGS + flags.libstdcxx_link_args()  # torch is imported: its libstdc++ is loaded
    if not with_cuda:
        cxx = flags.CXX_FLAGS + flags.defines(version, torch.__version__)
        return [CppExtension("autoselect._C", sources, extra_compile_args={"cxx": cxx},
                             extra_link_args=link)]
    archs = flags.cuda_archs()
    defines = flags.defines(version, torch.__version__, archs)
    sources += sorted(str(p.relative_to(HERE)) for p in (HERE / "csrc").glob("*.cu"))
    return [CUDAExtension("autoselect._C", sources,
                          extra_compile_args={"cxx": flags.CXX_FLAGS + defines,
                                              "nvcc": flags.nvcc_flags(archs) + defines},
                          extra_link_args=link)]


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    base = BuildExtension.with_options(use_ninja=True)

    class build_ext(base):
        def build_extension(self, ext):
            prebuilt = os.environ.get("AUTOSELECT_PREBUILT_EXTENSION", "").strip()
            if not prebuilt:
                return super().build_extension(ext)
            target = self.get_ext_fullpath(ext.name)
            if os.path.basename(prebuilt) != os.path.basename(target) or not os.path.isfile(prebuilt):
                raise RuntimeError(f"AUTOSELECT_PREBUILT_EXTENSION={prebuilt!r}: expected an existing file named "
                                   f"{os.path.basename(target)!r} (the extension {ext.name} of this Python and platform)")
            self.mkpath(os.path.dirname(target))
            self.copy_file(prebuilt, target)

    return build_ext


setup(
    version=read_version(),
    ext_modules=extensions(),
    cmdclass={"build_ext": build_ext_class()},
)
