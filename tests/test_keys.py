import array
import hashlib
import json
import os
import subprocess
import sys
from enum import IntEnum

import blake3
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcache.core import key_chain, token_list
from lmcache.core.geometry import KVGeometry, ModelIdentity
from lmcache.core.keys import ChunkHasher, ObjectKey

GEO = KVGeometry(32, 8, 128, 128, torch.bfloat16)
LLAMA = ModelIdentity("meta-llama/Llama-3.1-8B", GEO)


@given(st.lists(st.integers(0, 2**32 - 1), min_size=0, max_size=80), st.integers(1, 16))
def test_prefix_semantics(tokens, chunk_size):
    h = ChunkHasher(LLAMA, chunk_size)
    keys = h.keys(tokens)
    assert len(keys) == len(tokens) // chunk_size  # full chunks only: the partial tail has no key
    for n in range(len(keys)):
        # the key of chunk n depends on every token before its end and on none after it
        assert h.keys(tokens[: (n + 1) * chunk_size]) == keys[: n + 1]
    if len(keys) >= 2:
        changed = list(tokens)
        changed[0] = (changed[0] + 1) % 2**32
        assert all(a != b for a, b in zip(h.keys(changed), keys))


@given(st.lists(st.integers(0, 200000), min_size=16, max_size=64))
def test_input_type_does_not_change_keys(tokens):
    h = ChunkHasher(LLAMA, 8)
    ref = h.keys(tokens)
    assert h.keys(np.array(tokens, dtype=np.int64)) == ref
    assert h.keys(torch.tensor(tokens, dtype=torch.int32)) == ref
    assert h.keys(torch.tensor(tokens)) == ref
    assert h.keys(tuple(tokens)) == ref


def test_salt_model_and_geometry_scope_keys():
    tokens = list(range(64))
    base = ChunkHasher(LLAMA, 16).keys(tokens)
    assert ChunkHasher(LLAMA, 16, salt="tenant-a").keys(tokens)[0] != base[0]
    assert ChunkHasher(LLAMA, 16, salt="tenant-a").keys(tokens) != ChunkHasher(LLAMA, 16, salt="tenant-b").keys(tokens)
    assert ChunkHasher(ModelIdentity("other", GEO), 16).keys(tokens)[0] != base[0]
    fp8 = KVGeometry(32, 8, 128, 128, torch.float16)
    assert ChunkHasher(ModelIdentity(LLAMA.model_name, fp8), 16).keys(tokens)[0] != base[0]


def test_keys_are_identical_across_processes_and_hash_seeds():
    """The peer's users lose cross-instance hits to per-process hashing; ours must not depend on it."""
    code = (
        "import torch;from lmcache.core.geometry import KVGeometry,ModelIdentity;"
        "from lmcache.core.keys import ChunkHasher;"
        "g=KVGeometry(32,8,128,128,torch.bfloat16);"
        "print(ChunkHasher(ModelIdentity('m',g),256,'s').keys(list(range(1024)))[-1].hex())"
    )
    outs = {
        subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed},
                       capture_output=True, text=True, check=True).stdout.strip()
        for seed in ("0", "1", "12345")
    }
    local = ChunkHasher(ModelIdentity("m", GEO), 256, "s").keys(list(range(1024)))[-1].hex()
    assert outs == {local}


def test_object_key_round_trips_as_text():
    k = ObjectKey(bytes(range(16)), 2, 4)
    assert ObjectKey.parse(str(k)) == k and str(k).endswith("@2-4")


# -- the native loop (key_chain): the same keys as the definition, for every input a caller may hand in ------------

def reference_keys(h: ChunkHasher, tokens) -> list[bytes]:
    """The module docstring's definition, written out here independently of keys.py."""
    data = np.asarray(tokens, dtype=np.int64).astype("<u4").tobytes()
    step, prev, out = h.chunk_size * 4, b"", []
    for start in range(0, len(data) - step + 1, step):
        prev = hashlib.sha256(prev + data[start:start + step]).digest()
        out.append(blake3.blake3(h.root + prev).digest(16))
    return out


