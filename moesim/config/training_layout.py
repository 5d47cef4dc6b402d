"""TrainingLayout: a training scenario's parallel sizes and batch, resolved.

Two forms of a training step exist. The EP form (``parallel.tokens_per_gpu``, one
pipeline stage, ``parallel.micro_batches`` overlapped as in DeepSeek-V3's two
micro-batches) simulates the expert-parallel part of a step. The whole-step form
(``training.global_batch`` given, or ``parallel.pp`` > 1) runs a pipeline schedule of
micro-batches, then the data-parallel gradient reduction and the optimizer step
(docs/training.md). This module resolves either into one set of numbers and names the
field at fault when they do not fit together.
"""

from __future__ import annotations

from dataclasses import dataclass

from moesim.config.feasibility import divisors
from moesim.config.model import ModelShape
from moesim.config.scenario import Scenario
from moesim.errors import InputError


@dataclass(frozen=True, kw_only=True)
class TrainingLayout:
    """Megatron-style sizes of a training step (rank order: pipeline slowest).

    ``stage_gpus = gpus / pp`` GPUs hold one pipeline stage; ``dp = stage_gpus / (tp x
    cp)`` data-parallel replicas of its dense weights; ``expert_dp = stage_gpus / (ep x
    moe_tp)`` of each shard of its routed experts. Each replica runs ``micro_batches``
    micro-batches of ``tokens_per_microbatch`` tokens per GPU through the pipeline.
    """

    gpus: int
    tp: int
    pp: int
    vp: int
    cp: int
    ep: int
    dp: int
    expert_dp: int
    stage_gpus: int
    micro_batches: int
    tokens_per_microbatch: int
    seq_len: int
    schedule: str
    whole_step: bool

    @property
    def tokens_per_step(self) -> int:
        """Tokens of the whole step, all replicas."""
        return self.dp * self.micro_batches * self.tokens_per_microbatch * self.tp * self.cp


def training_precision(scenario: Scenario) -> str:
    """The step's precision: ``training.precision``, else the model's GEMM type's
    (``fp4`` GEMMs are NVFP4)."""
    gemm = scenario.model.gemm_dtype
    return scenario.training.precision or {"fp4": "nvfp4"}.get(gemm, gemm)


def whole_step(scenario: Scenario) -> bool:
    """Whether the scenario's training step is the whole step (pipeline, DP, optimizer)."""
    return scenario.mode == "train" and (scenario.training.global_batch is not None
                                         or scenario.parallel.pp > 1)


def check_schedule(schedule: str, *, pp: int, vp: int, micro_batches: int,
                   fields: dict[str, str] | None = None) -> None:
    """The pipeline shapes a schedule can run (InputError naming the field, renamed
    through ``fields``: e.g. ``{"vp": "parallel.vp"}``)."""
    def field(name: str) -> str:
        return (fields or {}).get(name, name)

    m = micro_batches
    if schedule != "interleaved" and vp != 1:
        what = ("dualpipe's two chunks per stage are its two directions, not virtual stages"
                if schedule == "dualpipe" else f"{schedule} runs one chunk per stage")
        raise InputError(f"{what}; got vp={vp}", field=field("vp"), allowed="1")
    if schedule == "interleaved":
        if vp < 2:
            raise InputError(f"interleaved needs at least 2 chunks per stage, got vp={vp}",
                             field=field("vp"), allowed=">= 2")
        # Megatron-LM's forward_backward_pipelining_with_interleaving groups
        # micro-batches in rounds of pp per chunk.
        if m % pp:
            raise InputError(f"interleaved needs micro-batches in multiples of pp={pp}, "
                             f"got {m} micro-batches",
                             field=field("micro_batches"), allowed=f"multiples of {pp}")
    if schedule == "dualpipe":
        # The rules deepseek-ai/DualPipe's DualPipe.step asserts: an even number of
        # ranks, and an even number of micro-batches (half from each end), at least
        # 2 * pp so that the F&B steady phase (step 4) runs at least once.
        if pp % 2:
            raise InputError(f"dualpipe needs an even pp, got {pp}", field=field("pp"),
                             allowed="even numbers")
        if m % 2 or m < 2 * pp:
            raise InputError(f"dualpipe needs an even number of micro-batches >= 2*pp="
                             f"{2 * pp}, got {m}",
                             field=field("micro_batches"), allowed=f"even numbers >= {2 * pp}")


