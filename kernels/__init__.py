"""Adapter compute ops, installed as ``visadapt.kernels``.

Every low-rank delta in visadapt is computed through these functions, so faster implementations (fused Triton
kernels on CUDA) replace the eager PyTorch reference here without any change to the adapters that call them.
The eager functions are the specification: any other backend must match them within dtype tolerance.
"""

from .lora import block_lora_linear, get_backend, lora_linear, set_backend
from .routed import routed_lora

__all__ = ["lora_linear", "block_lora_linear", "routed_lora", "set_backend", "get_backend"]
