"""``lmcache bench tier``: a lower tier's write/read throughput next to the raw medium in the same run."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import blake3
import torch

from lmcache.core.chunk_format import encode, header_for
from lmcache.core.geometry import MODEL_SHAPES, model_shape
from lmcache.core.hookspecs import ParallelWrites
from lmcache.core.keys import ObjectKey
from lmcache.core.memory_pool import HostMemoryPool
from lmcache.core.tiers.stack import READ_THREADS, REMOTE_READS


def add_parser(bsub: argparse._SubParsersAction) -> None:
    from lmcache.cli.main import add_config_flags

    t = bsub.add_parser("tier", help="disk, redis or s3 tier throughput vs. raw file / redis-py / boto3 I/O of the same bytes")
    t.add_argument("--tier", required=True, choices=("disk", "redis", "s3"))
    t.add_argument("--model-shape", default="llama-3-8b", choices=sorted(MODEL_SHAPES))
    t.add_argument("--chunk-tokens", type=int, default=256, help="tokens per chunk (default 256)")
    t.add_argument("--chunks", type=int, default=16, help="chunks written and read back (default 16)")
    t.add_argument("--path", help="disk: directory to use (default: a temporary directory, removed after)")
    t.add_argument("--url", help="redis: server URL (default redis://127.0.0.1:6379/0); s3: s3://bucket/prefix (default: "
                   "remote_url's s3:// entry; endpoint and credentials as the tier takes them: s3_endpoint_url, AWS_*)")
    t.add_argument("--startup-chunks", type=int, default=0,
                   help="disk: also time a warm start with this many small objects on disk (e.g. 100000)")
    t.add_argument("--json", action="store_true", help="machine-readable output")
    add_config_flags(t)
    t.set_defaults(func=cmd_tier)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cmd_tier(args: argparse.Namespace) -> int:
    from lmcache.cli.bench import Progress
    from lmcache.cli.main import config_from_args, emit, table

    say = Progress(args.json)
    cfg = config_from_args(args)
    g = model_shape(args.model_shape)
    header = header_for(g, b"B" * 16, b"\0" * 16, args.chunk_tokens, 0, g.num_kv_heads)
    nbytes = header.payload_nbytes
    # source, raw-read destination, one tier-read destination per reader thread; pre-faulted as the CPU tier's pool
    pool = HostMemoryPool((nbytes + 8192) * (2 + max(READ_THREADS, REMOTE_READS)))
    if cfg.prefault_cpu_memory:
        pool.buffer.zero_()
    src = pool.allocate(nbytes)
    src.raw.view(torch.int64 if nbytes % 8 == 0 else torch.uint8).random_()
    keys = [ObjectKey(blake3.blake3(f"bench-{i}".encode()).digest(16), 0, g.num_kv_heads) for i in range(args.chunks)]
    sealed = [encode(header_for(g, b"B" * 16, k.chunk, args.chunk_tokens, 0, g.num_kv_heads), src.raw) for k in keys]
    total = nbytes * args.chunks

    cleanup = None
    if args.tier == "disk":
        root = args.path or tempfile.mkdtemp(prefix="lmcache-bench-")
        cleanup = None if args.path else root
        from lmcache.core.tiers.disk import DiskTier, read_into, write_all

        tier = DiskTier(os.path.join(root, "tier"), 1 << 50, cfg.local_disk_fsync)
        raw_dir = os.path.join(root, "raw")
        os.makedirs(raw_dir, exist_ok=True)
        dest = memoryview(pool.allocate(nbytes).raw.numpy())

        def raw_write() -> None:
            for i, (head, body) in enumerate(sealed):
                fd = os.open(os.path.join(raw_dir, str(i)), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                write_all(fd, head)
                write_all(fd, body)
                if cfg.local_disk_fsync:
                    os.fsync(fd)
                os.close(fd)

        def raw_read() -> None:
            for i in range(len(sealed)):
                fd = os.open(os.path.join(raw_dir, str(i)), os.O_RDONLY)
                skip = len(sealed[i][0])
                os.pread(fd, skip, 0)
                read_into(fd, dest, skip)
                os.close(fd)
        baseline = "raw sequential file write/read (same bytes, same page cache)"
    elif args.tier == "s3":
        tier, raw_write, raw_read, cleanup_raw = _s3_setup(args, cfg, sealed)
        baseline = "raw boto3 put_object/get_object of the same bytes, one object each"
    else:
        from lmcache.core.tiers.redis_tier import RedisTier

        args.url = args.url or "redis://127.0.0.1:6379/0"
        tier = RedisTier(args.url, cfg.remote_password, max(cfg.remote_timeout_s, 30.0), int(cfg.remote_part_mb * 2**20))
        if not tier.ping():
            raise ValueError(f"--url {args.url}: no Redis answers there; start redis-server or pass --url")
        raw_client = tier.client
        payload = bytes(sealed[0][1])

        def raw_write() -> None:
            for i in range(len(sealed)):
                raw_client.set(f"lmcache-bench-raw:{i}", payload)

        def raw_read() -> None:
            for i in range(len(sealed)):
                raw_client.get(f"lmcache-bench-raw:{i}")
        baseline = "raw redis-py SET/GET of the same bytes, one value each"

    say(f"{args.chunks} chunks of {nbytes / 2**20:.1f} MiB ({args.model_shape}, {args.chunk_tokens} tokens each)")

    # as the write-back writes: one object at a time, or several for a tier with several write-back threads
    writers = ThreadPoolExecutor(tier.write_workers if isinstance(tier, ParallelWrites) else 1)

    def tier_write() -> None:
        if not all(writers.map(lambda kb: tier.put(kb[0], *kb[1]), zip(keys, sealed))):
            raise RuntimeError(f"the {args.tier} tier dropped benchmark objects (see the log above)")

    # as the stack reads a run of chunks: several reads in flight (REMOTE_READS for a remote tier)
    readers = ThreadPoolExecutor(READ_THREADS if args.tier == "disk" else REMOTE_READS)

    def read_one(k: ObjectKey) -> None:
        got = tier.load(k, pool.allocate)
        if got is None:
            raise RuntimeError(f"benchmark object {k} did not read back")
        got[1].unref()

    def tier_read() -> None:
        list(readers.map(read_one, keys))

    say("raw write"); raw_w = _timed(raw_write)
    say("tier write"); tier_w = _timed(tier_write)
    say("raw read"); raw_r = _timed(raw_read)
    say("tier read (checksums verified)"); tier_r = _timed(tier_read)
    readers.shutdown()
    writers.shutdown()
    for k in keys:
        tier.remove(k)
    startup = None
    if args.tier == "disk" and args.startup_chunks:
        startup = _disk_startup(os.path.join(root, "startup"), args.startup_chunks, say)
    if args.tier == "s3":
        cleanup_raw()
    if args.tier == "redis":
        raw_client.delete(*[f"lmcache-bench-raw:{i}" for i in range(len(sealed))])
    tier.close()
    if cleanup:
        shutil.rmtree(cleanup, ignore_errors=True)

    gb = total / 1e9
    data = {"tier": args.tier, "chunks": args.chunks, "chunk_bytes": nbytes, "baseline": baseline,
            "write_gbps": gb / tier_w, "raw_write_gbps": gb / raw_w, "write_ratio": raw_w / tier_w,
            "read_gbps": gb / tier_r, "raw_read_gbps": gb / raw_r, "read_ratio": raw_r / tier_r,
            "startup_objects": args.startup_chunks or None, "startup_seconds": startup}

    def render(d: dict) -> None:
        table(f"lmcache bench tier --tier {d['tier']}: {d['chunks']} chunks x {d['chunk_bytes'] / 2**20:.1f} MiB; "
              f"baseline: {d['baseline']}", ["operation", "tier GB/s", "raw GB/s", "ratio"],
              [["write", f"{d['write_gbps']:.2f}", f"{d['raw_write_gbps']:.2f}", f"{d['write_ratio']:.0%}"],
               ["read", f"{d['read_gbps']:.2f}", f"{d['raw_read_gbps']:.2f}", f"{d['read_ratio']:.0%}"]])
        if d["startup_seconds"] is not None:
            print(f"warm start with {d['startup_objects']} objects on disk: {d['startup_seconds'] * 1e3:.0f} ms")

    emit(args, data, render)
    return 0


def _disk_startup(path: str, count: int, say) -> float:
    """Create ``count`` small objects, then time opening the tier over them (index only, no payload read)."""
    from lmcache.core.geometry import KVGeometry
    from lmcache.core.tiers.disk import DiskTier

    g = KVGeometry(1, 1, 4, 4, torch.float16)
    tier = DiskTier(path, 1 << 50)
    payload = torch.zeros(g.bytes_per_token() * 4, dtype=torch.uint8)
    say(f"creating {count} objects for the start-up measurement")
    for i in range(count):
        k = ObjectKey(blake3.blake3(f"s{i}".encode()).digest(16), 0, 1)
        tier.put(k, *encode(header_for(g, b"S" * 16, k.chunk, 4, 0, 1), payload))
    say("timing a warm start")
    t0 = time.perf_counter()
    reopened = DiskTier(path, 1 << 50)
    elapsed = time.perf_counter() - t0
    assert len(reopened) == count
    shutil.rmtree(path, ignore_errors=True)
    return elapsed


def _s3_setup(args: argparse.Namespace, cfg, sealed):
    """The S3 tier and the same client library's raw PUT/GET of the same bytes (boto3, one object per call)."""
    from lmcache.cli.s3 import checked_tier

    tier = checked_tier(args.url, cfg, "lmcache bench tier --tier s3")
    client, bucket = tier.client, tier.bucket
    names = [f"{tier.prefix}lmcache-bench-raw/{i}" for i in range(len(sealed))]
    bodies = [b"".join(s) for s in sealed]  # what the tier stores: sealed header + payload

    def raw_write() -> None:
        for name, body in zip(names, bodies):
            client.put_object(Bucket=bucket, Key=name, Body=body)

    def raw_read() -> None:
        for name in names:
            client.get_object(Bucket=bucket, Key=name)["Body"].read()

    def cleanup() -> None:
        client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": n} for n in names]})

    return tier, raw_write, raw_read, cleanup
