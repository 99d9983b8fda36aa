"""The ``cuda`` backend: Triton kernels (``triton_copy``) on a dedicated CUDA stream.

Gathers read the engine's paged KV memory on the GPU and write canonical chunks straight into pinned
host memory (the CPU tier) over PCIe, one launch for every layer, head and chunk of a call; scatters read
pinned chunks and write the paged memory the same way. Chunks in pageable host memory (a pool that could
not be pinned) are staged through device memory, which costs a second pass.

Nothing is compiled ahead of time: the kernels are JIT-compiled by the installed Triton for the installed
torch. When a kernel cannot be used (no Triton, an odd layout, a compile failure), the copy falls back to
the torch reference ops - never silently: the reason is logged once, kept in ``fallback``, shown by
``lmcache doctor`` (which runs ``self_test``) and printed by ``lmcache bench``.
"""

from __future__ import annotations

import logging
import threading

import torch

from lmcache.core import convert
from lmcache.core.hookspecs import hookimpl
from lmcache.core.layouts import KVLayout

log = logging.getLogger("lmcache")


class TritonGpuBackend:
    name = "cuda"
    device_types = ("cuda",)
    priority = 10

    def __init__(self) -> None:
        self._copier = None  # built on first use: importing Triton takes a while, and only GPU hosts need it
        #: why the last copy did not use the kernels (None: it did)
        self.fallback: str | None = None
        self._warned: set[str] = set()
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._lock = threading.Lock()

    @property
    def copier(self):
        if self._copier is None:
            from lmcache.hardware import triton_copy

            self._copier = triton_copy.TritonCopier()
        return self._copier

    # -- what is here ---------------------------------------------------------------------------------

    def _platform_ok(self) -> tuple[bool, str]:
        if torch.version.hip:
            return False, f"this torch is a ROCm build ({torch.version.hip}): the rocm backend serves it"
        if torch.version.cuda is None:
            return False, "this torch has no CUDA support (a CPU build): install a CUDA build of torch"
        return True, ""

    #: what to check when torch sees no device, and how to install Triton, for this platform
    no_device_hint = "no GPU is visible to torch (check the driver, CUDA_VISIBLE_DEVICES)"
    triton_hint = "pip install triton"

    def _platform_label(self) -> str:
        return f"torch {torch.__version__}"

    def available(self) -> tuple[bool, str]:
        ok, why = self._platform_ok()
        if not ok:
            return False, why
        if not torch.cuda.is_available():
            return False, self.no_device_hint
        from lmcache.hardware import triton_copy

        if triton_copy.IMPORT_ERROR:
            return False, f"Triton is not importable ({triton_copy.IMPORT_ERROR}): {self.triton_hint}"
        return True, (f"Triton {triton_copy.triton.__version__} kernels on {torch.cuda.get_device_name()} "
                      f"({self._platform_label()})")

    def self_test(self) -> tuple[bool, str]:
        """Run the kernels once on a small paged cache on this device, bit-exact against the reference."""
        ok, why = self.available()
        if not ok:
            return False, why
        try:
            return _self_test(self)
        except Exception as e:  # noqa: BLE001 - the doctor reports any failure with its reason
            return False, f"kernel self-test failed: {type(e).__name__}: {e}"

    # -- HardwareBackend ------------------------------------------------------------------------------

    def alloc_host(self, nbytes: int, pin: bool) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)

    def gather(self, kv: KVLayout, jobs) -> None:
        self._copy(kv, jobs, to_chunk=True)

    def scatter(self, kv: KVLayout, jobs) -> None:
        self._copy(kv, jobs, to_chunk=False)

    def synchronize(self) -> None:
        for stream in list(self._streams.values()):
            stream.synchronize()

    def scatter_by_layer(self, kv: KVLayout, jobs) -> list:
        """Issue every layer's scatter in order on the copy stream; one event per layer (``wait_event``)."""
        layers = kv.num_layers
        jobs = [(p, c) for p, c in jobs if p.slots.numel()]
        why = self.copier.supports(kv) if jobs else "nothing to copy"
        if why is None and kv.device.type != "cuda":
            why = f"the KV memory is on {kv.device}, not a GPU"
        if why is None and not all(c.device == kv.device or c.is_pinned() for _, c in jobs):
            why = "chunks in pageable host memory"
        if why is not None:  # all layers now, then nothing to wait for
            self.scatter(kv, jobs)
            self.synchronize()
            return [None] * layers
        stream = self.stream(kv.device)
        stream.wait_stream(torch.cuda.current_stream(kv.device))
        events = []
        with torch.cuda.stream(stream):
            launch = self.copier.prepare(kv, jobs)
            for layer in range(layers):
                self.copier.run(launch, range(layer, layer + 1), to_chunk=False)
                event = torch.cuda.Event()
                event.record(stream)
                events.append(event)
        return events

    def wait_event(self, event) -> None:
        """Make the caller's current stream (the forward pass) wait for one layer's copies."""
        if event is not None:
            torch.cuda.current_stream().wait_event(event)

    # -- copies ---------------------------------------------------------------------------------------

    def stream(self, device: torch.device) -> torch.cuda.Stream:
        index = device.index if device.index is not None else torch.cuda.current_device()
        with self._lock:
            s = self._streams.get(index)
            if s is None:
                s = self._streams[index] = torch.cuda.Stream(device=index)
            return s

    def _copy(self, kv: KVLayout, jobs, to_chunk: bool) -> None:
        jobs = [(p, c) for p, c in jobs if p.slots.numel()]
        if not jobs:
            return
        why = self.copier.supports(kv)
        if why is None and kv.device.type != "cuda":
            why = f"the KV memory is on {kv.device}, not a GPU"
        if why is not None:
            self._reference(kv, jobs, to_chunk, why)
            return
        stream = self.stream(kv.device)
        # the copy stream starts after the work already queued (the forward that wrote this KV)
        stream.wait_stream(torch.cuda.current_stream(kv.device))
        with torch.cuda.stream(stream):
            direct, staged = [], []
            for plan, chunk in jobs:
                if chunk.device == kv.device or (chunk.device.type == "cpu" and chunk.is_pinned()):
                    direct.append((plan, chunk))
                else:  # pageable host memory is out of the GPU's reach: go through device memory
                    staged.append((plan, chunk, torch.empty_like(chunk, device=kv.device)))
            try:
                if to_chunk:
                    self.copier.gather(kv, direct + [(p, d) for p, _, d in staged])
                    for _, chunk, dev in staged:
                        chunk.copy_(dev)
                else:
                    for _, chunk, dev in staged:
                        dev.copy_(chunk, non_blocking=True)
                    self.copier.scatter(kv, direct + [(p, d) for p, _, d in staged])
                self.fallback = None
            except Exception as e:  # noqa: BLE001 - a compile/launch failure must not lose the copy
                stream.synchronize()
                self._reference(kv, jobs, to_chunk, f"Triton kernel failed ({type(e).__name__}: {e})")
        if staged:
            self.note("chunks in pageable host memory were staged through the GPU (pin the CPU pool: "
                      "pin_cpu_memory: yes, and check 'ulimit -l')")

    def _reference(self, kv: KVLayout, jobs, to_chunk: bool, why: str) -> None:
        self.fallback = why
        self.note(f"{self.name} backend: using the slower torch reference ops: {why}")
        fn = convert.gather if to_chunk else convert.scatter
        layers = range(kv.num_layers)
        for plan, chunk in jobs:
            fn(kv, plan, chunk, layers)

    def note(self, message: str) -> None:
        """Log ``message`` once per process (a fallback is never silent, and never floods the log)."""
        if message not in self._warned:
            self._warned.add(message)
            log.warning("lmcache: %s", message)


