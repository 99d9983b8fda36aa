"""A client of a running Dynamo deployment, for tests: Dynamo's own KV router attached to the deployment's
``dynamo.backend.generate`` endpoint (it learns the workers' blocks from their KV events, as the frontend's
router does), and Dynamo's ``clear_kv_blocks`` endpoint. File discovery (``DYN_FILE_KV``), no etcd/NATS.

    python dynamo_client.py BLOCK_SIZE

Prints ``READY``; then per line on stdin: ``{"overlap": [token ids]}`` -> the router's per-worker blocks by tier;
``{"clear": true}`` -> the workers' answers to clear_kv_blocks.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys


async def main(block_size: int) -> None:
    from dynamo.llm import KvRouter, KvRouterConfig
    from dynamo.runtime import DistributedRuntime

    loop = asyncio.get_running_loop()
    rt = DistributedRuntime(loop, "file", "tcp", event_plane="zmq")
    router = KvRouter(rt.endpoint("dynamo.backend.generate"), block_size, KvRouterConfig())
    clear = await rt.endpoint("dynamo.backend.clear_kv_blocks").client()
    await asyncio.wait_for(clear.wait_for_instances(), 60)
    print("READY", flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        msg = json.loads(line)
        if "overlap" in msg:
            scores = await router.get_overlap_scores(msg["overlap"])
            out = {str(w["worker_id"]): {"device": w["device_blocks"], "cpu": w["host_pinned_blocks"],
                                         "disk": w["disk_blocks"]} for w in scores["workers"]}
        else:
            out = [r.data() async for r in await clear.generate({})]
        print(json.dumps(out), flush=True)
    os._exit(0)  # the runtime's background threads need not be torn down one by one


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
