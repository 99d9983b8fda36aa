import os
import subprocess
import sys

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

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