def _self_test(backend: TritonGpuBackend) -> tuple[bool, str]:
    from lmcache.core.layouts import BlockPagedKV

    device = torch.device("cuda")
    layers, blocks, heads, block_size, row = 3, 8, 2, 16, 64
    storage = torch.empty(layers, blocks, block_size, heads, row, dtype=torch.bfloat16, device=device)
    storage.view(torch.int16).random_()
    kv = BlockPagedKV([storage[l].permute(0, 2, 1, 3) for l in range(layers)])
    slots = (torch.tensor([5, 2], device=device)[:, None] * block_size + torch.arange(block_size, device=device)).flatten()
    plan = convert.plan_slots(kv, slots)
    want = torch.empty(heads, layers, slots.numel(), row, dtype=torch.bfloat16, device=device)
    convert.gather(kv, plan, want, range(layers))
    got = torch.zeros(heads, layers, slots.numel(), row, dtype=torch.bfloat16).pin_memory()
    backend.copier.gather(kv, [(plan, got)])
    torch.cuda.synchronize()
    if not torch.equal(got.to(device).view(torch.int16), want.view(torch.int16)):
        return False, "kernel self-test: gathered bytes differ from the reference (please report this)"
    back = torch.zeros_like(storage)
    kv2 = BlockPagedKV([back[l].permute(0, 2, 1, 3) for l in range(layers)])
    backend.copier.scatter(kv2, [(convert.plan_slots(kv2, slots), got)])
    torch.cuda.synchronize()
    ok = all(torch.equal(back[l, b], storage[l, b]) for l in range(layers) for b in (5, 2))
    return ok, ("kernel self-test passed (gather into pinned host memory, scatter back, bit-exact)" if ok
                else "kernel self-test: scattered bytes differ from the reference (please report this)")


@hookimpl
def lmcache_hardware_backends():
    return [TritonGpuBackend()]
