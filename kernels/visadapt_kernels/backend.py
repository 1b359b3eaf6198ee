"""Which implementation the kernel ops run: the eager PyTorch formulas or the Triton kernels.

"auto" (default): Triton for CUDA tensors when ``triton`` imports, eager otherwise, and Triton only once it has
passed its self-check (:mod:`.selfcheck`): the first use per process of each (op, device, dtype) runs that op's
kernels forward and backward on small tensors against its reference; a compile error, launch failure or mismatch
warns once (``KernelSelfCheckWarning``) and sends that (op, device, dtype) to the eager formulas for the rest of the
process. "eager" forces the PyTorch formulas everywhere (no Triton, no check). "triton" forces the Triton kernels,
with no check and no fallback (errors raise), also for CPU tensors; on CPU that only works under Triton's
interpreter, which must be switched on (``TRITON_INTERPRET=1``) before ``visadapt.kernels`` is first imported,
because ``@triton.jit`` reads it when the kernels are defined. Set it per process with
``VISADAPT_KERNELS=eager|triton|auto`` or at run time with :func:`set_backend`.

Test hook: with ``TRITON_INTERPRET=1`` and ``VISADAPT_KERNELS_AUTO_INTERPRET=1`` (both read at import), "auto"
treats CPU tensors as it treats CUDA tensors (self-check, then the interpreted kernels), so the self-check and its
fallback can be tested without a GPU. Nothing else sets it.

Deterministic mode (:func:`deterministic`): on with ``VISADAPT_KERNELS_DETERMINISTIC=1``, with
:func:`set_deterministic(True) <set_deterministic>`, or whenever ``torch.use_deterministic_algorithms(True)`` is in
force. The kernels then use no floating-point atomics: the dA/dB reductions write one partial per program and sum
them in a fixed order, and a routed token's k slots are summed from a per-slot buffer, so two runs give
bit-identical results. It costs memory (the partials, k × the routed output) and some parallelism.
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "eager", "triton")
# dtypes the Triton kernels take; anything else (float64, ...) runs the eager formulas under every backend
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_backend = "auto"
_deterministic = False
_fuse_shrink = False
# the test hook of the module docstring: "auto" sends interpreted CPU tensors through the self-check to Triton
AUTO_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1" and \
    os.environ.get("VISADAPT_KERNELS_AUTO_INTERPRET", "0") == "1"


def set_backend(name: str) -> None:
    """Choose the implementation: "auto" (Triton on CUDA once self-checked, eager elsewhere), "eager" or "triton"
    (forced: no self-check, errors raise)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"Unknown kernel backend {name!r}; choose one of {', '.join(BACKENDS)}.")
    if name == "triton" and not triton_available():
        raise RuntimeError("The 'triton' kernel backend needs the triton package, which does not import here.")
    _backend = name


def get_backend() -> str:
    return _backend


def set_fuse_shrink(flag: bool) -> None:
    """Experimental, off by default until measured on a GPU: compute h = s·x Aᵀ inside the base GEMM's main loop
    and g = s·dy B inside the dx GEMM's (no separate shrink kernels, x and dy read once less each, r / BN redundant
    FLOPs). Also ``VISADAPT_KERNELS_FUSE_SHRINK=1``."""
    global _fuse_shrink
    _fuse_shrink = bool(flag)


def fuse_shrink() -> bool:
    return _fuse_shrink


def set_deterministic(flag: bool) -> None:
    """Force deterministic kernels (no atomics) on or off; torch's own deterministic switch also turns them on."""
    global _deterministic
    _deterministic = bool(flag)


def deterministic() -> bool:
    """True if the kernels must give bit-identical results run to run (see the module docstring)."""
    return _deterministic or torch.are_deterministic_algorithms_enabled()


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


set_backend(os.environ.get("VISADAPT_KERNELS", "auto"))
set_deterministic(os.environ.get("VISADAPT_KERNELS_DETERMINISTIC", "0") == "1")
set_fuse_shrink(os.environ.get("VISADAPT_KERNELS_FUSE_SHRINK", "0") == "1")
