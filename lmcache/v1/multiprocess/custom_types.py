"""Record types vLLM's stock lmcache_mp_connector module imports at load time (unused by this package)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestAllocationRecord:
    request_id: str = ""
    block_ids: list[int] = field(default_factory=list)


BlockAllocationRecord = RequestAllocationRecord
