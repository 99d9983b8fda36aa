"""Checks of the machine, the config and the tiers it names."""

from __future__ import annotations

import os
import resource
import shutil
import sys
from typing import Iterator

import torch

from lmcache import __version__
from lmcache.core.config import ConfigError, load_config
from lmcache.core.plugins import get_registry
from lmcache.doctor.report import FAIL, INFO, OK, WARN, Check

GiB = 2**30


def python_and_torch() -> Iterator[Check]:
    py = sys.version_info
    yield Check("python", OK if py >= (3, 11) else FAIL, sys.version.split()[0], "" if py >= (3, 11) else "use Python >= 3.11")
    build = "CUDA " + torch.version.cuda if torch.version.cuda else ("ROCm " + torch.version.hip if torch.version.hip else "CPU-only build")
    yield Check("torch", OK, f"torch {torch.__version__} ({build}); lmcache {__version__} (no compiled extension: nothing to rebuild)")


def chunk_keys(config_path: str | None, overrides: dict) -> Iterator[Check]:
    """Whether long prompts' chunk keys come from the native loop (loaded and self-checked here)."""
    from lmcache.core import key_chain

    try:
        key_chain.configure(load_config(config_path, overrides=overrides).native_keys)
    except ConfigError:
        pass  # the config row says what is wrong with it
    error = key_chain.load_error()
    chain = key_chain.native_loop()
    if error is None and chain is not None:
        lists = ("prompt lists read in place" if chain.lists_error is None else
                 f"prompt lists converted by array('I'), ~0.4 ms more per 128K tokens ({chain.lists_error})")
        yield Check("chunk keys", OK, "native loop (libcrypto SHA-256 + numba BLAKE3), self-checked against the "
                    f"Python definition; {lists}")
    else:
        yield Check("chunk keys", WARN, f"hashed in Python: {error}",
                    "long-prompt lookups are ~1.7x slower; install numba (pip install numba) and OpenSSL's libcrypto, "
                    "or set native_keys: true")


def _accelerator() -> tuple[str | None, str]:
    if torch.cuda.is_available():
        kind = "rocm" if torch.version.hip else "cuda"
        return "cuda", f"{kind}: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    try:
        import torch_npu  # noqa: F401  (registers torch.npu)

        if torch.npu.is_available():  # type: ignore[attr-defined]
            return "npu", "ascend NPU"
    except Exception:
        pass
    return None, "no accelerator visible to torch"


def accelerator() -> Iterator[Check]:
    device, found = _accelerator()
    yield Check("accelerator", OK, found)
    reg = get_registry()
    for name, backend in sorted(reg.hardware.items()):
        ok, why = backend.available()
        # unavailable is only a problem where this machine has the device the backend is for
        relevant = device in backend.device_types and getattr(backend, "_platform_ok", lambda: (True, ""))()[0]
        yield Check(f"backend {name}", OK if ok else FAIL if name == "cpu" else WARN if relevant else INFO,
                    f"{'available' if ok else 'unavailable'}: {why}",
                    "" if ok or not relevant else f"device_backend: {name} cannot be used here")
        if ok and hasattr(backend, "self_test"):  # compile and run its kernels here, bit-exact, before an engine does
            passed, what = backend.self_test()
            yield Check(f"kernels {name}", OK if passed else FAIL, what,
                        "" if passed else "engines fall back to the slower torch reference ops (logged); report this "
                        "with 'lmcache doctor --json'")
    for dev in filter(None, ("cpu", device)):
        candidates = [b for b in reg.hardware.values() if dev in b.device_types and b.available()[0]]
        if not candidates:
            yield Check(f"backend for {dev}", FAIL, f"nothing can move KV memory on {dev}", "install a backend plugin for it")
            continue
        best = max(candidates, key=lambda b: b.priority)
        slow = best.name == "cpu" and dev != "cpu"
        yield Check(f"backend for {dev}", WARN if slow else OK,
                    f"auto selects '{best.name}'" + (" (torch reference ops: correct but slow)" if slow else ""),
                    "install the accelerator backend (see lmcache doctor rows above for why it is unavailable)" if slow else "")


