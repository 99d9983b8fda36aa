"""The ``ascend`` backend: Huawei Ascend NPUs through torch_npu's index ops, on a dedicated NPU stream.

Registered only where ``torch_npu`` imports. Triton does not target Ascend, so the copies are the torch
reference converters (``index_select`` / ``index_copy_``, which torch_npu implements on the NPU) issued on
their own stream, with the chunk staged in pinned host memory. The device is reached through a thin
``DeviceOps`` object, so the same backend runs on CPU tensors in the tests (``CpuOps``) with the same
bit-exact assertions. Verified on real NPUs: nothing - no Ascend hardware was available.
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

import torch

from lmcache.core import convert
from lmcache.core.hookspecs import hookimpl
from lmcache.core.layouts import KVLayout


class DeviceOps(Protocol):
    """What the backend needs from a device runtime (``torch.npu`` under torch_npu)."""

    device_type: str

    def available(self) -> tuple[bool, str]: ...

    def new_stream(self) -> Any: ...

    def use_stream(self, stream: Any) -> contextlib.AbstractContextManager: ...

    def wait_current(self, stream: Any) -> None: ...

    def synchronize(self, stream: Any) -> None: ...


class NpuOps:
    device_type = "npu"

    def __init__(self) -> None:
        import torch_npu  # noqa: F401 - registers torch.npu

        self.npu = torch.npu

    def available(self) -> tuple[bool, str]:
        if not self.npu.is_available():
            return False, "torch_npu imports but no NPU is visible (check the CANN driver, ASCEND_RT_VISIBLE_DEVICES)"
        return True, f"torch_npu index ops on {self.npu.get_device_name()} (Triton does not target Ascend)"

    def new_stream(self):
        return self.npu.Stream()

    def use_stream(self, stream):
        return self.npu.stream(stream)

    def wait_current(self, stream) -> None:
        stream.wait_stream(self.npu.current_stream())

    def synchronize(self, stream) -> None:
        stream.synchronize()


class CpuOps:
    """The same contract on the CPU (streams are no-ops): how the tests run this backend without an NPU."""

    device_type = "cpu"

    def available(self) -> tuple[bool, str]:
        return True, "CPU stand-in for tests"

    def new_stream(self):
        return None

    def use_stream(self, stream):
        return contextlib.nullcontext()

    def wait_current(self, stream) -> None:
        return None

    def synchronize(self, stream) -> None:
        return None


class AscendBackend:
    name = "ascend"
    priority = 10

    def __init__(self, ops: DeviceOps) -> None:
        self.ops = ops
        self.device_types = (ops.device_type,)
        self._stream = None

    def available(self) -> tuple[bool, str]:
        return self.ops.available()

    def alloc_host(self, nbytes: int, pin: bool) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)

    def _run(self, kv: KVLayout, jobs, fn) -> None:
        if self._stream is None:
            self._stream = self.ops.new_stream()
        self.ops.wait_current(self._stream)
        layers = range(kv.num_layers)
        with self.ops.use_stream(self._stream):
            for plan, chunk in jobs:
                if plan.slots.numel():
                    fn(kv, plan, chunk, layers)

    def gather(self, kv: KVLayout, jobs) -> None:
        self._run(kv, jobs, convert.gather)

    def scatter(self, kv: KVLayout, jobs) -> None:
        self._run(kv, jobs, convert.scatter)

    def synchronize(self) -> None:
        if self._stream is not None:
            self.ops.synchronize(self._stream)


@hookimpl
def lmcache_hardware_backends():
    try:
        ops = NpuOps()
    except Exception:  # noqa: BLE001 - no torch_npu here: the backend is not registered at all
        return []
    return [AscendBackend(ops)]
