"""vLLM's own model classes, subclassed only to record the instance for blending (``blend_registry``).

Registered under vLLM's architecture names by ``blend_plugin`` when blending is enabled; behaviour, weights
and forward are vLLM's, unchanged.
"""

from __future__ import annotations

from typing import Any

from vllm.model_executor.models.llama import LlamaForCausalLM as _Llama
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM as _Qwen2
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM as _Qwen3

from lmcache.adapters.vllm.blend_registry import record


class LlamaForCausalLM(_Llama):
    # vLLM inspects the signature: the keyword-only (vllm_config, prefix) form of its own classes
    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        record(self)


class Qwen2ForCausalLM(_Qwen2):
    # vLLM inspects the signature: the keyword-only (vllm_config, prefix) form of its own classes
    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        record(self)


class Qwen3ForCausalLM(_Qwen3):
    # vLLM inspects the signature: the keyword-only (vllm_config, prefix) form of its own classes
    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        record(self)
