"""A two-worker Dynamo deployment in one process, for tests: Dynamo's own runtime (file discovery, ZMQ event
plane, no etcd/NATS), two workers serving ``test.backend.generate``, and Dynamo's KV router. Worker "lmcache"
relays the KV events published on ZMQ_ENDPOINT (Dynamo's ``KvEventPublisher`` in relay mode, as Dynamo's
vLLM worker relays vLLM's); worker "plain" publishes nothing.

    python dynamo_router.py ZMQ_ENDPOINT BLOCK_SIZE DISCOVERY_DIR

Prints ``READY {"lmcache": id, "plain": id}``, then for every line of JSON token ids on stdin, one line of
JSON: the router's per-tier overlap scores and its best worker for a request with those tokens.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys


async def main(zmq_endpoint: str, block_size: int) -> None:
    from dynamo.llm import KvEventPublisher, KvRouter, KvRouterConfig, ModelInput, ModelType, WorkerType, register_model
    from dynamo.runtime import DistributedRuntime

    loop = asyncio.get_running_loop()
    workers = {}
    for name in ("plain", "lmcache"):
        rt = DistributedRuntime(loop, "file", "tcp", event_plane="zmq")
        ep = rt.endpoint("test.backend.generate")

        async def handler(request):
            yield {"token_ids": [], "finish_reason": "stop"}

        asyncio.ensure_future(ep.serve_endpoint(handler))
        await asyncio.sleep(0.2)
        await register_model(ModelInput.Tokens, ModelType.Completions, ep, "test-model", "test-model",
                             worker_type=WorkerType.Aggregated, kv_cache_block_size=block_size, skip_model_assets=True)
        workers[name] = (rt, ep)
    relay = KvEventPublisher(workers["lmcache"][1], kv_block_size=block_size, zmq_endpoint=zmq_endpoint, zmq_topic="")
    router = KvRouter(workers["plain"][1], block_size, KvRouterConfig())
    ids = {name: ep.connection_id() for name, (_, ep) in workers.items()}
    print("READY " + json.dumps(ids), flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        tokens = json.loads(line)
        scores = await router.get_overlap_scores(tokens)
        best = await router.best_worker(tokens)
        print(json.dumps({"workers": {str(w["worker_id"]): w for w in scores["workers"]}, "best": list(best)}),
              flush=True)
    relay.shutdown()
    os._exit(0)  # the runtimes' background threads need not be torn down one by one


if __name__ == "__main__":
    os.environ["DYN_FILE_KV"] = sys.argv[3]
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
