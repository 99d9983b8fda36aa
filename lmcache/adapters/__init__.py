"""Engine adapters; each imports its engine only when used."""