def test_the_native_loop_loads_here():
    """CI has numba and Python's libcrypto: the fast path must be the one tested, not silently the fallback."""
    assert key_chain.load_error() is None and key_chain.native() is not None


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 64), st.integers(key_chain.NATIVE_MIN_CHUNKS, 70), st.integers(0, 63), st.integers(0, 2**32),
       st.sampled_from(["list", "tuple", "int64", "uint32", "tensor"]), st.text(max_size=3), st.integers(0, 70))
def test_native_keys_equal_the_definition(chunk_size, chunks, tail, seed, kind, salt, taken):
    rng = np.random.default_rng(seed)
    n = chunks * chunk_size + tail % chunk_size
    ids = rng.integers(0, 2**32, size=n, dtype=np.uint64)
    ids[rng.integers(0, n, size=2)] = [0, 2**32 - 1]  # both ends of the id range
    tokens = {"list": ids.tolist(), "tuple": tuple(ids.tolist()), "int64": ids.astype(np.int64),
              "uint32": ids.astype(np.uint32), "tensor": torch.from_numpy(ids.astype(np.int64))}[kind]
    h = ChunkHasher(LLAMA, chunk_size, salt)
    want = reference_keys(h, ids)
    assert h.keys(tokens) == want
    assert list(h.iter_keys(tokens)) == want
    it = h.iter_keys(tokens)  # a lookup stops at its first miss: what it took must still be right
    assert [k for _, k in zip(range(taken), it)] == want[:taken]


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 8), st.integers(1, 32), st.integers(0, 2**32), st.integers(0, 5))
def test_native_blake3_block_matches_blake3_for_every_root_and_key_length(root_words, key_bytes, seed, first):
    chain = key_chain.native()
    rng = np.random.default_rng(seed)
    words = rng.integers(0, 2**32, size=8 * 16, dtype=np.uint64).astype(np.uint32)
    root, prev = rng.bytes(4 * root_words), rng.bytes(32) if first else b""
    digests, keys = chain.run(words, 16, first, 8 - first, prev, root, key_bytes)
    data = words.astype("<u4").tobytes()
    for i in range(8 - first):
        prev = hashlib.sha256(prev + data[(first + i) * 64:(first + i + 1) * 64]).digest()
        assert digests[i].tobytes() == prev
        assert keys[i].tobytes() == blake3.blake3(root + prev).digest(key_bytes)


@pytest.mark.parametrize("bad, error", [(-1, OverflowError), (2**32, OverflowError), (1.5, TypeError)])
def test_a_bad_token_id_in_a_long_prompt_raises_as_in_a_short_one(bad, error):
    h = ChunkHasher(LLAMA, 16)
    short, long = [1] * 16, [1] * (16 * key_chain.NATIVE_MIN_CHUNKS * 2)
    for tokens in (short, long):
        tokens[3] = bad
        with pytest.raises(error):
            h.keys(tokens)
        with pytest.raises(error):
            list(h.iter_keys(tokens))
    long[3], long[-3] = 1, bad  # in a later chunk: the lazy iteration yields the good chunks, then says which
    with pytest.raises(OverflowError, match="not an unsigned 32-bit int"):
        list(h.iter_keys(long))


# -- prompt lists read in place (token_list): the same words as array('I'), every non-id refused ----------------------

def test_the_list_reader_loads_here():
    """CI's CPython has the layout the reader knows: the in-place read must be the one tested."""
    assert key_chain.native().lists_error is None


@settings(max_examples=80, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 255, 256, 2**30 - 1, 2**30, 2**32 - 1])),
                max_size=300), st.data())
