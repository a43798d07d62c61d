"""Backend choice per op and device.

Backends: `reference` (pure PyTorch, every device), `cpp` (C++ CPU kernels of autoselect._C),
`cuda` (CUDA kernels of autoselect._C), `triton` (autoselect.triton_kernels; on CPU tensors only under
TRITON_INTERPRET=1, which is for tests, not speed). Each op lists the backends it implements; the
fastest available one is chosen per device, unless one is forced by `AUTOSELECT_BACKEND` or
`force_backend(...)`. A forced backend that the op implements but that cannot run on the device is an
error that says why; an op that does not implement the forced backend uses its reference.
"""

import contextlib
import os
import threading

import torch

from . import _ext

BACKENDS = ("reference", "cpp", "cuda", "triton")

# Preference per device type, fastest first. The interpreter never wins on the CPU unless forced.
_PREFERENCE = {
    "cpu": ("cpp", "reference", "triton"),
    "cuda": ("cuda", "triton", "reference"),
}

# op name -> backends it implements (filled by the op modules through `register_op`).
_OPS = {}

_forced = threading.local()

# op name -> a one-line note on inputs its fast backends leave to the reference, or a callable returning
# one (or None); filled by the op modules through `register_limits`, shown by `backends()`.
_LIMITS = {}


def register_op(name: str, implemented):
    """Declare an op and the backends it implements (a subset of BACKENDS)."""
    unknown = set(implemented) - set(BACKENDS)
    if unknown:
        raise ValueError(f"unknown backends {sorted(unknown)} for op {name}")
    _OPS[name] = tuple(b for b in BACKENDS if b in implemented)


def register_limits(name: str, note):
    """Declare a one-line note (or a callable returning one, or None) on the inputs that op `name`'s
    kernels do not serve and run on its reference; `backends()` shows it under the op as "limits"."""
    _LIMITS[name] = note


def _forced_backend():
    value = getattr(_forced, "value", None) or os.environ.get("AUTOSELECT_BACKEND", "").strip() or None
    if value is not None and value not in BACKENDS:
        raise ValueError(f"AUTOSELECT_BACKEND={value!r} is not a backend; choose one of {', '.join(BACKENDS)}")
    return value


@contextlib.contextmanager
def force_backend(name):
    """Within the block, ops that implement backend `name` use it (like AUTOSELECT_BACKEND=name, for
    this thread); `None` restores the automatic choice."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"{name!r} is not a backend; choose one of {', '.join(BACKENDS)}")
    previous = getattr(_forced, "value", None)
    _forced.value = name
    try:
        yield
    finally:
        _forced.value = previous


def availability(backend: str, device_type: str):
    """(True, None) when `backend` can run on devices of `device_type`, else (False, reason)."""
    if backend == "reference":
        return True, None
    if device_type not in _PREFERENCE:
        return False, f"no kernels for device type {device_type!r}"
    if backend == "cpp":
        if device_type != "cpu":
            return False, "C++ kernels run on the CPU only"
        return (True, None) if _ext.extension() is not None else (False, _ext.extension_error())
    if backend == "cuda":
        if device_type != "cuda":
            return False, "CUDA kernels need a CUDA device"
        if not torch.cuda.is_available():
            return False, "no CUDA device is available to torch"
        info = _ext.build_info()
        if info is None:
            return False, _ext.extension_error()
        if not info["cuda"]:
            return False, ("autoselect._C was built without CUDA (torch had no CUDA, nvcc was missing, or "
                           "AUTOSELECT_SKIP_CUDA_BUILD was set)")
        return True, None
    if backend == "triton":
        if _ext.triton_kernels() is None:
            return False, _ext.triton_error()
        if device_type == "cpu" and not _ext.triton_interpreting():
            return False, "Triton runs CPU tensors only in its interpreter (TRITON_INTERPRET=1, for tests)"
        if device_type == "cuda" and not torch.cuda.is_available():
            return False, "no CUDA device is available to torch"
        return True, None
    raise ValueError(f"unknown backend {backend!r}")


def choose(op: str, device: torch.device) -> str:
    """The backend that runs `op` on `device` now."""
    implemented = _OPS[op]
    device_type = device.type
    forced = _forced_backend()
    if forced is not None:
        if forced not in implemented:
            return "reference"
        ok, reason = availability(forced, device_type)
        if not ok:
            raise RuntimeError(f"{op}: backend {forced!r} was forced but cannot run on {device_type}: {reason}")
        return forced
    for backend in _PREFERENCE.get(device_type, ("reference", )):
        if backend in implemented and availability(backend, device_type)[0]:
            return backend
    return "reference"


def backends(device=None):
    """For each op: the backends available on `device` (default: cuda when available, else cpu),
    the one chosen now, and why each missing one is missing.

    Returns {op: {"available": [...], "chosen": str, "missing": {backend: reason}}}, plus "limits": a
    one-line note for ops whose kernels leave some inputs to the reference (`register_limits`)."""
    _import_ops()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    table = {}
    for op, implemented in _OPS.items():
        available, missing = [], {}
        for backend in implemented:
            ok, reason = availability(backend, device.type)
            if ok:
                available.append(backend)
            else:
                missing[backend] = reason
        try:
            chosen = choose(op, device)
        except RuntimeError as exc:  # a forced backend that cannot run here
            chosen, missing["error"] = None, str(exc)
        table[op] = {"available": available, "chosen": chosen, "missing": missing}
        note = _LIMITS.get(op)
        note = note() if callable(note) else note
        if note:
            table[op]["limits"] = note
    return table


def _import_ops():
    from . import ops  # noqa: F401  (registers every op)
