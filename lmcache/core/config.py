"""One config model: every key has a default, a doc line and a validation.

Sources, lowest to highest precedence: built-in defaults < YAML file (``--config`` or
``LMCACHE_CONFIG_FILE``) < ``LMCACHE_<KEY>`` environment variables < explicit overrides (CLI flags).
The effective config remembers where each value came from (``lmcache config show``).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

ENV_PREFIX = "LMCACHE_"
CONFIG_FILE_ENV = "LMCACHE_CONFIG_FILE"


class ConfigError(ValueError):
    """A bad config value; the message names the key, the value, its source and the fix."""


def _choice(*allowed: str) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in allowed else f"one of {', '.join(allowed)}"

    return check


def _positive(v: Any) -> str | None:
    return None if v > 0 else "a number > 0"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else "a number >= 0"


def _chunk_size(v: Any) -> str | None:
    return None if 1 <= v <= 65536 else "an integer in 1..65536 (a multiple of the engine's block size)"


def _backend_name(v: Any) -> str | None:
    return None if v and v.replace("_", "").replace("-", "").isalnum() else "auto, cpu, cuda, rocm, ascend or a plugin's backend name"


def _remote_urls(v: Any) -> str | None:
    urls = v.split()
    if all("://" in u for u in urls) and len({u.split("://", 1)[0].lower() for u in urls}) == len(urls):
        return None
    return ("empty (no remote tier), a URL such as redis://127.0.0.1:6379/0, or several of different kinds separated "
            "by spaces, highest first, e.g. 'redis://127.0.0.1:6379/0 s3://bucket/prefix'")


def remote_urls(config: "LMCacheConfig") -> list[str]:
    """The remote tiers' URLs, highest first (``remote_url`` holds them separated by spaces)."""
    return config.remote_url.split()


def _part_mb(v: Any) -> str | None:
    return None if 5 <= v <= 5 * 1024 else "a number of MiB in 5..5120 (S3's part size limits)"


def _url_or_empty(v: Any) -> str | None:
    return None if v == "" or v.startswith(("http://", "https://")) else "empty or an http(s):// URL such as http://127.0.0.1:7480"


def _key(default: Any, doc: str, check: Callable[[Any], str | None] | None = None) -> Any:
    return field(default=default, metadata={"doc": doc, "check": check})


