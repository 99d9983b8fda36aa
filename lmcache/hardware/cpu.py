"""The ``cpu`` backend: the torch reference converters, on any device, split across threads on CPU.

It is the correctness reference every faster backend is tested against, and the path for CPU-resident
KV memory (CPU inference, tests). On CPU tensors the per-layer copies run on a small thread pool:
torch releases the GIL inside each copy, and one core cannot saturate memory bandwidth.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch

from lmcache.core import convert
from lmcache.core.hookspecs import hookimpl
from lmcache.core.layouts import KVLayout


def default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


class CpuBackend:
    name = "cpu"
    device_types = ("cpu", "cuda", "xpu", "npu", "mps")
    priority = 0

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or default_threads()
        self._pool: ThreadPoolExecutor | None = None

    def available(self) -> tuple[bool, str]:
        return True, "torch reference ops: always available, correct on any device, not the fastest on accelerators"

    def alloc_host(self, nbytes: int, pin: bool) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)

    def _run(self, kv: KVLayout, jobs, fn) -> None:
        layers = range(kv.num_layers)
        if kv.device.type != "cpu" or self.threads == 1 or not jobs:
            for plan, chunk in jobs:
                fn(kv, plan, chunk, layers)
            return
        if self._pool is None:
            # each worker runs single-threaded torch ops: our pool is the parallelism, and torch's own
            # intra-op threads on top of it would oversubscribe the cores (the setting is per thread)
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="lmcache-copy",
                                            initializer=torch.set_num_threads, initargs=(1,))
        # whole chunks per task when there are enough of them (converters move a whole chunk in one
        # op where the layout allows); otherwise split the layers of the few chunks
        step = len(layers) if len(jobs) >= 2 * self.threads else max(1, len(layers) // self.threads)
        tasks = [(plan, chunk, range(s, min(s + step, len(layers)))) for plan, chunk in jobs
                 for s in range(0, len(layers), step)]
        for f in [self._pool.submit(fn, kv, p, c, r) for p, c, r in tasks]:
            f.result()

    def gather(self, kv: KVLayout, jobs) -> None:
        self._run(kv, jobs, convert.gather)

    def scatter(self, kv: KVLayout, jobs) -> None:
        self._run(kv, jobs, convert.scatter)

    def synchronize(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()


@hookimpl
def lmcache_hardware_backends():
    return [CpuBackend()]
