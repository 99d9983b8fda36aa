"""The ``rocm`` backend: the same Triton kernels as ``cuda``, on AMD GPUs (MI300X class) through ROCm/HIP.

A ROCm build of torch exposes HIP devices as ``cuda`` devices (``torch.version.hip`` is set), HIP streams as
``torch.cuda.Stream``, and Triton compiles the same kernels for AMD GPUs; pinned host memory (hipHostMalloc)
is device-addressable, so the zero-copy paths carry over. Selected automatically where ``torch.version.hip``
is set. Verified here only through the CPU-interpreted kernel tests: no AMD GPU was available.
"""

from __future__ import annotations

import torch

from lmcache.core.hookspecs import hookimpl
from lmcache.hardware.cuda import TritonGpuBackend


class RocmBackend(TritonGpuBackend):
    name = "rocm"

    def _platform_ok(self) -> tuple[bool, str]:
        if not torch.version.hip:
            return False, "this torch is not a ROCm build (torch.version.hip is unset)"
        return True, ""

    no_device_hint = "no AMD GPU is visible to torch (check ROCm, HIP_VISIBLE_DEVICES)"
    triton_hint = "pip install triton (the ROCm build)"

    def _platform_label(self) -> str:
        return f"HIP {torch.version.hip}"


@hookimpl
def lmcache_hardware_backends():
    return [RocmBackend()]
