"""Adapter compute ops, installed as ``visadapt.kernels`` (this folder, ``kernels/visadapt_kernels/``).

Every low-rank delta in visadapt is computed through these functions, so the fused Triton kernels (CUDA) replace
the eager PyTorch formulas here without any change to the adapters that call them:

- :func:`lora_linear` — y = x Wᵀ + b + s · (x Aᵀ) Bᵀ, the expand fused into the base GEMM's epilogue;
- :func:`block_lora_linear` — the same with one A_s shared by the n input chunks (Block-LoRA);
- :func:`routed_lora` — the delta of L stacked adapters chosen per token (region routing, mixed batches).

They are torch custom ops with their own backward, so ``torch.compile`` traces them. The backend is chosen per
call: Triton for CUDA tensors when triton imports, eager PyTorch otherwise; :func:`set_backend` or the environment
variable ``VISADAPT_KERNELS`` (``auto`` | ``eager`` | ``triton``) forces one. Under ``auto`` the kernels must first
pass a one-time self-check per (op, device, dtype) against the references (:mod:`.selfcheck`); if they fail it a
:class:`KernelSelfCheckWarning` says so once and that op runs eager from then on. ``triton`` skips the check and
raises kernel errors; ``eager`` never touches Triton. :func:`set_deterministic` (or
``VISADAPT_KERNELS_DETERMINISTIC=1``, or torch's ``use_deterministic_algorithms``) makes them run-to-run exact.
The plain-autograd ``*_reference`` functions are the specification: every backend must match them within dtype
tolerance. Dropout on the low-rank branch runs inside the kernels where they run (Philox masks from a seed drawn
per call, :mod:`.dropout`); :func:`dropout_mask` writes out the masks a (seed, offset) gives.
"""

from .backend import deterministic, get_backend, set_backend, set_deterministic
from .lora import block_lora_linear_reference, lora_linear_reference
from .ops import block_lora_linear, dropout_mask, lora_linear, routed_lora
from .routed import routed_lora_reference
from .selfcheck import KernelSelfCheckWarning

__all__ = ["lora_linear", "block_lora_linear", "routed_lora", "set_backend", "get_backend", "set_deterministic",
           "deterministic", "lora_linear_reference", "block_lora_linear_reference", "routed_lora_reference",
           "KernelSelfCheckWarning", "dropout_mask"]
