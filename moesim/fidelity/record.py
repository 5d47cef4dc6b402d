"""Record our own GPU runs as a ``moesim.recorded-run/1`` file (``moesim record``).

Everything here except the CUDA timing is plain Python so it can be tested on CPU:
:func:`gemm_shapes` lists the expert GEMMs of the model presets, :func:`gemm_runs`
turns measured seconds into runs, :func:`provenance` and :func:`recorded_document`
build the file's content and :func:`dump_document` its text. The timing functions
(:func:`time_grouped_gemm`, :func:`time_moe_layer`) need CUDA and only return numbers;
the CLI writes the file.

The schema has no ``moe-layer`` workload kind yet (``moesim/fidelity/runs.py``), so the MoE
layer forward is reported in the file's notes, not as a run that ``regress`` compares.
"""

from __future__ import annotations

import platform
import shlex
import statistics
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

import yaml

from moesim.errors import InputError
from moesim.fidelity.runs import SCHEMA

DEFAULT_MODELS = ("deepseek-v3", "deepseek-v2")
DEFAULT_TOKENS_PER_EXPERT = (64, 128, 256, 512, 1024, 2048, 4096)
DEFAULT_GROUPS = 8  # experts per GPU of DeepSeek-V3 at EP32 (256 / 32), DeepGEMM's table too
# Generous until the model's error on these runs has been measured; then tighten it.
DEFAULT_TOLERANCE = 0.5
TOLERANCE_NOTE = "to be set from measured error"
ALLTOALL_SKIPPED = ("NCCL all-to-all not recorded: it needs one process per GPU "
                    "(torch.distributed), which one `moesim record` process does not start")
# Topology presets per GPU family: the run must name a topology that load_runs can build.
_TOPOLOGY_BY_GPU = (("H800", "h800-node"), ("GB200", "gb200-nvl72"), ("B200", "gb200-nvl72"),
                    ("H100", "dgx-h100-superpod"), ("H200", "dgx-h100-superpod"))
FALLBACK_TOPOLOGY = "dgx-h100-superpod"


# ----------------------------------------------------------------- shapes (CPU)


@dataclass(frozen=True)
class GemmShape:
    """``groups`` GEMMs of ``m_per_group x n x k`` (out = [m, k] @ [k, n]) of one model."""

    model: str
    op: str  # "gate-up" ([m, hidden] x [hidden, 2 I]) or "down" ([m, I] x [I, hidden])
    groups: int
    m_per_group: int
    n: int
    k: int

    @property
    def flops(self) -> float:
        return 2.0 * self.groups * self.m_per_group * self.n * self.k

    @property
    def run_id(self) -> str:
        return (f"record-{self.model}-{self.op}-g{self.groups}-m{self.m_per_group}"
                f"-n{self.n}-k{self.k}-bf16")


def parse_int_list(text: str, option: str) -> tuple[int, ...]:
    """``"64,128"`` -> ``(64, 128)``; anything else is an InputError naming the option."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise InputError(f"not a list of integers: {text!r}", field=option,
                         allowed="comma-separated integers > 0, e.g. 64,128") from None
    if not values or min(values) < 1:
        raise InputError(f"not a list of positive integers: {text!r}", field=option,
                         allowed="comma-separated integers > 0, e.g. 64,128")
    return values


def parse_name_list(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise InputError("no model named", field="--models", allowed="e.g. deepseek-v3")
    return names


def gemm_shapes(models: Sequence[str], tokens_per_expert: Sequence[int],
                groups: int = DEFAULT_GROUPS) -> list[GemmShape]:
    """The two expert GEMMs of each model preset at each tokens-per-expert count."""
    from moesim.config.loading import model_preset

    if groups < 1:
        raise InputError(f"groups={groups}", field="--groups", allowed=">= 1")
    shapes = []
    for name in models:
        try:
            model = model_preset(name)
        except InputError as err:
            raise InputError(err.problem, field="--models", allowed=err.allowed) from None
        hidden, inter = model.hidden_size, model.moe_intermediate_size
        for m in tokens_per_expert:
            shapes.append(GemmShape(name, "gate-up", groups, m, n=2 * inter, k=hidden))
            shapes.append(GemmShape(name, "down", groups, m, n=hidden, k=inter))
    return shapes


def topology_for_gpu(gpu_name: str) -> str:
    """The topology preset of the GPU's family (a run must name one load_runs can build)."""
    upper = gpu_name.upper()
    for family, topology in _TOPOLOGY_BY_GPU:
        if family in upper:
            return topology
    return FALLBACK_TOPOLOGY


# ----------------------------------------------------------------- results (CPU)


@dataclass(frozen=True)
class Timing:
    """Median seconds of ``repeats`` timed calls after ``warmup`` untimed ones."""

    seconds: float
    repeats: int
    warmup: int
    kernel: str  # which code path ran, e.g. "torch._grouped_mm" or "per-expert matmul"