def training_layout(scenario: Scenario) -> TrainingLayout:
    """Resolve the layout of a ``mode: train`` scenario (InputError naming the field)."""
    p, t, m = scenario.parallel, scenario.training, scenario.model
    gpus = p.total_gpus
    if not whole_step(scenario):
        for field, value, default in (("parallel.tp", p.tp, 1), ("parallel.cp", p.cp, 1),
                                      ("training.precision", t.precision, None),
                                      ("training.recompute", t.recompute, "none"),
                                      ("training.schedule", t.schedule, "1f1b")):
            if value != default:
                raise InputError(
                    f"{field} belongs to the whole training step (docs/training.md), "
                    "which needs training.global_batch or parallel.pp > 1",
                    field=field, allowed=f"{default if default is not None else 'null'}, "
                                         "or set training.global_batch")
    if p.tp > 1 and m.num_heads % p.tp:
        raise InputError(f"tp {p.tp} does not divide the {m.num_heads} attention heads",
                         field="parallel.tp", allowed=divisors(m.num_heads))
    if p.tp > 1 and m.attention == "gqa" and m.num_kv_heads % p.tp and p.tp % m.num_kv_heads:
        ok = [d for d in range(1, m.num_heads + 1) if m.num_heads % d == 0
              and (m.num_kv_heads % d == 0 or d % m.num_kv_heads == 0)]
        raise InputError(f"tp {p.tp} neither divides nor is a multiple of the "
                         f"{m.num_kv_heads} KV heads", field="parallel.tp",
                         allowed=", ".join(map(str, ok)))
    if gpus % p.pp:
        raise InputError(f"{gpus} GPUs do not split into {p.pp} pipeline stages",
                         field="parallel.pp", allowed=divisors(gpus))
    stage_gpus = gpus // p.pp
    if stage_gpus % (p.ep * p.moe_tp):
        raise InputError(f"a pipeline stage of {stage_gpus} GPUs is not a whole number of "
                         f"MoE instances of ep x moe_tp = {p.ep} x {p.moe_tp}",
                         field="parallel.moe_tp" if stage_gpus % p.ep == 0 else "parallel.ep",
                         allowed=f"ep x moe_tp dividing {stage_gpus}")
    chunks = p.pp * p.vp
    if chunks > m.num_layers:  # every chunk must hold a layer
        raise InputError(f"{chunks} pipeline chunks (pp x vp) exceed the model's "
                         f"{m.num_layers} layers",
                         field="parallel.vp" if p.vp > 1 else "parallel.pp",
                         allowed=f"pp x vp at most {m.num_layers}")
    if stage_gpus % (p.tp * p.cp):
        raise InputError(f"a pipeline stage of {stage_gpus} GPUs is not a whole number of "
                         f"TP x CP groups of {p.tp} x {p.cp}",
                         field="parallel.cp" if stage_gpus % p.tp == 0 else "parallel.tp",
                         allowed=f"tp x cp dividing {stage_gpus}")
    dp = stage_gpus // (p.tp * p.cp)
    seq_len = t.seq_len or p.seq_len
    if t.global_batch is not None:
        per_step = dp * t.micro_batch
        if t.global_batch % per_step:
            raise InputError(
                f"a global batch of {t.global_batch} sequences does not split into "
                f"{dp} data-parallel replicas x micro-batches of {t.micro_batch}",
                field="training.global_batch", allowed=f"multiples of {per_step}")
        micro_batches = t.global_batch // per_step
        if (t.micro_batch * seq_len) % (p.tp * p.cp):
            raise InputError(f"a micro-batch of {t.micro_batch} x {seq_len} tokens does not "
                             f"split over tp x cp = {p.tp * p.cp} GPUs",
                             field="training.seq_len", allowed=f"multiples of {p.tp * p.cp}")
        tokens = t.micro_batch * seq_len // (p.tp * p.cp)
    else:
        if p.tokens_per_gpu is None:
            raise InputError("missing required field (mode train)",
                             field="parallel.tokens_per_gpu",
                             allowed="a positive integer, or training.global_batch")
        micro_batches = p.micro_batches
        tokens = p.tokens_per_gpu // p.micro_batches
    check_schedule(t.schedule, pp=p.pp, vp=p.vp, micro_batches=micro_batches,
                   fields={"pp": "parallel.pp", "vp": "parallel.vp",
                           "micro_batches": "training.global_batch"
                           if t.global_batch is not None else "parallel.micro_batches"})
    return TrainingLayout(
        gpus=gpus, tp=p.tp, pp=p.pp, vp=p.vp, cp=p.cp, ep=p.ep, dp=dp,
        expert_dp=stage_gpus // (p.ep * p.moe_tp), stage_gpus=stage_gpus,
        micro_batches=micro_batches,
        tokens_per_microbatch=tokens, seq_len=seq_len, schedule=t.schedule,
        whole_step=whole_step(scenario))


def chunk_layers(layout: TrainingLayout, model: ModelShape) -> list[list[range]]:
    """The model layers of each (stage, chunk) ``[pp][chunks per stage]``.

    The split counts the LM head with its loss as one more layer, and each MTP module as
    one (Megatron-LM's ``--account-for-loss-in-pipeline-split``; the last stage would
    otherwise carry a layer's worth more than the others), then splits those slots as
    evenly as possible into ``pp x vp`` consecutive chunks, the first ones a slot
    longer; fewer such slots count where the last chunk would be left without a layer
    (the head and MTP modules always sit with the last layer). Chunk ``c`` in model
    order sits on stage ``c mod pp`` as its virtual chunk ``c // pp`` (Megatron's
    interleaving; ``vp`` = 1: one chunk per stage). DualPipe
    splits the model into ``pp`` stages and keeps two of them on every GPU: stage ``s``
    (the forward direction's) and stage ``pp - 1 - s`` (the reverse direction's),
    DeepSeek-V3 report sec. 3.2.1.
    """
    parts = layout.pp if layout.schedule == "dualpipe" else layout.pp * layout.vp
    # The head's and MTP modules' slots count only while every chunk keeps a layer.
    for extra in range(1 + model.mtp_layers, -1, -1):
        chunks = [range(c.start, min(c.stop, model.num_layers))
                  for c in _split(model.num_layers + extra, parts)]
        if all(chunks):
            break
    if layout.schedule == "dualpipe":
        return [[chunks[s], chunks[layout.pp - 1 - s]] for s in range(layout.pp)]
    return [[chunks[v * layout.pp + s] for v in range(layout.vp)] for s in range(layout.pp)]


def _split(n: int, parts: int) -> list[range]:
    size, extra = divmod(n, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + size + (i < extra))
    return [range(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]