def config_and_tiers(config_path: str | None, overrides: dict) -> Iterator[Check]:
    try:
        cfg = load_config(config_path, overrides=overrides)
    except ConfigError as e:
        yield Check("config", FAIL, str(e), "fix the key named above; 'lmcache config keys' lists them all")
        return
    src = config_path or os.environ.get("LMCACHE_CONFIG_FILE") or "defaults + environment"
    yield Check("config", OK, f"valid ({src})")
    if cfg.chunk_size % 16:
        yield Check("chunk_size", WARN, f"{cfg.chunk_size} is not a multiple of 16, vLLM's default block size: vLLM refuses "
                    "the connector unless its --block-size divides it", f"use {max(16, cfg.chunk_size // 16 * 16)} (or 256)")
    else:
        yield Check("chunk_size", OK, f"{cfg.chunk_size} (a multiple of vLLM's default block size 16)")
    yield from _memory(cfg)
    yield from _disk(cfg)
    yield from _remote(cfg)
    yield from _router_events(cfg)


def _memory(cfg) -> Iterator[Check]:
    want = int(cfg.max_cpu_size_gb * GiB)
    avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    status = OK if want <= 0.8 * total else FAIL
    yield Check("cpu tier size", status, f"max_cpu_size_gb={cfg.max_cpu_size_gb} of {total / GiB:.1f} GiB RAM ({avail / GiB:.1f} free)",
                "" if status == OK else f"lower max_cpu_size_gb to at most {0.8 * total / GiB:.0f}")
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if _accelerator()[0] is None:
        yield Check("pinned memory", OK, "not needed: no accelerator (the pool stays pageable)")
    else:
        limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft / GiB:.2f} GiB"
        try:
            torch.empty(min(want, 256 << 20), dtype=torch.uint8, pin_memory=True)  # a real pin, then freed
            yield Check("pinned memory", OK, f"pinned a {min(want, 256 << 20) >> 20} MiB test buffer; ulimit -l {limit}")
        except RuntimeError as e:
            yield Check("pinned memory", FAIL, f"cannot pin host memory ({e}); ulimit -l {limit}",
                        "raise the memlock limit (ulimit -l unlimited, or --ulimit memlock=-1 in docker)")
    try:
        shm = shutil.disk_usage("/dev/shm")
        status = OK if shm.total >= min(want, 1 * GiB) else WARN
        yield Check("/dev/shm", status, f"{shm.total / GiB:.1f} GiB ({shm.free / GiB:.1f} free)",
                    "" if status == OK else "give the container more shared memory (docker --shm-size) for MP mode")
    except OSError:
        yield Check("/dev/shm", WARN, "missing", "mount a tmpfs on /dev/shm for MP mode")


