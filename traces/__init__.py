"""moesim.traces: torch routing layers and routing-trace capture.

This package is where the torch side lives (DeepSeek V1/V2/V3 gates, balance losses,
capture from models); it is the only part of moesim allowed to import torch.
"""
