"""Storage tiers: cpu (pooled host memory) and the lower tiers registered through the plugin hooks."""
