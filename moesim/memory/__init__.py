"""Memory per GPU: what one GPU of a scenario holds (weights, gradients, optimizer
state, activations, communication buffers, KV cache) against its HBM (docs/memory.md)."""

from moesim.memory.model import (
    BREAKDOWN_KEYS,
    MemoryEstimate,
    explain,
    memory_per_gpu,
    summary_keys,
)

__all__ = ["BREAKDOWN_KEYS", "MemoryEstimate", "explain", "memory_per_gpu", "summary_keys"]
