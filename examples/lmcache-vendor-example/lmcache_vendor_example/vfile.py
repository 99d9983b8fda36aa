"""``vfile:///dir``: a storage tier keeping each object as one plain file, in lmcache's canonical format.

The tier contract (duck-typed): ``name``, ``stats``, ``contains(key)``, ``load(key, alloc)``,
``put(key, header, payload)``, ``remove(key)``, ``close()``. Reads must verify the object (``decode`` does):
a corrupted object is a miss, never a load.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from lmcache.core.chunk_format import ChunkCorrupt, decode
from lmcache.core.tiers.stats import TierStats


class VFileTier:
    name = "vfile"

    def __init__(self, url: str) -> None:
        path = urlsplit(url).path
        if not path:
            raise ValueError(f"remote_url '{url}': expected vfile:///absolute/directory")
        self.root = path
        os.makedirs(self.root, exist_ok=True)
        self.stats = TierStats()

    def _path(self, key) -> str:
        return os.path.join(self.root, f"{key}.obj")

    def contains(self, key) -> bool:
        return os.path.exists(self._path(key))

    def contains_many(self, keys) -> list[bool]:
        return [self.contains(k) for k in keys]

    def load(self, key, alloc):
        try:
            with open(self._path(key), "rb") as f:
                blob = f.read()
        except FileNotFoundError:
            self.stats.misses += 1
            return None
        try:
            header, payload = decode(blob)
        except ChunkCorrupt:
            self.stats.corrupt += 1
            self.remove(key)
            return None
        obj = alloc(header.payload_nbytes)
        if obj is None:
            self.stats.drops += 1
            return None
        memoryview(obj.raw.numpy())[:] = payload
        self.stats.hits += 1
        return header, obj

    def put(self, key, header: bytes, payload) -> bool:
        tmp = self._path(key) + ".tmp"
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(payload)
        os.replace(tmp, self._path(key))
        self.stats.stores += 1
        return True

    def remove(self, key) -> bool:
        try:
            os.unlink(self._path(key))
            return True
        except FileNotFoundError:
            return False

    def close(self) -> None:
        pass
