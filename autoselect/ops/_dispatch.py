"""What every op shares: its backend table, the op-math dtype rule and the value checks.

Each op file declares its kernels once, `KERNELS = Kernels("op", reference=..., cpp=..., ...)`, and
calls `KERNELS.run(device, *args)` (or `KERNELS.run(device, *args, table="backward")` for a second
table added with `KERNELS.add("backward", ...)`); `compiled("name")` stands for a kernel of the extension, loading autoselect._C on first use.

Value checks (alpha in [0, 1], finite scores) never read a tensor back to the host: `check_values`
queues a device-side assert (`torch._assert_async`), which raises at once on the CPU and no later
than the next synchronisation on a GPU, so a pruned prefill stays free of host syncs and can be
captured in a CUDA graph. `AUTOSELECT_DEBUG_CHECKS=1` turns on the host-side checks instead: they synchronise, and their
messages say how many values are bad and where the first one is.
"""

import warnings
from typing import Callable, Dict, Optional

import torch
from torch import Tensor

from .. import _backends, _ext
from .._build_flags import env_flag

DEBUG_CHECKS = "AUTOSELECT_DEBUG_CHECKS"


def opmath(dtype: torch.dtype) -> torch.dtype:
    """The dtype ops compute in: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def debug_checks() -> bool:
    """True when AUTOSELECT_DEBUG_CHECKS asks for the detailed (synchronising) value checks."""
    return env_flag(DEBUG_CHECKS)


def check_values(ok: Tensor, message: str, details: Callable[[], str] = None):
    """Raise ValueError(message) unless the boolean scalar `ok` is true, without a host sync.

    The check is a device-side assert: on the CPU it raises here; on a GPU the error surfaces as a
    RuntimeError no later than the next synchronisation (a later kernel launch may report it first),
    and it ends the CUDA context, as any failed device assert does. With AUTOSELECT_DEBUG_CHECKS=1 it
    reads `ok` on the host instead and appends `details()` (which may read tensors) to the message.
    """
    if debug_checks():
        if not bool(ok):
            raise ValueError(message + (f"; {details()}" if details is not None else ""))
        return
    hint = f" (set {DEBUG_CHECKS}=1 to see where)" if details is not None else ""
    try:
        torch._assert_async(ok, message + hint)
    except RuntimeError:  # raised synchronously: a CPU tensor
        raise ValueError(message + hint) from None


def compiled(name: str) -> Callable:
    """A kernel of the compiled extension, `torch.ops.autoselect_C.<name>`, loaded on first call."""

    def call(*args):
        if _ext.extension() is None:  # loading the module registers its ops
            raise RuntimeError(_ext.extension_error())
        return getattr(torch.ops.autoselect_C, name)(*args)

    call.__name__ = f"autoselect_C.{name}"
    return call


def triton(module: str, name: str) -> Callable:
    """A host function of `autoselect.triton_kernels.<module>`, imported on first call."""

    def call(*args):
        kernels = _ext.triton_kernels()
        if kernels is None:
            raise RuntimeError(_ext.triton_error())
        return getattr(getattr(kernels, module), name)(*args)

    call.__name__ = f"triton_kernels.{module}.{name}"
    return call


class Kernels:
    """The kernels of one op, per backend, registered with the backend chooser.

    `Kernels("noise_gate", reference=f, cpp=g, cuda=g, triton=h)` declares the backends the op
    implements; `add`ed tables (e.g. the backward) must name the same backends. A backend whose
    kernels serve only some inputs passes `unsupported={backend: fn}`, fn(*args) giving a one-line
    reason (or None) from the call's arguments; such calls run the reference, with a warning once per
    reason, and `limits` (a note, or a callable returning one) is shown by `autoselect.backends()`.
    """

    def __init__(self, op: str, *, unsupported: Optional[Dict[str, Callable]] = None, limits=None,
                 **table: Callable):
        self.op = op
        self.tables: Dict[str, Dict[str, Callable]] = {"forward": table}
        self.unsupported = dict(unsupported or {})
        self._warned = set()
        _backends.register_op(op, tuple(table))
        if limits is not None:
            _backends.register_limits(op, limits)

    def add(self, name: str, **table: Callable) -> "Kernels":
        """A second table for the op (e.g. "backward"), over the same backends."""
        if set(table) != set(self.tables["forward"]):
            raise ValueError(f"{self.op}: table {name!r} names backends {sorted(table)}, the op implements "
                             f"{sorted(self.tables['forward'])}")
        self.tables[name] = table
        return self

    def backend(self, device: torch.device, *args) -> str:
        """The backend that runs a call on `device` with `args`."""
        backend = _backends.choose(self.op, device)
        check = self.unsupported.get(backend)
        reason = check(*args) if check is not None and args else None
        if reason is None:
            return backend
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"{self.op}: {reason}; running the reference instead", stacklevel=4)
        return "reference"

    def run(self, device: torch.device, *args, table: str = "forward"):
        """Run the chosen backend's kernel of `table` on `args`."""
        return self.tables[table][self.backend(device, *args)](*args)
