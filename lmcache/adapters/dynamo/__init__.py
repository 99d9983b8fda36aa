"""Dynamo adapter: launch lines for Dynamo's vLLM and SGLang workers with lmcache.

Dynamo 1.6 takes a KV connector through the engine's own flags, passed through its worker
(``python -m dynamo.vllm ... --kv-transfer-config ...``; ``python -m dynamo.sglang`` with SGLang's flags).
With vLLM workers, the connector's KV events (chunks stored in the CPU tier, evicted, moved to disk) ride
vLLM's own KV event stream, which Dynamo's vLLM worker relays to its KV-aware router. ``router_events: dynamo`` adds lmcache's own events
(``events.py``): chunks in the CPU and disk tiers, with Dynamo's block hashes and media, on a ZeroMQ
endpoint Dynamo's indexer subscribes to. Importing this package imports no Dynamo code.
"""

from __future__ import annotations

import pluggy

from lmcache.core.hookspecs import EngineAdapterSpec, RouterEventsSpec

hookimpl = pluggy.HookimplMarker("lmcache")


#: vLLM's KV-event stream, which Dynamo's vLLM worker relays to its router only when it is configured (Dynamo
#: 1.6 sets none by default); lmcache's chunk events ride in it with media CPU and STORAGE
VLLM_KV_EVENTS = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "tcp://*:5557", "topic": ""}


def launch_lines(config, model: str, options: dict) -> list[tuple[str, str]]:
    import json
    import shlex

    from lmcache.adapters.launch import server_line
    from lmcache.adapters.sglang.flags import sglang_args
    from lmcache.adapters.vllm.flags import VLLM_DEFAULT_BLOCK_SIZE, vllm_args

    engine = options.get("engine") or "vllm"
    lines = []
    if config.mode == "mp":
        lines.append(server_line(config, options.get("config_path")))
    lines.append(("Dynamo's OpenAI frontend with its KV-aware router (without etcd/NATS: set DYN_DISCOVERY_BACKEND=file "
                  "DYN_FILE_KV=<dir> DYN_REQUEST_PLANE=tcp DYN_EVENT_PLANE=zmq for it and the worker)",
                  "python -m dynamo.frontend --http-port 8000 --router-mode kv"))
    if engine == "vllm":
        lines.append(("Dynamo vLLM worker with the lmcache connector; its KV events (GPU blocks and lmcache's CPU/"
                      "disk chunks) reach Dynamo's KV router",
                      shlex.join(["python", "-m", "dynamo.vllm", "--model", model,
                                  *vllm_args(config, options.get("config_path")),
                                  "--kv-events-config", json.dumps(VLLM_KV_EVENTS, separators=(",", ":"))])))
        if config.router_events == "dynamo":
            port = config.router_events_endpoint.rpartition(":")[2]
            lines.append(("Dynamo's standalone KV indexer reading lmcache's own tier events (router_events: dynamo; "
                          "worker id 1 on this host, vLLM's default block size)",
                          shlex.join(["python", "-m", "dynamo.indexer", "--block-size", str(VLLM_DEFAULT_BLOCK_SIZE),
                                      "--workers", f"1=tcp://127.0.0.1:{port}"])))
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


def _open_events(config, block_size: int):
    from lmcache.adapters.dynamo.events import open_publisher

    return open_publisher(config, block_size)


@hookimpl
def lmcache_router_events() -> list[RouterEventsSpec]:
    return [RouterEventsSpec(
        name="dynamo",
        factory=_open_events,
        doc="Dynamo's KV-aware router: BlockStored/BlockRemoved (CPU_PINNED, DISK) on router_events_endpoint",
    )]