@dataclass(frozen=True)
class LayerTiming:
    """One MoE layer forward, with the (scaled) shape it ran at."""

    model: str
    hidden: int
    intermediate: int
    experts: int
    top_k: int
    shared: int
    tokens: int
    seconds: float
    routing: str  # "trace <file> layer <i>" or "gate"
    tokens_per_expert_mean: float
    tokens_per_expert_max: int

    def describe(self) -> str:
        return (f"moe-layer {self.model} (scaled: hidden {self.hidden}, I {self.intermediate}, "
                f"E {self.experts}, K {self.top_k}, shared {self.shared}) {self.tokens} tokens, "
                f"routing {self.routing}: tokens/expert mean {self.tokens_per_expert_mean:.1f}"
                f" max {self.tokens_per_expert_max}; {self.seconds * 1e6:.1f} us")


def gemm_runs(timed: Sequence[tuple[GemmShape, Timing]], *, topology: str,
              tolerance: float = DEFAULT_TOLERANCE) -> list[dict]:
    """One grouped-gemm run per timed shape, TFLOPS = 2 G m n k / t (DeepGEMM's measure)."""
    runs = []
    for shape, timing in timed:
        if not timing.seconds > 0:
            raise ValueError(f"{shape.run_id}: non-positive time {timing.seconds}")
        runs.append({
            "id": shape.run_id,
            "topology": topology,
            "gpus": 1,
            "workload": {"kind": "grouped-gemm", "groups": shape.groups,
                         "m_per_group": shape.m_per_group, "n": shape.n, "k": shape.k,
                         "dtype": "bf16", "layout": "contiguous"},
            "measured": {"tflops": {"value": round(shape.flops / timing.seconds / 1e12, 3),
                                    "unit": "TFLOPS"}},
            "tolerance": tolerance,
            "note": (f"{shape.model} {shape.op}; {timing.kernel}; median of {timing.repeats} "
                     f"after {timing.warmup} warm-up; {timing.seconds * 1e6:.2f} us"),
        })
    return runs


@dataclass(frozen=True)
class Provenance:
    """Where and how the numbers were taken (device fields empty until filled on a GPU)."""

    command: str
    date: str
    torch: str = ""
    cuda: str = ""
    gpu: str = ""
    driver: str = ""
    host: str = ""
    tolerance: float = DEFAULT_TOLERANCE
    notes: tuple[str, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict:
        return {"gpu": self.gpu, "driver": self.driver, "cuda": self.cuda, "torch": self.torch,
                "date": self.date, "command": self.command, "host": self.host,
                "tolerance": f"{self.tolerance} ({TOLERANCE_NOTE})", "notes": list(self.notes)}


def provenance(argv: Sequence[str], *, now: datetime | None = None,
               tolerance: float = DEFAULT_TOLERANCE,
               notes: Sequence[str] = ()) -> Provenance:
    """The device-agnostic fields: exact command line, UTC date, tolerance, notes."""
    now = now or datetime.now(timezone.utc)
    return Provenance(command=shlex.join(argv), date=now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                      host=platform.node(), tolerance=tolerance, notes=tuple(notes))


def recorded_document(runs: Sequence[dict], prov: Provenance) -> dict:
    """The ``moesim.recorded-run/1`` mapping; provenance goes into ``source.note`` because
    the schema forbids unknown keys (and as comments, see :func:`dump_document`)."""
    facts = prov.as_dict()
    note = "; ".join(f"{key}: {value}" for key, value in facts.items()
                     if key != "notes" and value)
    if prov.notes:
        note += "; " + "; ".join(prov.notes)
    return {"schema": SCHEMA,
            "source": {"repo": "local", "path": "moesim record", "note": note},
            "runs": list(runs)}


def dump_document(doc: dict, prov: Provenance) -> str:
    """YAML text: a comment header with the provenance, then the document."""
    lines = ["# Recorded with `moesim record` (BF16 expert GEMMs timed with CUDA events)."]
    for key, value in prov.as_dict().items():
        if key == "notes":
            lines += [f"# note: {note}" for note in value]
        elif value:
            lines.append(f"# {key}: {value}")
    body = yaml.safe_dump(doc, sort_keys=False, width=100, allow_unicode=True)
    return "\n".join(lines) + "\n" + body


def layer_shape(hidden: int, intermediate: int, experts: int, *,
                budget_bytes: float, bytes_per_value: int = 4) -> tuple[int, int]:
    """``(hidden, intermediate)`` halved together until the experts' weights fit the budget.

    ``bytes_per_value`` 4: MoELayer initialises in fp32 before the cast to BF16.
    """
    while 3 * experts * hidden * intermediate * bytes_per_value > budget_bytes:
        if hidden <= 128 or intermediate <= 128:
            break  # small enough for any GPU; below this the GEMMs stop being GEMMs
        hidden, intermediate = hidden // 2, intermediate // 2
    return hidden, intermediate


def tokens_per_expert(expert_ids, num_experts: int) -> tuple[float, int]:
    """Mean and max tokens per expert of one layer's ``[T, K]`` ids (-1 = dropped)."""
    import numpy as np

    from moesim.routing.batch import expert_loads

    counts = expert_loads(np.asarray(expert_ids), num_experts)
    return float(counts.mean()), int(counts.max())


# ----------------------------------------------------------------- GPU (CUDA only)


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def device_provenance(prov: Provenance) -> Provenance:
    """``prov`` with the GPU, driver, CUDA and torch versions filled in."""
    import dataclasses

    import torch

    driver = ""
    try:  # nvidia-smi is the one place the driver version is written down
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True)
        driver = out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        driver = "unknown (nvidia-smi not available)"
    return dataclasses.replace(prov, gpu=torch.cuda.get_device_name(0), driver=driver,
                               cuda=str(torch.version.cuda), torch=torch.__version__)


