import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmcache.core.memory_pool import ALIGNMENT, FreeListAllocator, HostMemoryPool


@given(st.lists(st.tuples(st.booleans(), st.integers(1, 5000), st.integers(0, 10**6)), max_size=200))
def test_allocator_never_overlaps_and_coalesces_back(ops):
    capacity = 64 * ALIGNMENT
    a = FreeListAllocator(capacity)
    live: list[tuple[int, int]] = []
    for is_alloc, nbytes, pick in ops:
        if is_alloc or not live:
            got = a.allocate(nbytes)
            if got is None:
                assert a.largest_free < -(-nbytes // ALIGNMENT) * ALIGNMENT
                continue
            off, size = got
            assert size >= nbytes and off % ALIGNMENT == 0 and off + size <= a.capacity
            assert all(off + size <= o or o + s <= off for o, s in live)
            live.append(got)
        else:
            a.free(*live.pop(pick % len(live)))
        assert a.used == sum(s for _, s in live)
    for block in live:
        a.free(*block)
    assert a.fragments == 1 and a.largest_free == a.capacity


def test_double_free_is_refused():
    a = FreeListAllocator(8 * ALIGNMENT)
    off, size = a.allocate(10)
    a.free(off, size)
    with pytest.raises(RuntimeError, match="double free"):
        a.free(off, size)


def test_memory_obj_refcount_frees_on_last_release():
    pool = HostMemoryPool(4 * ALIGNMENT)
    obj = pool.allocate(100)
    reader = obj.ref()
    obj.unref()  # the owner lets go while a reader still holds it
    assert pool.used_bytes == ALIGNMENT
    reader.unref()
    assert pool.used_bytes == 0
    with pytest.raises(RuntimeError):
        obj.ref()


def test_pool_capacity_must_be_positive():
    with pytest.raises(ValueError, match="raise max_cpu_size_gb"):
        HostMemoryPool(0)


def test_prefault_touches_free_memory_only_and_never_a_chunk():
    """The background prefault writes only memory no chunk holds, even while chunks come and go."""
    import threading

    from lmcache.core.memory_pool import HostMemoryPool

    step = 64 << 10
    pool = HostMemoryPool(64 * step)
    pool.buffer.fill_(0xAB)  # marks what the prefault has not written
    held = [pool.allocate(3 * step + 100) for _ in range(4)]
    for i, obj in enumerate(held):
        obj.raw.fill_(i + 1)
    stop = threading.Event()

    def churn() -> None:  # allocations racing the prefault: each must keep its bytes
        while not stop.is_set():
            obj = pool.allocate(step)
            if obj is not None:
                obj.raw.fill_(0x5A)
                assert bool((obj.raw == 0x5A).all())
                obj.unref()

    t = threading.Thread(target=churn)
    t.start()
    pool.prefault(step).join(timeout=30)
    stop.set()
    t.join()
    for i, obj in enumerate(held):
        assert bool((obj.raw == i + 1).all()), "the prefault wrote into a held chunk"
    top = pool.buffer[16 * step :]  # never allocated: touched (zeroed) by the prefault
    assert bool((top == 0).all())
    pool.close()
