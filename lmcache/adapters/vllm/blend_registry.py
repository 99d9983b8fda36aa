"""The served model, for blending: recorded by lmcache's vLLM model classes (``blend_models``), read by the worker.

vLLM hands a KV connector the KV caches, never the model; blending must run the model's layers. The
documented way in is a ``vllm.general_plugins`` entry point (``blend_plugin.register``), which vLLM runs in
every process before it builds the model: with blending enabled it registers, for each supported
architecture, a subclass of vLLM's own class that only records the instance here. No vLLM import here.
"""

from __future__ import annotations

import weakref
from typing import Any

#: vLLM architectures blending runs on (their attention: qkv_proj, optional q/k norms, rotary_emb, o_proj)
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
#: vLLM releases whose model classes blending was tested with
TESTED_VLLM = ("0.32", "0.33")

_models: "weakref.WeakSet[Any]" = weakref.WeakSet()


def record(model: Any) -> None:
    _models.add(model)


def recorded_model() -> Any | None:
    """The one model built in this process through lmcache's classes, or None."""
    models = list(_models)
    return models[0] if len(models) == 1 else None
