"""The ``python -m sglang.launch_server`` command line that selects this backend for a given config."""

from __future__ import annotations

import json
import shlex

from lmcache.adapters.launch import server_line
from lmcache.adapters.vllm.flags import extra_config
from lmcache.core.config import LMCacheConfig


def backend_extra_config(config: LMCacheConfig, config_path: str | None = None) -> dict:
    return {"backend_name": "lmcache", "module_path": "lmcache.adapters.sglang.backend",
            "class_name": "LMCacheHiCacheStorage", "interface_v1": 1, **extra_config(config, config_path)}


def sglang_args(config: LMCacheConfig, config_path: str | None = None) -> list[str]:
    # one SGLang page = one lmcache chunk: that is what makes SGLang's page hashes lmcache's chunk keys
    return ["--page-size", str(config.chunk_size), "--enable-hierarchical-cache",
            "--hicache-storage-backend", "dynamic",
            "--hicache-storage-backend-extra-config", json.dumps(backend_extra_config(config, config_path),
                                                                 separators=(",", ":"))]


def launch_lines(config: LMCacheConfig, model: str, options: dict) -> list[tuple[str, str]]:
    lines = []
    if config.mode == "mp":
        lines.append(server_line(config, options.get("config_path")))
    lines.append(("SGLang with the lmcache HiCache backend",
                  shlex.join(["python", "-m", "sglang.launch_server", "--model-path", model,
                              *sglang_args(config, options.get("config_path"))])))
    return lines
