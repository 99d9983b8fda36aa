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

    def available(self) -> tuple[bool, str]:
        ok, why = self._platform_ok()
        if not ok:
            return False, why
        if not torch.cuda.is_available():
            return False, "no AMD GPU is visible to torch (check ROCm, HIP_VISIBLE_DEVICES)"
        from lmcache.hardware import triton_copy

        if triton_copy.IMPORT_ERROR:
            return False, f"Triton is not importable ({triton_copy.IMPORT_ERROR}): pip install triton (ROCm build)"
        return True, (f"Triton {triton_copy.triton.__version__} kernels on {torch.cuda.get_device_name()} "
                      f"(HIP {torch.version.hip})")


@hookimpl
def lmcache_hardware_backends():
    return [RocmBackend()]