def time_cuda(fn: Callable[[], object], *, repeats: int, warmup: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls, each bracketed by CUDA events."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def time_grouped_gemm(shape: GemmShape, *, repeats: int = 20, warmup: int = 5) -> Timing:
    """Time one BF16 grouped GEMM: ``torch._grouped_mm`` where it runs, else a loop of
    per-expert matmuls (which also charges the launch overhead a grouped kernel avoids)."""
    import torch

    dev = torch.device("cuda")
    g, m, n, k = shape.groups, shape.m_per_group, shape.n, shape.k
    a = torch.randn(g * m, k, device=dev, dtype=torch.bfloat16)
    b = torch.randn(g, n, k, device=dev, dtype=torch.bfloat16).transpose(1, 2)  # [g, k, n]
    offs = torch.arange(1, g + 1, device=dev, dtype=torch.int32) * m
    if hasattr(torch, "_grouped_mm"):
        try:
            torch._grouped_mm(a, b, offs=offs, out_dtype=torch.bfloat16)
            torch.cuda.synchronize()
            seconds = time_cuda(lambda: torch._grouped_mm(a, b, offs=offs,
                                                          out_dtype=torch.bfloat16),
                                repeats=repeats, warmup=warmup)
            return Timing(seconds, repeats, warmup, "torch._grouped_mm")
        except RuntimeError:
            pass  # e.g. needs SM90+ or other alignment: fall back to the loop below
    a_g = a.view(g, m, k)
    out = torch.empty(g, m, n, device=dev, dtype=torch.bfloat16)

    def loop():
        for i in range(g):
            torch.matmul(a_g[i], b[i], out=out[i])

    seconds = time_cuda(loop, repeats=repeats, warmup=warmup)
    return Timing(seconds, repeats, warmup, "per-expert torch.matmul")


def time_moe_layer(model_name: str, *, trace=None, trace_layer: int = 0, tokens: int = 4096,
                   repeats: int = 20, warmup: int = 5, memory_fraction: float = 0.25,
                   seed: int = 0) -> LayerTiming:
    """One MoELayer forward in BF16 at the preset's shape, scaled to fit memory.

    With a :class:`moesim.tracefile.format.RoutingTrace` the trace's expert ids and weights replace
    the gate (fixed routing through ``routed_experts``), so the expert loads are the
    captured ones; without one the layer's own gate routes random tokens.
    """
    import numpy as np
    import torch

    from moesim.config.loading import model_preset
    from moesim.traces.gates import Routing
    from moesim.traces.layers import GateConfig, MoELayer, routed_experts

    model = model_preset(model_name)
    experts, top_k = model.routed_experts, model.top_k
    if trace is not None:
        if not 0 <= trace_layer < trace.num_layers:
            raise InputError(f"trace layer {trace_layer}", field="--trace-layer",
                             allowed=f"0..{trace.num_layers - 1}")
        experts, top_k, tokens = trace.num_experts, trace.top_k, trace.num_tokens
    free, _ = torch.cuda.mem_get_info()
    hidden, inter = layer_shape(model.hidden_size, model.moe_intermediate_size, experts,
                                budget_bytes=free * memory_fraction)
    torch.manual_seed(seed)
    gate = GateConfig(kind="softmax-topk", num_experts=experts, top_k=top_k)
    with torch.device("cuda"):
        layer = MoELayer(hidden, inter, model.shared_experts, gate).to(torch.bfloat16)
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        if trace is not None:
            ids = torch.as_tensor(trace.expert_ids[trace_layer].astype(np.int64), device="cuda")
            weights = torch.as_tensor(trace.weights[trace_layer], device="cuda").float()
            routing = Routing(ids, weights, torch.zeros(tokens, experts, device="cuda"))

            def forward():
                y = routed_experts(x, routing, layer.gate_up_proj, layer.down_proj)
                if layer.shared_experts is not None:
                    y = y + layer.shared_experts(x)
                return y

            ids_np = trace.expert_ids[trace_layer]
            how = f"trace layer {trace_layer}"
        else:
            def forward():
                return layer(x)[0]

            ids_np = layer.gate(x).routing.ids_tk.cpu().numpy()
            how = "the layer's own softmax top-k gate on random tokens"
        seconds = time_cuda(forward, repeats=repeats, warmup=warmup)
    mean, peak = tokens_per_expert(ids_np, experts)
    return LayerTiming(model_name, hidden, inter, experts, top_k, model.shared_experts,
                       tokens, seconds, how, mean, peak)