@dataclass(frozen=True)
class LMCacheConfig:
    chunk_size: int = _key(256, "Tokens per chunk (the unit of storage and lookup); a multiple of the engine's KV block size.", _chunk_size)
    max_cpu_size_gb: float = _key(5.0, "Capacity of the CPU tier's host-memory pool, in GiB.", _positive)
    native_keys: bool = _key(True, "Derive long prompts' chunk keys in the native loop (numba, with the libcrypto that Python's hashlib uses): the same keys as the Python loop, ~1.7x faster; off: the Python loop.")
    prefault_cpu_memory: bool = _key(True, "Fault in the CPU pool's free pages in the background from start (the engine does not wait), so reads into it run at memory speed, not page-fault speed; off: pages come as chunks arrive (less resident memory until the pool fills).")
    pin_cpu_memory: str = _key("auto", "Pin the CPU pool for fast DMA: auto (when an accelerator is present), yes, no.", _choice("auto", "yes", "no"))
    eviction_policy: str = _key("LRU", "Which chunk leaves a full tier first: LRU (least recently used; a prompt's chunks leave tail first, so no cached chunk outlives its prefix).", _choice("LRU"))
    device_backend: str = _key("auto", "Hardware backend for paged gather/scatter: auto, cpu, cuda, rocm, ascend or a plugin's name.", _backend_name)
    model_name: str = _key("", "Name scoping chunk keys; empty: the engine's model path as given. Engines that should share chunks need the same name.", lambda v: None if "\n" not in v and len(v) <= 512 else "one line of at most 512 characters")
    cache_salt: str = _key("", "Default namespace mixed into every chunk key; two salts never share a chunk.")
    copy_threads: int = _key(0, "CPU threads for host-side gather/scatter; 0 picks min(4, cores).", _non_negative)
    local_disk_path: str = _key("", "Directory of the local disk tier; empty disables the disk tier.")
    max_local_disk_size_gb: float = _key(20.0, "Capacity of the local disk tier, in GiB.", _positive)
    local_disk_fsync: bool = _key(False, "fsync each disk write: survives power loss, not only crashes; slower.")
    remote_url: str = _key("", "Remote tier URL (redis://host:port/db, rediss://, redis+cluster://h:p,h:p, s3://bucket/prefix, or a plugin's scheme); several, space-separated, stack highest first ('redis://h:6379/0 s3://bucket/kv/'); empty disables it.", _remote_urls)
    remote_password: str = _key("", "Password for the remote tier (better set as env LMCACHE_REMOTE_PASSWORD than in a file).")
    remote_timeout_s: float = _key(1.0, "Longest the engine waits on the remote tier per operation, in seconds.", _positive)
    remote_part_mb: float = _key(8.0, "Largest single value written to the remote store, in MiB; bigger chunks are split.", _positive)
    s3_endpoint_url: str = _key("", "S3 endpoint for a store other than AWS (Ceph RGW, MinIO: http://host:port); empty: AWS, or AWS_ENDPOINT_URL. Credentials come from the standard AWS chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, instance role), never from this file.", _url_or_empty)
    s3_region: str = _key("", "S3 region; empty: the AWS chain's (AWS_REGION, ~/.aws/config), else us-east-1.")
    s3_addressing_style: str = _key("auto", "S3 addressing: path (bucket in the path: Ceph, MinIO), virtual (bucket in the host name: AWS), or auto (path with a custom endpoint, else virtual).", _choice("auto", "path", "virtual"))
    s3_part_mb: float = _key(8.0, "Size of the ranges an S3 object is read in (in parallel) and of its multipart-upload parts, MiB.", _part_mb)
    s3_multipart_mb: float = _key(64.0, "Objects larger than this, in MiB, are uploaded in parts side by side; smaller ones with one PUT (faster on most stores).", _positive)
    s3_concurrency: int = _key(8, "S3 requests in flight per tier: parallel ranged GETs, multipart parts, lookup HEADs.", _positive)
    s3_timeout_s: float = _key(2.0, "Longest an S3 request may stall (connecting, or between bytes), in seconds; then the tier misses/drops and retries a second later (less often while it keeps failing).", _positive)
    writeback_queue_size: int = _key(256, "Chunks queued per lower tier for asynchronous write-back; beyond it stores are dropped and counted.", _positive)
    promote_on_hit: bool = _key(True, "Copy a chunk found in a lower tier into the CPU tier when it is retrieved.")
    mode: str = _key("inproc", "Where the cache pool lives: inproc (inside the engine process) or mp (a shared 'lmcache server').", _choice("inproc", "mp"))
    server_url: str = _key("tcp://127.0.0.1:5555", "Address of 'lmcache server' in mp mode.", lambda v: None if v.startswith(("tcp://", "ipc://")) else "a ZeroMQ address such as tcp://127.0.0.1:5555")
    server_token: str = _key("", "Shared secret presented to 'lmcache server' (required when it listens beyond loopback).")
    mp_transport: str = _key("shm", "How chunk bytes reach the server in mp mode: shm (map its shared pool; falls back to bytes when impossible) or bytes (over the socket).", _choice("shm", "bytes"))
    layerwise_load: bool = _key(False, "Load a hit's KV layer by layer on the backend's copy stream, each layer waited for just before its attention runs (vLLM's wait_for_layer_load); off: every layer is loaded before the forward starts.")
    router_events: str = _key("", "Publish which prefixes the lmcache tiers hold to a KV-aware router: empty (off) or a router's name (dynamo).", lambda v: None if v == "" or v.replace("_", "").replace("-", "").isalnum() else "empty or a router name such as dynamo")
    router_events_endpoint: str = _key("tcp://*:5558", "ZeroMQ address the router-event publisher binds; the router's indexer subscribes to it.", lambda v: None if v.startswith(("tcp://", "ipc://")) else "a ZeroMQ address such as tcp://*:5558")
    enable_blending: bool = _key(False, "Non-prefix reuse (CacheBlend): a prompt is cut into segments at blend_special_str; each segment's KV is cached on its own and reused wherever it appears, a blend_recompute_ratio share of its tokens recomputed (vLLM, Llama/Qwen models, tensor_parallel_size 1; see README 'RAG and non-prefix reuse'). Such an engine stores and loads segments only, no prefix chunks.")
    blend_special_str: str = _key(" # # ", "The text put between documents to mark segment boundaries (found as its token ids in the prompt).", lambda v: None if v.strip() else "a non-blank string such as ' # # '")
    blend_recompute_ratio: float = _key(0.15, "Share of a blended prompt's cached tokens recomputed through every layer after the check layer: those whose KV deviates most from a full prefill's; 0 reuses all as cached, 1 recomputes all (a full prefill).", lambda v: None if 0.0 <= v <= 1.0 else "a fraction in 0..1, e.g. 0.15")
    blend_recompute_min_tokens: int = _key(8, "Least number of cached tokens recomputed per blended prompt, whatever the ratio.", _non_negative)
    blend_check_layer: int = _key(1, "Layer at which the KV deviation of cached tokens is measured; layers below it are computed in full for every token (>= 1: at layer 0 a cached key equals a fresh one).", lambda v: None if v >= 1 else "a layer index >= 1")
    blend_min_tokens: int = _key(32, "Blend only when at least this many prompt tokens come from cached segments; fewer: vLLM computes the prompt itself.", _non_negative)
    log_level: str = _key("INFO", "Logging level of lmcache's own logger (any case).", _choice("DEBUG", "INFO", "WARNING", "ERROR"))

    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def source_of(self, key: str) -> str:
        return self.sources.get(key, "default")

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in config_keys()}

    def replace(self, **changes: Any) -> "LMCacheConfig":
        return _build(self.as_dict() | changes, dict(self.sources) | {k: "override" for k in changes})


