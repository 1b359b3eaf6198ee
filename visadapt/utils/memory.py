"""Memory a run may still take: what is free on its device, and how a run that cannot fit is refused before it
starts (:class:`~visadapt.utils.errors.NotEnoughMemoryError`, a one-line message with the numbers and the fix)."""

from __future__ import annotations

from pathlib import Path
from typing import Union

GiB = 2 ** 30


def host_available_bytes() -> int:
    """Bytes of RAM this process may still take: the kernel's ``MemAvailable`` (psutil's ``available``), lowered to
    what a cgroup v2 memory limit leaves (containers, systemd slices)."""
    try:
        import psutil

        available = int(psutil.virtual_memory().available)
    except ImportError:  # accelerate needs psutil, so this is a stripped-down install
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            available = min(available, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return available


def available_bytes(device: Union[str, "torch.device"]) -> int:  # noqa: F821
    """Bytes still free where ``device``'s tensors live: the GPU's free memory for CUDA, else the host's
    (:func:`host_available_bytes`)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return host_available_bytes()


def gib(n: float) -> str:
    """``n`` bytes as GiB with one decimal (``"3.2 GiB"``)."""
    return f"{n / GiB:.1f} GiB"
