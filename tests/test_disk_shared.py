"""Several processes on one disk-tier directory (SGLang TP ranks, vLLM data-parallel engines, two servers
on a host): capacity holds for the directory, no process deletes another's write in flight, objects one
writes the others find, and every read is exact or a miss."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

HERE = os.path.dirname(__file__)

WORKER = textwrap.dedent('''
    import random, sys
    import blake3, torch
    from lmcache.core.chunk_format import encode, header_for
    from lmcache.core.geometry import KVGeometry
    from lmcache.core.keys import ObjectKey
    from lmcache.core.memory_pool import HostMemoryPool
    from lmcache.core.tiers.disk import DiskTier

    g = KVGeometry(2, 2, 64, 64, torch.float16)
    NBYTES = header_for(g, b"F" * 16, b"K" * 16, 64, 0, 2).payload_nbytes
    root, me, rounds, capacity_chunks, shared_keys = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    tier = DiskTier(root, capacity_chunks * (NBYTES + 112))
    pool = HostMemoryPool(NBYTES * 4)
    rng = random.Random(me)

    def key_of(i):
        return ObjectKey(blake3.blake3(i.to_bytes(8, "little")).digest(16), 0, 2)

    def payload(key):
        return blake3.blake3(key.chunk).digest(length=NBYTES)

    loaded = wrong = 0
    for r in range(rounds):
        # half the keys are shared by every process (same bytes for the same key), half are this one's own
        i = rng.randrange(shared_keys) if rng.random() < 0.5 else 10**6 * (me + 1) + r
        key = key_of(i)
        h = header_for(g, b"F" * 16, key.chunk, 64, 0, 2)
        head, body = encode(h, torch.frombuffer(bytearray(payload(key)), dtype=torch.uint8))
        tier.put(key, head, body)
        probe = key_of(rng.randrange(shared_keys))
        if tier.contains(probe):
            got = tier.load(probe, pool.allocate)
            if got is not None:
                loaded += 1
                wrong += bytes(got[1].raw.numpy()) != payload(probe)
                got[1].unref()
    print(f"done {loaded} {wrong} {tier.stats.corrupt}", flush=True)
''')


def _chunk_files(root) -> list:
    return [p for p in (root / "lmcache-v1").rglob("*.lmc")]


@pytest.mark.parametrize("processes", [2, 4])
def test_processes_sharing_a_directory_keep_its_capacity_and_read_exact_bytes(tmp_path, processes):
    from lmcache.core.tiers.disk import DiskTier

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    root = tmp_path / "disk"
    capacity_chunks = 40
    procs = [subprocess.Popen([sys.executable, str(script), str(root), str(i), "300", str(capacity_chunks), "60"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(processes)]
    outs = [p.communicate(timeout=300) for p in procs]
    loaded_total = 0
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        _, loaded, wrong, corrupt = out.split()
        assert int(wrong) == 0 and int(corrupt) == 0
        loaded_total += int(loaded)
    assert loaded_total > 0  # they did read each other's shared objects
    files = _chunk_files(root)
    one = files[0].stat().st_size
    on_disk = sum(f.stat().st_size for f in files)
    assert on_disk <= capacity_chunks * one  # the directory's capacity, not each process's
    assert len(files) >= capacity_chunks // 2  # eviction made room; it did not empty the directory
    reopened = DiskTier(root, capacity_chunks * one)
    assert reopened.used_bytes == on_disk  # the shared count agrees with the files
    reopened.close()


HOLDER = textwrap.dedent('''
    import sys, time
    from lmcache.core.tiers.disk import DiskTier
    tier = DiskTier(sys.argv[1], 1 << 30)
    # a write in flight: the temp file exists, the rename has not happened yet
    (tier.root / "tmp" / f"{'ab' * 16}@0-2.{tier.tag}.1").write_bytes(b"half a chunk")
    print("writing", flush=True)
    time.sleep(600)
''')


def test_a_starting_process_never_deletes_a_live_processs_write_in_flight(tmp_path):
    from lmcache.core.tiers.disk import DiskTier

    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    root = tmp_path / "disk"
    holder = subprocess.Popen([sys.executable, str(script), str(root)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "writing"
        (root / "lmcache-v1" / "tmp" / f"{'cd' * 16}@0-2.deadbeefdeadbeef.1").write_bytes(b"a dead writer's")
        other = DiskTier(root, 1 << 30)
        left = sorted(p.name for p in (root / "lmcache-v1" / "tmp").iterdir())
        assert len(left) == 1 and left[0].startswith("ab")  # the live one stays, the dead one's is gone
        other.close()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        DiskTier(root, 1 << 30).close()  # the holder is dead now: its leftover goes
        assert list((root / "lmcache-v1" / "tmp").iterdir()) == []
    finally:
        holder.kill()
        holder.wait()


def test_an_object_one_process_writes_is_found_by_another_that_started_before(tmp_path):
    from tierutil import engine, prompt, retrieved_exactly, store

    a = engine(local_disk_path=str(tmp_path))
    b = engine(local_disk_path=str(tmp_path))  # started before a stores anything
    toks = prompt(64, 5)
    kv, slots = store(a, toks, seed=5)
    a.flush()
    assert b.lookup_tiers(toks) == ["disk"] * 4
    assert retrieved_exactly(b, toks, kv, slots) == 64
    a.close()
    b.close()
