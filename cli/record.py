"""`moesim record`: time expert GEMMs (and one MoE layer) on this machine's GPU and write
them as a recorded-run file that `moesim regress` can compare the simulator against."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from moesim.cli.common import fail, guarded

NO_GPU = "moesim record needs a CUDA GPU; torch.cuda.is_available() is False here"


@guarded
def record(
    out: Annotated[Path, typer.Option(help="Recorded-run YAML to write.")],
    models: Annotated[str, typer.Option(
        help="Model presets whose expert GEMM shapes to time (comma-separated).")]
    = "deepseek-v3,deepseek-v2",
    tokens_per_expert: Annotated[str, typer.Option(
        help="Tokens per expert (m of each GEMM), comma-separated.")]
    = "64,128,256,512,1024,2048,4096",
    groups: Annotated[int, typer.Option(help="Experts per grouped GEMM (experts per GPU).")]
    = 8,
    trace: Annotated[Path | None, typer.Option(
        help="Routing trace (.npz) whose expert ids drive the MoE layer forward.")] = None,
    trace_layer: Annotated[int, typer.Option(help="Which layer of --trace to replay.")] = 0,
    topology: Annotated[str | None, typer.Option(
        help="Topology preset the runs name (default: from the GPU's name).")] = None,
    repeats: Annotated[int, typer.Option(min=1, help="Timed repeats per shape (median).")] = 20,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed calls before timing.")] = 5,
) -> None:
    """Record GPU timings (grouped GEMMs, an MoE layer) as recorded runs (CUDA only).

    Times BF16 grouped GEMMs of the models' expert shapes and one MoE layer forward on
    the local CUDA GPU; writes a moesim.recorded-run/1 file (grouped-gemm runs, TFLOPS).

    Examples:

      moesim record --out runs/h100.yaml

      moesim record --models deepseek-v3 --tokens-per-expert 128,1024 --trace runs/v3.npz \\
        --out runs/h100.yaml
    """
    from moesim.fidelity import record as rec

    # Check the arguments first: a typo is reported even on a machine without a GPU.
    shapes = rec.gemm_shapes(rec.parse_name_list(models),
                             rec.parse_int_list(tokens_per_expert, "--tokens-per-expert"),
                             groups)
    routing = None
    if trace is not None:
        from moesim.tracefile.format import RoutingTrace

        routing = RoutingTrace.load(trace)
    if topology is not None:
        from moesim.topologies import load_topology

        load_topology(topology, gpus=1)  # the runs must name a topology regress can build
    if not rec.cuda_available():
        raise fail(NO_GPU)

    notes = [rec.ALLTOALL_SKIPPED]
    prov = rec.device_provenance(rec.provenance(["moesim", *sys.argv[1:]]))
    topo = topology or rec.topology_for_gpu(prov.gpu)
    timed = []
    for shape in shapes:
        timing = rec.time_grouped_gemm(shape, repeats=repeats, warmup=warmup)
        timed.append((shape, timing))
        typer.echo(f"{shape.run_id}: {shape.flops / timing.seconds / 1e12:.1f} TFLOPS "
                   f"({timing.kernel})")
    layer = rec.time_moe_layer(rec.parse_name_list(models)[0], trace=routing,
                               trace_layer=trace_layer, repeats=repeats, warmup=warmup)
    if trace is not None:
        layer = replace(layer, routing=f"{trace} {layer.routing}")
    typer.echo(layer.describe())
    notes.append(layer.describe() + " (no moe-layer workload kind in the schema yet)")
    prov = replace(prov, notes=tuple(notes))
    doc = rec.recorded_document(rec.gemm_runs(timed, topology=topo), prov)
    text = rec.dump_document(doc, prov)

    from moesim.cli.output import write_text

    write_text(out, text)
    typer.echo(f"wrote {out}: {len(timed)} grouped-gemm runs on {prov.gpu} ({topo})")
