"""Lazy loading of the compiled extension `autoselect._C` and of the Triton kernels.

Nothing here runs at `import autoselect`: the first op call (or `info`) loads what it needs, and a
missing piece is reported with the reason instead of breaking the import.
"""

import functools
import importlib
import os


@functools.lru_cache(maxsize=None)
def _load_extension():
    try:
        import torch  # noqa: F401  (the extension's symbols come from libtorch)

        module = importlib.import_module("autoselect._C")
    except Exception as exc:  # ImportError, or an undefined symbol from a torch mismatch
        return None, (f"autoselect._C could not be loaded ({type(exc).__name__}: {exc}); build it with "
                      "`pip install --no-build-isolation -e .`")
    return module, None


def extension():
    """The compiled module, or None when it is not built (see extension_error())."""
    return _load_extension()[0]


def extension_error():
    """Why the compiled module is not available, or None when it is."""
    return _load_extension()[1]


def build_info():
    """The extension's own report of how it was built, or None when it is not loaded."""
    module = extension()
    return dict(module.build_info()) if module is not None else None


def triton_interpreting() -> bool:
    """True when Triton kernels run in the interpreter (TRITON_INTERPRET=1), on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _load_triton():
    try:
        import triton  # noqa: F401

        kernels = importlib.import_module("autoselect.triton_kernels")
    except Exception as exc:
        return None, f"triton is not usable ({type(exc).__name__}: {exc}); install it with `pip install triton`"
    return kernels, None


def triton_kernels():
    """The `autoselect.triton_kernels` package, or None when triton cannot be imported."""
    return _load_triton()[0]


def triton_error():
    return _load_triton()[1]
