"""The canonical chunk format: one layout in memory, on disk and on the wire.

    [ header: 112 bytes, little-endian, see HEADER below ][ payload: payload_nbytes bytes ]

Payload layout: a C-contiguous array ``[heads, layers, tokens, row_dim]`` of ``dtype`` where
``heads = head_end - head_start`` and ``row_dim = k_dim + v_dim`` (K then V of one head of one token;
MLA: the latent row). Why head-major: a head range is one contiguous byte range, so an engine with a
different tensor-parallel size can read its shard of a stored chunk with one ranged read; a layer's
slice is ``heads`` contiguous runs of ``tokens * row_dim`` elements, cheap enough for layer-wise loading.

The header carries the payload's xxh3-64 checksum and its own; every read from a non-memory tier
verifies both, so a torn or corrupted object is detected and treated as a miss, never loaded.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import xxhash

from lmcache.core.geometry import CODE_DTYPES, DTYPE_CODES, KIND_CODES, KVGeometry

if TYPE_CHECKING:
    from lmcache.core.keys import ObjectKey

MAGIC = b"LMCK"
FORMAT_VERSION = 1
# magic, version, header_len, dtype, kind, flags, tokens, layers, total_heads, head_start, head_end,
# k_dim, v_dim, model fingerprint, chunk key, payload_nbytes, payload checksum
_BODY = struct.Struct("<4sHHBBHIIIIIII16s16sQQ")
HEADER = struct.Struct(_BODY.format + "Q")  # + checksum of the body
HEADER_BYTES = HEADER.size
_KIND_NAMES = {v: k for k, v in KIND_CODES.items()}


class ChunkCorrupt(ValueError):
    """A stored object failed validation (magic, version, header or payload checksum, size)."""


@dataclass(frozen=True)
class ChunkHeader:
    dtype: torch.dtype
    kind: str
    num_tokens: int
    num_layers: int
    total_heads: int
    head_start: int
    head_end: int
    k_dim: int
    v_dim: int
    model_fingerprint: bytes
    chunk_key: bytes
    payload_nbytes: int
    checksum: int = 0

    @property
    def num_heads(self) -> int:
        return self.head_end - self.head_start

    @property
    def payload_shape(self) -> tuple[int, int, int, int]:
        return (self.num_heads, self.num_layers, self.num_tokens, self.k_dim + self.v_dim)

    def pack(self) -> bytes:
        body = _BODY.pack(
            MAGIC, FORMAT_VERSION, HEADER_BYTES, DTYPE_CODES[self.dtype], KIND_CODES[self.kind], 0,
            self.num_tokens, self.num_layers, self.total_heads, self.head_start, self.head_end,
            self.k_dim, self.v_dim, self.model_fingerprint, self.chunk_key, self.payload_nbytes, self.checksum,
        )
        return body + xxhash.xxh3_64_intdigest(body).to_bytes(8, "little")

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> "ChunkHeader":
        if len(buf) < HEADER_BYTES:
            raise ChunkCorrupt(f"truncated header: {len(buf)} of {HEADER_BYTES} bytes")
        fields = HEADER.unpack_from(buf)
        body_sum = xxhash.xxh3_64_intdigest(bytes(buf[: _BODY.size]))
        (magic, version, hlen, dcode, kcode, _flags, tokens, layers, total, h0, h1, kd, vd, fp, key, nbytes, csum,
         hsum) = fields
        if magic != MAGIC:
            raise ChunkCorrupt(f"bad magic {magic!r}")
        if hsum != body_sum:
            raise ChunkCorrupt("header checksum mismatch")
        if version != FORMAT_VERSION or hlen != HEADER_BYTES:
            raise ChunkCorrupt(f"unsupported chunk format version {version} (this build reads {FORMAT_VERSION})")
        if dcode not in CODE_DTYPES or kcode not in _KIND_NAMES:
            raise ChunkCorrupt(f"unknown dtype/kind code {dcode}/{kcode}")
        return cls(CODE_DTYPES[dcode], _KIND_NAMES[kcode], tokens, layers, total, h0, h1, kd, vd, fp, key, nbytes, csum)

    def expected_nbytes(self) -> int:
        h, l, t, c = self.payload_shape
        return h * l * t * c * torch.empty((), dtype=self.dtype).element_size()


def header_for(geometry: KVGeometry, model_fingerprint: bytes, chunk_key: bytes, num_tokens: int,
               head_start: int, head_end: int) -> ChunkHeader:
    nbytes = (head_end - head_start) * geometry.num_layers * num_tokens * geometry.row_dim * geometry.elem_size
    return ChunkHeader(geometry.dtype, geometry.kind, num_tokens, geometry.num_layers, geometry.num_kv_heads,
                       head_start, head_end, geometry.k_dim, geometry.v_dim, model_fingerprint, chunk_key, nbytes)


def check_header(raw: bytes | memoryview, key: "ObjectKey") -> ChunkHeader:
    """The header of an object read back under ``key``: well formed (its own checksum), naming that key and
    head range, and with size fields that agree; else ``ChunkCorrupt``. Every tier and the server use this
    one check, so "another key's object" and "a header that lies about its size" are caught the same way."""
    header = ChunkHeader.unpack(raw)
    if (header.chunk_key, header.head_start, header.head_end) != (key.chunk, key.head_start, key.head_end):
        raise ChunkCorrupt("object holds another key")
    if header.payload_nbytes != header.expected_nbytes():
        raise ChunkCorrupt("header size fields disagree")
    return header


def byte_view(t: torch.Tensor) -> memoryview:
    """Zero-copy bytes of a contiguous CPU tensor (any dtype, bf16 and fp8 included)."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("byte_view needs a contiguous CPU tensor")
    array: Any = t.reshape(-1).view(torch.uint8).numpy()  # numpy arrays are buffers
    return memoryview(array)


def payload_checksum(payload: torch.Tensor | memoryview | bytes) -> int:
    if isinstance(payload, torch.Tensor):
        payload = byte_view(payload)
    return xxhash.xxh3_64_intdigest(payload)


def encode(header: ChunkHeader, payload: torch.Tensor) -> tuple[bytes, memoryview]:
    """(header bytes with the payload checksum filled in, payload bytes): write both, in order, no copy."""
    view = byte_view(payload.contiguous().view(torch.uint8).view(-1))
    if len(view) != header.payload_nbytes:
        raise ValueError(f"payload is {len(view)} bytes, header says {header.payload_nbytes}")
    sealed = ChunkHeader(**{**header.__dict__, "checksum": payload_checksum(view)})
    return sealed.pack(), view


def decode(buf: bytes | memoryview | bytearray) -> tuple[ChunkHeader, memoryview]:
    """Validate a whole stored object and return its header and payload bytes (a view into ``buf``)."""
    mv = memoryview(buf).cast("B")
    header = ChunkHeader.unpack(mv[:HEADER_BYTES])
    payload = mv[HEADER_BYTES:]
    if len(payload) != header.payload_nbytes or header.payload_nbytes != header.expected_nbytes():
        raise ChunkCorrupt(f"payload is {len(payload)} bytes, header says {header.payload_nbytes}")
    if payload_checksum(payload) != header.checksum:
        raise ChunkCorrupt("payload checksum mismatch")
    return header, payload


def payload_tensor(header: ChunkHeader, payload: memoryview | bytes | bytearray) -> torch.Tensor:
    """A tensor over the payload bytes, in the canonical shape (shares memory with ``payload``)."""
    raw = torch.frombuffer(payload, dtype=torch.uint8) if len(payload) else torch.empty(0, dtype=torch.uint8)
    return raw.view(header.dtype).view(header.payload_shape)
