"""The vendor's lmcache plugin: registers a storage tier and a hardware backend through lmcache's hooks."""

from __future__ import annotations

from lmcache.core.hookspecs import StorageTierSpec, hookimpl
from lmcache.hardware.cpu import CpuBackend

from lmcache_vendor_example.vfile import VFileTier


class VendorBackend(CpuBackend):
    """A vendor accelerator backend. Priority -1: "auto" never picks it; ``device_backend: vendor_cpu`` does."""

    name = "vendor_cpu"
    device_types = ("cpu",)
    priority = -1
    calls = 0

    def available(self) -> tuple[bool, str]:
        return True, "vendor example backend (CPU reference ops underneath)"

    def gather(self, kv, jobs) -> None:
        VendorBackend.calls += 1
        super().gather(kv, jobs)

    def scatter(self, kv, jobs) -> None:
        VendorBackend.calls += 1
        super().scatter(kv, jobs)


@hookimpl
def lmcache_hardware_backends():
    return [VendorBackend()]


@hookimpl
def lmcache_storage_tiers():
    return [StorageTierSpec("vfile", lambda url, config: VFileTier(url), "plain files in a directory (vendor example)")]
