"""Recorded GPU runs (schema ``moesim.recorded-run/1``): published measurements that
``moesim regress`` compares the simulator against.

One YAML file per source holds a list of runs; each run names a topology, a workload
(an EP dispatch/combine, a grouped or dense GEMM, an all-to-all) and the measured
metrics with a relative tolerance. :func:`load_runs` turns every mistake into one
:class:`InputError` naming the file, the field path (``runs[3].measured.x.value``) and
what is allowed, so the CLI can exit with 2 and no traceback.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import ConfigDict, Field, ValidationError

from moesim.config.model import MAX_EXPERTS, MAX_TOP_K
from moesim.config.parallel import MAX_GPUS, MAX_TOKENS_PER_GPU, KernelName
from moesim.config.training import Precision, Schedule
from moesim.errors import InputError
from moesim.inputs import read_yaml
from moesim.validation import StrictModel, field_names, input_error

SCHEMA = "moesim.recorded-run/1"
KNOWN_GAPS = "known_gaps.yaml"  # runs the model is known to miss; run only on request

# The scenario's limits (README "Limits"): a recorded run is simulated like a scenario, and
# its sizes reach numpy allocations (an array per expert, per GPU, per routed pick).
Gpus = Annotated[int, Field(gt=0, le=MAX_GPUS)]
Experts = Annotated[int, Field(gt=0, le=MAX_EXPERTS)]
Tokens = Annotated[int, Field(gt=0, le=MAX_TOKENS_PER_GPU)]  # per rank / GPU
Width = Annotated[int, Field(gt=0, le=65_536)]  # hidden size, top-k, SMs, pipeline stages
Rows = Annotated[int, Field(gt=0, le=2**24)]  # a GEMM's M, a batch, a sequence
Inner = Annotated[int, Field(gt=0, le=2**20)]  # a GEMM's N and K
Bytes = Annotated[int, Field(gt=0, le=2**40)]  # an all-to-all buffer per rank: 1 TiB


class Source(StrictModel):
    """Where the numbers were published; ``note`` says which table or CSV row."""

    repo: str
    path: str
    commit: str | None = None
    note: str = ""


class EpDispatchCombine(StrictModel):
    """One DeepEP-style dispatch + combine of ``tokens_per_rank`` tokens on every rank."""

    kind: Literal["ep-dispatch-combine"]
    kernel: KernelName
    tokens_per_rank: Tokens
    hidden: Width
    experts: Experts
    top_k: Annotated[int, Field(gt=0, le=MAX_TOP_K)]
    topk_groups: Gpus | None = None  # max nodes a token may reach; None = no limit
    routing: Literal["uniform-random"] = "uniform-random"
    comm_sms: Width | None = None  # SMs the kernel ran on (DeepEP: slower below its need)
    dispatch_dtype: Literal["fp8", "bf16"] = "fp8"
    combine_dtype: Literal["bf16"] = "bf16"
    nvlink: bool = True  # low-latency kernels: False = same-node copies over RDMA too


class GroupedGemm(StrictModel):
    """``groups`` GEMMs of ``m_per_group x n x k`` in one kernel (DeepGEMM's MoE GEMMs)."""

    kind: Literal["grouped-gemm"]
    groups: Experts
    m_per_group: Rows
    n: Inner
    k: Inner
    dtype: Literal["fp8", "bf16"] = "fp8"
    layout: Literal["contiguous", "masked"]


class DenseGemm(StrictModel):
    """One ``m x n x k`` GEMM."""

    kind: Literal["dense-gemm"]
    m: Rows
    n: Inner
    k: Inner
    dtype: Literal["fp8", "bf16"] = "fp8"


class AllToAll(StrictModel):
    """nccl-tests ``alltoall_perf``: each rank's ``bytes_per_rank`` buffer is split evenly
    over all ranks (itself included)."""

    kind: Literal["alltoall"]
    bytes_per_rank: Bytes


class TrainingStep(StrictModel):
    """A whole pre-training step of a model preset in a Megatron-style layout
    (``training.*`` and ``parallel.*`` fields of a scenario, docs/training.md).

    ``routing: uniform`` is uniform random routing, what Megatron-Core's
    ``--moe-router-force-load-balancing`` does (random router logits); ``overrides`` are
    further scenario fields as ``--set`` takes them."""

    kind: Literal["training-step"]
    model: str  # model preset
    precision: Precision
    global_batch: Rows
    micro_batch: Width
    seq_len: Rows
    tp: Gpus = 1
    pp: Width = 1
    vp: Width = 1
    cp: Gpus = 1
    ep: Gpus
    moe_tp: Gpus = 1
    schedule: Schedule | None = None
    routing: Literal["uniform"] = "uniform"
    dispatch_kernel: KernelName = "nccl-alltoall"
    overrides: list[str] = Field(default_factory=list)


Workload = Annotated[
    Union[EpDispatchCombine, GroupedGemm, DenseGemm, AllToAll, TrainingStep],  # noqa: UP007
    Field(discriminator="kind"),
]

# Metrics each workload kind can be compared on (the simulator computes exactly these).
METRICS: dict[str, tuple[str, ...]] = {
    "ep-dispatch-combine": ("dispatch_bw_GBps", "combine_bw_GBps",
                            "dispatch_latency_us", "combine_latency_us"),
    "grouped-gemm": ("tflops",),
    "dense-gemm": ("tflops",),
    "alltoall": ("busbw_GBps", "algbw_GBps"),
    "training-step": ("tokens_per_s_per_gpu", "model_tflops_per_gpu"),
}


class Measured(StrictModel):
    value: float = Field(gt=0)
    link: Literal["nvlink", "rdma"] | None = None  # bandwidths: which link class counts
    unit: str | None = None


class Run(StrictModel):
    id: str = Field(min_length=1)
    topology: str  # preset name or path (relative paths are found beside the file)
    gpus: Gpus
    workload: Workload
    measured: dict[str, Measured] = Field(min_length=1)
    tolerance: float = Field(gt=0, le=1)  # relative: |sim - measured| / measured
    source: Source | None = None  # this run's own provenance (e.g. its CSV row)
    note: str = ""


class RecordedRuns(StrictModel):
    schema_: Literal["moesim.recorded-run/1"] = Field(alias="schema")
    source: Source
    runs: list[Run] = Field(min_length=1)
    path: str = Field(default="", exclude=True)  # the file it came from, set by load_runs

    model_config = ConfigDict(**StrictModel.model_config, populate_by_name=True)


def gpu_runs_dir() -> Path:
    """The folder of shipped recorded runs (``moesim/fidelity/gpu_runs``)."""
    return Path(str(resources.files("moesim.fidelity").joinpath("gpu_runs")))


def load_runs(path: str | os.PathLike[str]) -> RecordedRuns:
    """Read and check one recorded-run file; every problem is one InputError."""
    source = str(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise InputError("a recorded-run file holds a YAML mapping", source=source,
                         allowed="schema, source, runs")
    if "path" in data:  # filled in by the loader, never read from the file
        raise InputError("unknown field", field="path", source=source,
                         allowed=", ".join(field_names(RecordedRuns)))
    try:
        runs = RecordedRuns.model_validate(data)
    except ValidationError as err:
        raise input_error(err, schema=RecordedRuns, source=source) from None
    _check(runs, Path(path), source)
    return runs.model_copy(update={"path": source})


def resolve_topology(run: Run, file: str | os.PathLike[str] | None) -> str:
    """A topology path given relative to its recorded-run file, else the name as is."""
    if file and ("/" in run.topology or run.topology.endswith((".yaml", ".yml"))):
        beside = Path(file).parent / run.topology
        if beside.exists():
            return str(beside)
    return run.topology


def _check(runs: RecordedRuns, path: Path, source: str) -> None:
    """What the types cannot say: metric names per kind, links, unique ids, topology."""
    from moesim.topologies import load_topology

    seen: set[str] = set()
    for i, run in enumerate(runs.runs):
        at = f"runs[{i}]"
        if run.id in seen:
            raise InputError(f"duplicate run id {run.id!r}", field=f"{at}.id", source=source,
                             allowed="ids unique within a file")
        seen.add(run.id)
        kind = run.workload.kind
        if kind == "ep-dispatch-combine":
            _check_ep(run, at, source)
        for name, m in run.measured.items():
            if name not in METRICS[kind]:
                raise InputError(f"unknown metric {name!r} for a {kind} run",
                                 field=f"{at}.measured.{name}", source=source,
                                 allowed=", ".join(METRICS[kind]))
            if kind == "ep-dispatch-combine" and name.endswith("_bw_GBps") and m.link is None:
                raise InputError("a bandwidth must name the link class it counts",
                                 field=f"{at}.measured.{name}.link", source=source,
                                 allowed="nvlink, rdma")
        try:
            topo = load_topology(resolve_topology(run, path), gpus=run.gpus)
        except InputError as err:
            # The topology's own message, re-pointed at this run's field.
            field = f"{at}.{err.field}" if err.field in ("topology", "gpus") else f"{at}.topology"
            raise InputError(err.problem, field=field, allowed=err.allowed,
                             source=source) from None
        w = run.workload
        if isinstance(w, EpDispatchCombine) and w.topk_groups is not None:
            nodes = min(topo.n_domains, run.gpus)
            if w.topk_groups < nodes and w.topk_groups * (w.experts // nodes) < w.top_k:
                raise InputError(
                    f"{w.topk_groups} node(s) hold fewer than top_k={w.top_k} experts",
                    field=f"{at}.workload.topk_groups", source=source,
                    allowed=f"null or >= {-(-w.top_k // (w.experts // nodes))}")


def _check_ep(run: Run, at: str, source: str) -> None:
    w = run.workload
    assert isinstance(w, EpDispatchCombine)
    if w.experts % run.gpus:
        raise InputError(f"{w.experts} experts do not split evenly over {run.gpus} GPUs",
                         field=f"{at}.workload.experts", source=source,
                         allowed=f"a multiple of gpus ({run.gpus})")
    if w.top_k > w.experts:
        raise InputError(f"top_k {w.top_k} exceeds the {w.experts} experts",
                         field=f"{at}.workload.top_k", source=source,
                         allowed=f"1..{w.experts}")
    from moesim.config.feasibility import MAX_ASSIGNMENTS
    from moesim.fidelity.benchmarks import SAMPLED_TOKENS, sampled_picks

    picks = int(sampled_picks(run.gpus, w.tokens_per_rank, w.top_k))
    if picks > MAX_ASSIGNMENTS:  # the routing is drawn for every rank's sampled tokens
        raise InputError(f"{picks:,} routed picks to draw", field=f"{at}.workload.top_k",
                         source=source, allowed=f"gpus x min(tokens_per_rank, "
                                                f"{SAMPLED_TOKENS}) x top_k at most "
                                                f"{MAX_ASSIGNMENTS:,}")