def config_keys() -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(LMCacheConfig) if f.name != "sources"}


def describe_keys() -> list[tuple[str, str, Any, str]]:
    """(key, type, default, doc) for every key: the documentation table."""
    return [(k, str(f.type), f.default, f.metadata["doc"]) for k, f in config_keys().items()]


def _type_of(f: dataclasses.Field[Any]) -> type:
    return {"int": int, "float": float, "str": str, "bool": bool}[str(f.type)]


def _coerce(key: str, raw: Any, source: str) -> Any:
    f = config_keys()[key]
    want = _type_of(f)
    value: Any
    if key == "remote_url" and isinstance(raw, list):  # YAML: a list of tiers, highest first
        raw = " ".join(str(u) for u in raw)
    try:
        if want is bool:
            if isinstance(raw, str):
                low = raw.strip().lower()
                if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError
                value = low in ("1", "true", "yes", "on")
            elif isinstance(raw, bool):
                value = raw
            else:
                raise ValueError
        elif want is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            value = int(raw)
        elif want is float:
            if isinstance(raw, bool):
                raise ValueError
            value = float(raw)
        else:
            if not isinstance(raw, (str, int, float)) or isinstance(raw, bool):
                raise ValueError
            value = "" if raw is None else str(raw)
    except (TypeError, ValueError):
        raise ConfigError(
            f"config key '{key}' = {raw!r} (from {source}): expected {want.__name__}; fix: {f.metadata['doc']}"
        ) from None
    if key == "log_level" and isinstance(value, str):
        value = value.upper()  # logging's names are upper case; "debug" means the same
    check = f.metadata["check"]
    problem = check(value) if check else None
    if problem:
        raise ConfigError(f"config key '{key}' = {raw!r} (from {source}): accepted values are {problem}")
    return value


