"""The wire protocol between engines and ``lmcache server`` (version 2).

Transport: ZeroMQ, server ROUTER, client DEALER. Every message is one msgpack frame, optionally followed
by raw payload frames (the byte fallback for clients that cannot map the shared pool):

    request:  {"v": 2, "op": str, "id": int, "session": str, "token": str, ...op fields}
    reply:    {"v": 2, "id": int, "ok": bool, "error": str (when not ok), "server": instance id, ...fields}

Ops (fields -> reply fields):
    hello    model, geometry, heads, pid, alive         -> session, shm_path (null: no mapping, use put/get),
                                                           shm_size, chunk_size, server_version, quota, max_message
    lookup   keys [str]                                 -> tiers [str] (the cached prefix, tier of each chunk)
    reserve  items [[key, nbytes]]                      -> slots [offset | "exists" | null], lease (0: none needed)
    commit   lease, items [[key, header bytes, offset]] -> stored
    abort    lease                                      -> {}
    acquire  keys [str]                                 -> items [[offset, header bytes]], lease
    release  lease                                      -> {} (ok: the lease held until now: a fence for readers)
    put      key, header bytes + 1 payload frame        -> stored (byte fallback)
    get      keys [str]                                 -> headers [bytes] + payload frames (byte fallback)
    prefetch keys [str]                                 -> cpu (how many leading keys are now in the CPU tier)
    stats    -                                          -> tiers {name: counters}, clients, pool
    clear    -                                          -> cleared
    evicted  since int                                  -> records [[seq, key, "disk" | null]], next, lost
                                                           (chunks that left the CPU tier: for KV events)

Every request carries ``token``: the server's local secret (clients of its user read it from
``/dev/shm/lmcache-<port>.key``) or its ``--token``; a session works only on the connection that opened
it. ``alive`` names the client's liveness lock (``lmcache.server.local_auth``).

Keys are ``ObjectKey`` strings (chunk key hex @ head range). Offsets are byte offsets into the shared
pool. A lease holds references on pool memory until committed/released, or until its client is dead
(its liveness lock is free), so a client that dies mid-operation leaks nothing and a stalled one never
finds its memory reused under it; a per-client quota bounds what one client holds at once.
"""

from __future__ import annotations

from typing import Any

import msgspec

PROTOCOL_VERSION = 2
OPS = ("hello", "lookup", "reserve", "commit", "abort", "acquire", "release", "put", "get", "prefetch", "stats", "clear",
       "evicted")

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(dict)


class ProtocolError(ValueError):
    """A malformed or unacceptable message; the reply carries the message text."""


def encode(msg: dict[str, Any]) -> bytes:
    return _encoder.encode(msg)


def decode(frame: bytes) -> dict[str, Any]:
    try:
        msg = _decoder.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ProtocolError(f"not a msgpack map: {e}") from None
    return msg


def short(value: Any, limit: int = 64) -> str:
    """``repr`` cut to ``limit`` characters: error replies never echo unbounded input."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def field(msg: dict, name: str, kind: type | tuple[type, ...]) -> Any:
    value = msg.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise ProtocolError(f"field '{name}' missing or not {getattr(kind, '__name__', kind)}")
    return value
