import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from kvutil import DTYPES, random_bits

from lmcache.core.chunk_format import HEADER_BYTES, ChunkCorrupt, decode, encode, header_for, payload_tensor
from lmcache.core.geometry import KIND_MLA, KVGeometry


def _chunk(geometry, tokens, h0, h1, seed):
    header = header_for(geometry, b"F" * 16, b"K" * 16, tokens, h0, h1)
    payload = random_bits(torch.empty(header.payload_shape, dtype=geometry.dtype), seed)
    head, body = encode(header, payload)
    return header, payload, bytearray(head) + bytearray(body)


@given(st.sampled_from(DTYPES), st.integers(1, 3), st.integers(1, 4), st.integers(1, 9), st.booleans(), st.integers(0, 999))
def test_encode_decode_round_trip(dtype, layers, heads, tokens, mla, seed):
    g = KVGeometry(layers, 1, 7, 0, dtype, KIND_MLA) if mla else KVGeometry(layers, heads, 5, 3, dtype)
    h0 = 0 if mla else min(1, heads - 1)
    header, payload, blob = _chunk(g, tokens, h0, g.num_kv_heads, seed)
    got_header, got_payload = decode(blob)
    assert got_header.payload_shape == payload.shape and got_header.dtype == dtype
    assert (got_header.head_start, got_header.head_end, got_header.chunk_key) == (h0, g.num_kv_heads, b"K" * 16)
    assert torch.equal(payload_tensor(got_header, got_payload).view(torch.uint8), payload.view(torch.uint8))


@given(st.integers(0, 10**9), st.integers(1, 255))
def test_any_flipped_byte_is_detected(where, xor):
    g = KVGeometry(2, 2, 4, 4, torch.float16)
    _, _, blob = _chunk(g, 8, 0, 2, 1)
    blob[where % len(blob)] ^= xor
    with pytest.raises(ChunkCorrupt):
        decode(blob)


@given(st.integers(0, 10**9))
def test_truncation_is_detected(cut):
    g = KVGeometry(2, 2, 4, 4, torch.float16)
    _, _, blob = _chunk(g, 8, 0, 2, 1)
    with pytest.raises(ChunkCorrupt):
        decode(blob[: cut % len(blob)])


def test_head_range_is_one_contiguous_byte_range():
    """A shard of heads [a, b) is bytes [a*per_head, b*per_head) of the payload: one ranged read."""
    g = KVGeometry(3, 4, 4, 4, torch.bfloat16)
    header, payload, blob = _chunk(g, 5, 0, 4, 3)
    per_head, start = header.head_nbytes, header.sealed_nbytes
    assert start == HEADER_BYTES + 8 * 4  # the header, then one checksum per head
    shard = blob[start + 1 * per_head : start + 3 * per_head]
    assert bytes(shard) == payload[1:3].contiguous().view(torch.uint8).numpy().tobytes()