def _unknown(key: str, source: str) -> ConfigError:
    from lmcache.core.peer_keys import MAPPED, PEER_KEYS

    ours = list(config_keys())
    close = difflib.get_close_matches(key, ours + sorted(PEER_KEYS - set(ours)), n=1, cutoff=0.75)
    if close and close[0] in MAPPED and close[0] not in ours:
        hint = f"did you mean '{close[0]}' (LMCache's name for '{MAPPED[close[0]].ours}')?"
    elif close:
        hint = f"did you mean '{close[0]}'?"
    else:
        hint = "run 'lmcache config keys' for the list"
    return ConfigError(f"unknown config key '{key}' (from {source}): {hint}")


def _accept(key: str, raw: Any, source: str, values: dict[str, Any], sources: dict[str, str]) -> None:
    """One key from one source: ours (validated), a peer key (mapped or ignored, warned once), or an error."""
    from lmcache.core.peer_keys import PEER_KEYS, translate

    if key in PEER_KEYS:
        got = translate(key, raw, source, set(values))
        if got is None:
            return
        key, raw = got
    if key not in values:
        raise _unknown(key, source)
    values[key] = _coerce(key, raw, source)
    sources[key] = source


def _build(values: dict[str, Any], sources: dict[str, str]) -> LMCacheConfig:
    return LMCacheConfig(**values, sources=dict(sources))


def load_config(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> LMCacheConfig:
    """Defaults < YAML file < LMCACHE_* env vars < overrides, each value validated where it enters."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {k: f.default for k, f in config_keys().items()}
    sources: dict[str, str] = {}

    path = path or env.get(CONFIG_FILE_ENV) or None
    if path:
        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file '{p}' does not exist: fix the path given by --config or {CONFIG_FILE_ENV}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config file '{p}' is not valid YAML{where}: fix its syntax") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{p}' must be a mapping of key: value, got {type(data).__name__}")
        for key, raw in data.items():
            _accept(str(key), raw, f"file {p}", values, sources)

    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_FILE_ENV:
            continue
        _accept(name[len(ENV_PREFIX):].lower(), raw, f"env {name}", values, sources)

    for key, raw in (overrides or {}).items():
        _accept(key, raw, "command line", values, sources)

    return _build(values, sources)


EXTRA_PREFIX = "lmcache."
EXTRA_CONFIG_FILE = "lmcache.config_file"


def load_engine_config(extra: Mapping[str, Any] | None, where: str, env: Mapping[str, str] | None = None,
                       ignore_prefixes: tuple[str, ...] = (), overrides: Mapping[str, Any] | None = None) -> LMCacheConfig:
    """The config of an engine adapter: the file (``lmcache.config_file`` in the engine's extra config, else
    LMCACHE_CONFIG_FILE) < LMCACHE_* env < ``lmcache.<key>`` entries of the engine's extra config (named
    ``where`` in errors) < ``overrides``. Entries under ``ignore_prefixes`` belong to someone else."""
    extra = dict(extra or {})
    given: dict[str, Any] = {}
    for name, value in extra.items():
        if not name.startswith(EXTRA_PREFIX) or name == EXTRA_CONFIG_FILE or name.startswith(ignore_prefixes):
            continue
        key = name[len(EXTRA_PREFIX):]
        from lmcache.core.peer_keys import PEER_KEYS

        if key not in config_keys() and key not in PEER_KEYS:
            close = difflib.get_close_matches(key, list(config_keys()), n=1)
            hint = f"did you mean 'lmcache.{close[0]}'?" if close else "see 'lmcache config keys' for the valid ones"
            raise ConfigError(f"{where} has '{name}', which is not an lmcache config key: {hint}")
        given[key] = value
    given.update(overrides or {})
    return load_config(extra.get(EXTRA_CONFIG_FILE), os.environ if env is None else env, given)


def parse_set_flags(items: list[str] | None) -> dict[str, str]:
    """``--set key=value`` pairs from the command line."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set chunk_size=512")
        out[key.strip()] = value
    return out
