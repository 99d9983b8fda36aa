"""vLLM general plugin (entry point ``vllm.general_plugins``): with blending enabled, build supported models
through lmcache's recording subclasses (``blend_models``) so the connector's worker can run their layers.

vLLM calls ``register`` in every process, before any model is built, and before any connector exists, so
it reads lmcache's config from the environment (``LMCACHE_ENABLE_BLENDING``, ``LMCACHE_CONFIG_FILE``): the
launch line ``lmcache launch-flags vllm`` prints sets it. Without blending it does nothing at all. It must
never fail vLLM's start: a config it cannot read means "not enabled" here (the connector reports it).
"""

from __future__ import annotations

import logging
import os

from lmcache.adapters.vllm.blend_registry import SUPPORTED_ARCHITECTURES

log = logging.getLogger("lmcache")
ENV = "LMCACHE_ENABLE_BLENDING"


def blending_requested(env: dict[str, str] | None = None) -> bool:
    env = dict(os.environ if env is None else env)
    try:
        from lmcache.core.config import load_config

        return load_config(env=env).enable_blending
    except Exception:  # a bad config is the connector's to report, with its fix
        return False


def register() -> None:
    if not blending_requested():
        return
    from vllm import ModelRegistry

    for arch in SUPPORTED_ARCHITECTURES:
        ModelRegistry.register_model(arch, f"lmcache.adapters.vllm.blend_models:{arch}")
    log.debug("lmcache: blending enabled: %s are built through lmcache's recording classes", ", ".join(SUPPORTED_ARCHITECTURES))
