"""Engine-agnostic core: config, chunk keys, canonical chunk format, memory pool, tiers, cache engine."""
