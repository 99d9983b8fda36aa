"""Dynamo adapter: launch lines for Dynamo's vLLM and SGLang workers with lmcache.

Dynamo 1.6 takes a KV connector through the engine's own flags, passed through its worker
(``python -m dynamo.vllm ... --kv-transfer-config ...``; ``python -m dynamo.sglang`` with SGLang's flags).
With vLLM workers, the connector's KV events (chunks stored in the CPU tier, evicted, moved to disk) ride
vLLM's own KV event stream, which Dynamo's vLLM worker relays to its KV-aware router. Importing this
package imports no Dynamo code.
"""

from __future__ import annotations

import pluggy

from lmcache.core.hookspecs import EngineAdapterSpec

hookimpl = pluggy.HookimplMarker("lmcache")


def launch_lines(config, model: str, options: dict) -> list[tuple[str, str]]:
    import shlex

    from lmcache.adapters.launch import server_line
    from lmcache.adapters.sglang.flags import sglang_args
    from lmcache.adapters.vllm.flags import vllm_args

    engine = options.get("engine") or "vllm"
    lines = []
    if config.mode == "mp":
        lines.append(server_line(config, options.get("config_path")))
    if engine == "vllm":
        lines.append(("Dynamo vLLM worker with the lmcache connector",
                      shlex.join(["python", "-m", "dynamo.vllm", "--model", model,
                                  *vllm_args(config, options.get("config_path"))])))
    elif engine == "sglang":
        lines.append(("Dynamo SGLang worker with the lmcache HiCache backend",
                      shlex.join(["python", "-m", "dynamo.sglang", "--model-path", model,
                                  *sglang_args(config, options.get("config_path"))])))
    else:
        raise ValueError(f"--engine {engine!r}: Dynamo workers run vllm or sglang")
    return lines


@hookimpl
def lmcache_engine_adapters() -> list[EngineAdapterSpec]:
    return [EngineAdapterSpec(
        name="dynamo",
        engine_package="dynamo",
        doc="launch lines for Dynamo 1.6 vLLM/SGLang workers (the connector rides the engine's own flags)",
        launch_flags=launch_lines,
        supported_versions="==1.6.*",
    )]
