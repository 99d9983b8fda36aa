"""Which stored shards can serve a head range: tensor-parallel sizes share chunks.

Engines of different TP sizes hold different head ranges of the same chunk (TP=2 stores heads [0, 4) and
[4, 8) of an 8-head model; TP=4 reads [0, 2), [2, 4), ...). Shards are the even splits of the model's
heads (each TP rank holds ``total / tp`` consecutive heads; with more ranks than heads, one head each), so a
reader needing [a, b) can be served by the shards of any split that overlap [a, b): one larger shard
(a sub-range of it: one ranged read, the canonical format is head-major for this) or several smaller ones
side by side. ``cover_plans`` lists those choices, fewest pieces first; the exact range itself is not
among them (a store tries it first).
"""

from __future__ import annotations

from functools import lru_cache

HeadRange = tuple[int, int]


@lru_cache(maxsize=1024)
def cover_plans(head_start: int, head_end: int, total_heads: int) -> tuple[tuple[HeadRange, ...], ...]:
    """Ways to assemble heads [head_start, head_end) of ``total_heads`` from even-split shards other than
    the exact range, each a tuple of shard ranges in head order; fewest (largest) pieces first."""
    if not 0 <= head_start < head_end <= total_heads:
        return ()
    plans = []
    for size in range(total_heads, 0, -1):
        if total_heads % size:
            continue
        plan = tuple((i * size, (i + 1) * size) for i in range(head_start // size, -(-head_end // size)))
        if plan != ((head_start, head_end),):
            plans.append(plan)
    return tuple(plans)
