"""The disk tier on real files: warm restart, crash safety under SIGKILL, corruption, eviction, bad paths."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import blake3
import torch
from tierutil import CHUNK_BYTES, engine, prompt, retrieved_exactly, store

from lmcache.core.chunk_format import header_for
from lmcache.core.geometry import KVGeometry
from lmcache.core.keys import ObjectKey
from lmcache.core.memory_pool import HostMemoryPool
from lmcache.core.tiers.disk import DiskTier


def test_warm_restart_serves_hits_from_disk(tmp_path):
    e = engine(local_disk_path=str(tmp_path))
    toks = prompt(160)
    kv, slots = store(e, toks)
    e.close()  # flushes the write-back queue
    again = engine(local_disk_path=str(tmp_path))
    assert again.lookup_tiers(toks) == ["disk"] * 10
    assert retrieved_exactly(again, toks, kv, slots) == 160
    assert again.lookup_tiers(toks) == ["cpu"] * 10  # promoted on retrieve


def test_corrupted_and_truncated_files_are_misses_and_deleted(tmp_path):
    e = engine(local_disk_path=str(tmp_path))
    toks = prompt(64)
    kv, slots = store(e, toks)
    e.close()
    files = sorted(tmp_path.rglob("*.lmc"))
    assert len(files) == 4
    keys = engine().hasher().keys(toks)
    by_key = {f.name.split("@")[0]: f for f in files}
    flipped, truncated = by_key[keys[2].hex()], by_key[keys[3].hex()]
    data = bytearray(flipped.read_bytes())
    data[-7] ^= 0x40
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    again = engine(local_disk_path=str(tmp_path))
    assert again.lookup(toks) == 64  # the index trusts names; bytes are checked on read
    assert retrieved_exactly(again, toks, kv, slots) == 32  # stops at the first bad chunk
    # the four chunks are one run on disk, read side by side: both bad files are caught, counted and deleted
    assert again.stack.disk.stats.corrupt == 2
    assert not flipped.exists() and not truncated.exists()
    assert again.lookup(toks) == 32
    assert again.stack.disk.load(ObjectKey(keys[3], 0, 2), again.stack.cpu.reserve) is None


def test_a_truncated_file_read_alone_is_a_miss_and_deleted(tmp_path):
    e = engine(local_disk_path=str(tmp_path))
    toks = prompt(32)
    store(e, toks)
    e.close()
    key = engine().hasher().keys(toks)[1]
    [victim] = [f for f in tmp_path.rglob("*.lmc") if f.name.startswith(key.hex())]
    victim.write_bytes(victim.read_bytes()[:-100])
    again = engine(local_disk_path=str(tmp_path))
    assert again.stack.disk.load(ObjectKey(key, 0, 2), again.stack.cpu.reserve) is None
    assert again.stack.disk.stats.corrupt == 1 and not victim.exists()


def test_lru_eviction_by_capacity(tmp_path):
    size = CHUNK_BYTES + 112
    e = engine(local_disk_path=str(tmp_path), max_local_disk_size_gb=3.5 * size / 2**30)
    a, b, c = prompt(16, 1), prompt(16, 2), prompt(16, 3)
    store(e, a); store(e, b); e.flush()
    e.clear()
    kv, slots = store(e, a)  # present already in disk; a becomes recently used on the next hit
    e.clear()
    assert retrieved_exactly(e, a, kv, slots) == 16
    store(e, c, seed=3); e.flush()
    store(e, prompt(16, 4), seed=4); e.flush()  # over capacity: the least recently used (b) goes
    assert e.stack.disk.contains(e.object_key(e.hasher().keys(a)[0]))
    assert not e.stack.disk.contains(e.object_key(e.hasher().keys(b)[0]))
    assert e.stack.disk.used_bytes <= 3.5 * size and e.stack.disk.stats.evictions >= 1


def test_unusable_directory_degrades_to_no_disk_tier(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    e = engine(local_disk_path=str(blocker / "cache"))
    assert e.stack.disk is None
    assert "local_disk_path" in e.tier_problems[0] and "writable directory" in e.tier_problems[0]
    toks = prompt(32)
    kv, slots = store(e, toks)
    assert retrieved_exactly(e, toks, kv, slots) == 32  # the CPU tier keeps serving


def _payload(chunk_key: bytes, nbytes: int) -> bytes:
    return blake3.blake3(chunk_key).digest(length=nbytes)  # the right bytes follow from the key alone


WRITER = textwrap.dedent('''
    import sys, blake3, torch
    from lmcache.core.chunk_format import encode, header_for
    from lmcache.core.geometry import KVGeometry
    from lmcache.core.keys import ObjectKey
    from lmcache.core.tiers.disk import DiskTier
    g = KVGeometry(2, 2, 64, 64, torch.float16)
    tier = DiskTier(sys.argv[1], 1 << 40)
    i = int(sys.argv[2])
    while True:
        key = ObjectKey(blake3.blake3(i.to_bytes(8, "little")).digest(16), 0, 2)
        h = header_for(g, b"F" * 16, key.chunk, 256, 0, 2)
        data = blake3.blake3(key.chunk).digest(length=h.payload_nbytes)
        head, body = encode(h, torch.frombuffer(bytearray(data), dtype=torch.uint8))
        tier.put(key, head, body)
        i += 1
''')


def test_sigkill_during_writes_never_leaves_a_loadable_wrong_chunk(tmp_path):
    g = KVGeometry(2, 2, 64, 64, torch.float16)
    nbytes = header_for(g, b"F" * 16, b"K" * 16, 256, 0, 2).payload_nbytes
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    rng = random.Random(0)
    start = 0
    for _round in range(6):
        before = len(list((tmp_path / "disk").rglob("*.lmc")))
        proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "disk"), str(start)])
        deadline = time.monotonic() + 60
        while len(list((tmp_path / "disk").rglob("*.lmc"))) <= before and time.monotonic() < deadline:
            time.sleep(0.02)  # wait for the writer's first object, then kill at a random instant
        time.sleep(rng.random() * 0.3)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        start += 100000
        tier = DiskTier(tmp_path / "disk", 1 << 40)
        assert not os.listdir(tmp_path / "disk" / "lmcache-v1" / "tmp")  # leftovers cleaned at start
        pool = HostMemoryPool(nbytes * 2)
        loaded = 0
        for key in list(tier._index):
            got = tier.load(key, pool.allocate)
            if got is None:
                continue
            header, obj = got
            assert bytes(obj.raw.numpy()) == _payload(key.chunk, nbytes)
            obj.unref()
            loaded += 1
        assert loaded > 0 and tier.stats.corrupt == 0


FULL_DISK = textwrap.dedent('''
    import resource, signal, sys
    sys.path.insert(0, sys.argv[2])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    # no file may grow past 1 KiB: every object write fails part-way, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))
    from tierutil import engine, prompt, retrieved_exactly, store
    e = engine(local_disk_path=sys.argv[1])
    toks = prompt(64)
    kv, slots = store(e, toks)
    e.flush()
    assert retrieved_exactly(e, toks, kv, slots) == 64  # the engine keeps serving from CPU
    s = e.stack.disk.stats
    print(s.errors, s.stores, len(e.stack.disk))
''')


def test_failing_disk_writes_are_counted_and_leave_nothing_loadable(tmp_path):
    script = tmp_path / "full.py"
    script.write_text(FULL_DISK)
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "d"), os.path.dirname(__file__)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    errors, stores, objects = map(int, out.stdout.split())
    assert (errors, stores, objects) == (4, 0, 0)
    assert "write failed" in out.stderr
    again = engine(local_disk_path=str(tmp_path / "d"))
    assert len(again.stack.disk) == 0 and not list((tmp_path / "d").rglob("*.lmc"))
    assert not list((tmp_path / "d" / "lmcache-v1" / "tmp").iterdir())
