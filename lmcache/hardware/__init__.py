"""Per-accelerator ops (paged gather/scatter, host memory, streams), registered through the plugin hooks."""
