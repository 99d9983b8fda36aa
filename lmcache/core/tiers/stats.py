"""Per-tier counters, plain integers: cheap to bump on the hot path, read by metrics and benchmarks."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    stores: int = 0
    evictions: int = 0
    errors: int = 0
    drops: int = 0
    corrupt: int = 0
    bytes_in: int = 0
    bytes_out: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