def _disk(cfg) -> Iterator[Check]:
    if not cfg.local_disk_path:
        yield Check("disk tier", OK, "off (local_disk_path is empty)")
        return
    from lmcache.core.hookspecs import TierUnavailable
    from lmcache.core.tiers.disk import DiskTier

    if not os.path.isdir(os.path.join(cfg.local_disk_path, "lmcache-v1")):
        # not created yet: say whether it could be, without creating anything (doctor only looks)
        parent = cfg.local_disk_path
        while not os.path.exists(parent) and os.path.dirname(parent) != parent:
            parent = os.path.dirname(parent)
        if os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK):
            free = shutil.disk_usage(parent).free
            if parent == cfg.local_disk_path:
                yield Check("disk tier", OK, f"{cfg.local_disk_path}: writable, 0 chunks stored, {free / GiB:.1f} GiB free")
            else:
                yield Check("disk tier", OK, f"{cfg.local_disk_path}: not created yet; an engine can create it under "
                            f"{parent} ({free / GiB:.1f} GiB free)")
        else:
            yield Check("disk tier", FAIL, f"{cfg.local_disk_path}: cannot be created ({parent} is not a writable "
                        "directory)", "point local_disk_path at a writable directory")
        return
    try:
        tier = DiskTier(cfg.local_disk_path, int(cfg.max_local_disk_size_gb * GiB))
    except TierUnavailable as e:
        yield Check("disk tier", FAIL, str(e).split(": point it")[0], "point local_disk_path at a writable directory")
        return
    free = shutil.disk_usage(cfg.local_disk_path).free
    room = free + tier.used_bytes
    chunks = len(tier)
    tier.close()
    want = cfg.max_local_disk_size_gb * GiB
    status = OK if room >= want else WARN
    yield Check("disk tier", status, f"{cfg.local_disk_path}: writable, {chunks} chunks stored, {free / GiB:.1f} GiB free",
                "" if status == OK else f"lower max_local_disk_size_gb to {room / GiB:.0f} or free space")


def _router_events(cfg) -> Iterator[Check]:
    if not cfg.router_events:
        yield Check("router events", OK, "off (router_events is empty)")
        return
    routers = get_registry().routers
    if cfg.router_events not in routers:
        yield Check("router events", FAIL, f"router_events '{cfg.router_events}' is not registered",
                    f"set it to one of {', '.join(sorted(routers)) or '(none installed)'}, or empty")
        return
    endpoint = cfg.router_events_endpoint
    if endpoint.startswith("tcp://") and not endpoint.rpartition(":")[2].isdigit():
        yield Check("router events", FAIL, f"router_events_endpoint {endpoint!r} has no port", "e.g. tcp://*:5558")
        return
    yield Check("router events", OK, f"'{cfg.router_events}': each engine's scheduler publishes on {endpoint} "
                f"(data-parallel rank r on port + r); {routers[cfg.router_events].doc}")


def _remote(cfg) -> Iterator[Check]:
    from lmcache.core.config import remote_urls

    if not cfg.remote_url:
        yield Check("remote tier", OK, "off (remote_url is empty)")
        return
    urls = remote_urls(cfg)
    for url in urls:
        yield from _remote_one(cfg, url, "remote tier" if len(urls) == 1 else f"remote tier {url.split('://')[0]}")


def _remote_one(cfg, url: str, what: str) -> Iterator[Check]:
    from lmcache.core.hookspecs import Diagnosable, Pingable
    from lmcache.core.tiers.stack import open_remote

    scheme = url.split("://", 1)[0].lower()
    try:
        tier = open_remote(url, cfg, get_registry())
    except ValueError as e:
        yield Check(what, FAIL, str(e), "fix remote_url")
        return
    try:
        if isinstance(tier, Diagnosable):
            for status, found, fix in tier.diagnose():
                yield Check(what, status, found, fix)
        elif not isinstance(tier, Pingable):
            yield Check(what, OK, f"{scheme}:// tier created (it cannot be pinged)")
        elif tier.ping():
            yield Check(what, OK, f"{tier.safe_url()} answers")
        else:
            yield Check(what, FAIL, f"{tier.safe_url()} does not answer within {cfg.remote_timeout_s}s",
                        "start the server, or fix remote_url / remote_password")
    finally:
        tier.close()


def plugins() -> Iterator[Check]:
    reg = get_registry()
    for name, origin in sorted(reg.plugins.items()):
        provides = sorted(f"{kind} '{item}'" for (kind, item), owner in reg.owners.items() if owner == name)
        yield Check(f"plugin {name}", OK, f"{origin}: " + (", ".join(provides) or "registers nothing"))
    for failure in reg.failures:
        yield Check(f"plugin {failure.plugin}", FAIL, failure.error, "fix or uninstall that plugin package; the rest keeps working")
