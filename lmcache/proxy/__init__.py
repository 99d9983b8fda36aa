"""Front ends that sit before engines (disaggregated prefill)."""
