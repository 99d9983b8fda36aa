"""The whole contract between the core and its edges, as pluggy hooks.

Engine adapters, hardware backends and storage tiers register through these hooks; built-ins do it
the same way as outside packages, which list a module (or object) with hook implementations under the
``lmcache`` entry-point group:

    [project.entry-points.lmcache]
    acme = "acme_lmcache.plugin"

Each hook returns a list of the small objects defined here. Names must be unique across plugins; a
plugin that fails to import, raises, or reuses a taken name is reported (``lmcache doctor``) and skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

import pluggy

if TYPE_CHECKING:
    import torch

    from lmcache.core.config import LMCacheConfig
    from lmcache.core.convert import SlotPlan
    from lmcache.core.layouts import KVLayout

PROJECT = "lmcache"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@runtime_checkable
class HardwareBackend(Protocol):
    """Moves tokens between an engine's paged KV memory and canonical chunks on one kind of device."""

    name: str
    #: tensor device types (torch.device.type) whose KV memory this backend can read and write
    device_types: tuple[str, ...]
    #: among backends that can serve a device type, "auto" picks the highest priority that is available
    priority: int

    def available(self) -> tuple[bool, str]:
        """(usable here, one line saying why or why not): shown by ``lmcache doctor``."""

    def alloc_host(self, nbytes: int, pin: bool) -> "torch.Tensor":
        """A uint8 host buffer for the CPU tier, page-locked when ``pin``."""

    def gather(self, kv: "KVLayout", jobs: list[tuple["SlotPlan", "torch.Tensor"]]) -> None:
        """For each (slots, canonical chunk tensor): copy those tokens of every layer into the chunk."""

    def scatter(self, kv: "KVLayout", jobs: list[tuple["SlotPlan", "torch.Tensor"]]) -> None:
        """For each (slots, canonical chunk tensor): copy the chunk into those slots of every layer."""

    def synchronize(self) -> None:
        """Wait until every copy issued so far has finished."""


@dataclass(frozen=True)
class StorageTierSpec:
    """A storage tier reachable by URL scheme (``remote_url: scheme://...``)."""

    scheme: str
    #: factory(url, config) -> tier object with contains/get/put/remove (see lmcache.core.tiers)
    factory: Callable[[str, "LMCacheConfig"], Any]
    doc: str = ""


@dataclass(frozen=True)
class EngineAdapterSpec:
    """An inference engine's adapter: how to launch the engine with lmcache and what to check."""

    name: str
    #: the engine's Python distribution (e.g. "vllm"); imported only when the adapter is used
    engine_package: str
    doc: str = ""
    #: launch_flags(config, model) -> the engine's command line that enables lmcache
    launch_flags: Callable[["LMCacheConfig", str], str] | None = None
    #: check() -> list of (status "ok"|"warn"|"fail", what was found, one-line fix)
    check: Callable[[], list[tuple[str, str, str]]] | None = None
    extra: dict = field(default_factory=dict)


@hookspec
def lmcache_hardware_backends() -> list[HardwareBackend]:
    """Return the hardware backends this plugin provides."""


@hookspec
def lmcache_storage_tiers() -> list[StorageTierSpec]:
    """Return the storage tiers (by URL scheme) this plugin provides."""


@hookspec
def lmcache_engine_adapters() -> list[EngineAdapterSpec]:
    """Return the engine adapters this plugin provides."""