def test_list_words_are_exactly_what_array_converts(ids, data):
    start = data.draw(st.integers(0, len(ids)))
    end = data.draw(st.integers(start, len(ids)))
    words = key_chain.native().list_words(ids, start, end)
    assert words is not None and words.dtype == np.uint32
    assert words.tobytes() == array.array("I", ids[start:end]).tobytes()


@pytest.mark.parametrize("bad", [-1, -(2**40), 2**32, 2**33 + 5, 2**64, 2**200, True, 1.5, "3", None, IntEnum("E", "A").A])
@pytest.mark.parametrize("where", [0, 17, -1])
def test_list_words_refuse_every_item_that_is_not_an_exact_uint32_int(bad, where):
    ids = list(range(40))
    ids[where] = bad
    chain = key_chain.native()
    assert chain.list_words(ids) is None
    clean = list(range(40))
    assert chain.list_words(clean, 0, 41) is None and chain.list_words(clean, 5, 3) is None  # not a plain range
    assert chain.list_words(tuple(clean)) is None and chain.list_words(np.arange(40)) is None  # not a list


def test_long_prompts_with_bools_or_int_subclasses_key_as_their_int_values():
    """The reader refuses them and ``token_words`` (array('I')) converts them: the keys of the plain ints."""

    class Token(int):
        pass

    h = ChunkHasher(LLAMA, 16)
    ids = list(range(16 * key_chain.NATIVE_MIN_CHUNKS * 2))
    odd = ids.copy()
    odd[1], odd[20], odd[-1] = True, Token(20), Token(odd[-1])

    class Prompt(list):
        pass

    assert h.keys(odd) == h.keys(ids) == h.keys(Prompt(ids)) == list(h.iter_keys(odd)) == reference_keys(h, ids)


def test_a_layout_the_reader_does_not_know_is_refused_before_anything_is_read_through_it():
    """The layout check reads only inside objects of known content: told the other interpreter's int layout, it
    refuses (the kernel is never trusted with it)."""
    ids = list(range(300)) + [2**30 + 7, 2**32 - 1]
    token_list._check_layout(ids, sys.version_info >= (3, 12))  # this interpreter's layout passes
    with pytest.raises(RuntimeError, match="not the layout the reader knows"):
        token_list._check_layout(ids, sys.version_info < (3, 12))


def test_native_keys_off_gives_the_same_keys_and_says_so():
    """``native_keys: false`` (here as LMCACHE_NATIVE_KEYS=0) turns the loop off for the process: same keys."""
    code = ("import json,torch;from lmcache.core import key_chain;from lmcache.core.config import load_config;"
            "from lmcache.core.engine import CacheEngine;from tests.test_keys import LLAMA;"
            "e=CacheEngine(load_config(None),LLAMA,device='cpu');"
            "print(json.dumps([e.hasher().keys(list(range(300*256)))[-1].hex(),key_chain.load_error()]))")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "LMCACHE_NATIVE_KEYS": "0"},
                       capture_output=True, text=True, check=True, cwd=here)
    key, why = json.loads(r.stdout.strip().splitlines()[-1])
    assert why == "config native_keys: false (LMCACHE_NATIVE_KEYS=0)"
    assert key == ChunkHasher(LLAMA, 256).keys(list(range(300 * 256)))[-1].hex()


def test_native_keys_from_several_threads_and_a_forked_child_are_right():
    """The server hashes prompts in its request threads; engines fork workers after loading the loop."""
    import multiprocessing
    from concurrent.futures import ThreadPoolExecutor

    h = ChunkHasher(LLAMA, 64)
    prompts = [np.random.default_rng(s).integers(0, 2**32, 64 * 40).tolist() for s in range(8)]
    want = [reference_keys(h, p) for p in prompts]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(5):
            assert list(pool.map(h.keys, prompts)) == want
            assert list(pool.map(lambda p: list(h.iter_keys(p)), prompts)) == want
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as children:
        assert children.map(h.keys, prompts) == want
