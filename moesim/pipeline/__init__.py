"""Pipeline-parallel training: schedules (1F1B, interleaved 1F1B, ZB-H1, DualPipe) and
their discrete-event simulation. See docs/pipeline.md."""

from moesim.pipeline.schedules import (
    SCHEDULES,
    PipelineSpec,
    Schedule,
    Work,
    build_schedule,
    chunk_path,
)
from moesim.pipeline.simulate import (
    ChunkCosts,
    PipelineTimeline,
    item_seconds,
    simulate_pipeline,
)

__all__ = [
    "SCHEDULES",
    "ChunkCosts",
    "PipelineSpec",
    "PipelineTimeline",
    "Schedule",
    "Work",
    "build_schedule",
    "chunk_path",
    "item_seconds",
    "simulate_pipeline",
]
