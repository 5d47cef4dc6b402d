"""`moesim placement`: where EPLB puts each expert and its replicas, from expert loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import typer

from moesim.cli.common import guarded
from moesim.errors import InputError


def _loads(path: Path):
    """[L, E] expert loads from a CSV (a row per layer) or a routing trace's choices."""
    import numpy as np

    if path.suffix == ".npz":
        from moesim.routing.batch import expert_loads
        from moesim.tracefile.format import RoutingTrace

        trace = RoutingTrace.load(path)
        ids = trace.expert_ids.astype(np.int64)
        return np.stack([expert_loads(layer, trace.num_experts) for layer in ids]).astype(float)
    from moesim.placement.loads import read_loads

    return read_loads(path)


def _check(experts: int, *, gpus: int, nodes: int, groups: int, slots: int,
           hierarchical: bool) -> None:
    if gpus % nodes:
        raise InputError(f"{gpus} GPUs do not split over {nodes} nodes", field="--nodes",
                         allowed=f"divisors of {gpus}")
    if slots < experts or slots % gpus:
        raise InputError(f"{slots} slots for {experts} experts on {gpus} GPUs",
                         field="--slots",
                         allowed=f"multiples of {gpus} that are at least {experts}")
    if hierarchical and (experts % groups or groups % nodes):
        raise InputError(f"{groups} groups of {experts} experts cannot be packed whole onto "
                         f"{nodes} nodes", field="--groups",
                         allowed=f"divisors of {experts} that {nodes} divides, or --mode "
                                 "global")


@guarded
def placement(
    loads: Annotated[Path, typer.Argument(
        help="Expert loads: a CSV with one row per MoE layer and one column per logical "
             "expert (no header), or a routing trace (.npz).")],
    gpus: Annotated[int, typer.Option(min=1, help="GPUs of the EP group.")],
    slots: Annotated[int, typer.Option(
        min=1, help="Physical expert slots in all: experts + redundant ones.")],
    nodes: Annotated[int, typer.Option(min=1, help="Nodes the GPUs sit on.")] = 1,
    groups: Annotated[int, typer.Option(
        min=1, help="Expert groups (contiguous blocks) kept whole on one node.")] = 1,
    mode: Annotated[Literal["hierarchical", "global"], typer.Option(
        help="hierarchical: groups stay on one node; global: replicas anywhere.")]
    = "hierarchical",
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print phy2log, log2phy, replicas and the GPU load balance as JSON.")]
    = False,
    out: Annotated[Path | None, typer.Option(help="Also write the JSON here.")] = None,
) -> None:
    """Place experts and redundant replicas on GPUs with DeepSeek's EPLB heuristics.

    Prints, per MoE layer, the busiest GPU's load over the mean before (contiguous, when
    the GPUs divide the experts) and after, and the experts that got replicas. A replica
    carries its expert's load divided by its replica count.

    Examples:

      moesim placement traces/samples/tiny-v3.npz --gpus 8 --slots 80 --nodes 2 --groups 4

      moesim placement traces/samples/tiny-v1.npz --gpus 16 --slots 64 --mode global --json
    """
    import numpy as np

    from moesim.placement.eplb import gpu_loads, rebalance

    loads_le = _loads(loads)
    experts = loads_le.shape[1]
    hierarchical = mode == "hierarchical"
    _check(experts, gpus=gpus, nodes=nodes, groups=groups, slots=slots,
           hierarchical=hierarchical)
    placed = rebalance(loads_le, slots=slots, groups=groups, nodes=nodes, gpus=gpus,
                       hierarchical=hierarchical)

    def balance(gpu_lg) -> list[float]:
        mean = gpu_lg.mean(axis=1)
        return [float(x) for x in np.divide(gpu_lg.max(axis=1), mean, where=mean > 0,
                                            out=np.ones_like(mean))]

    after = balance(gpu_loads(loads_le, placed.phy2log_ls, gpus))
    before = None
    if experts % gpus == 0:
        identity = np.broadcast_to(np.arange(experts), loads_le.shape)
        before = balance(gpu_loads(loads_le, identity, gpus))
    document = {
        "loads": str(loads), "gpus": gpus, "nodes": nodes, "groups": groups, "slots": slots,
        "mode": mode,
        "phy2log": placed.phy2log_ls.tolist(),
        "log2phy": placed.log2phy_lex.tolist(),
        "replicas": placed.replicas_le.tolist(),
        "gpu_load_max_over_mean": after,
        "gpu_load_max_over_mean_contiguous": before,
    }
    text = json.dumps(document, indent=1)
    if out is not None:
        from moesim.cli.output import write_text

        write_text(out, text + "\n")
    if as_json:
        typer.echo(text)
        return
    typer.echo(f"{loads}: {loads_le.shape[0]} layers x {experts} experts on {gpus} GPUs "
               f"({nodes} nodes), {slots} slots, {mode}")
    from moesim.reports.terminal import render_table

    rows = []
    for layer, value in enumerate(after):
        was = f"{before[layer]:.3f}" if before else "-"
        extra = [f"{e}({n})" for e, n in enumerate(placed.replicas_le[layer]) if n > 1]
        rows.append((str(layer), was, f"{value:.3f}", " ".join(extra) or "-"))
    typer.echo(render_table(("layer", "GPU max/mean\ncontiguous", "GPU max/mean\nplaced",
                             "replicated experts (replicas)"), rows, justify="rrrl"))
    if out is not None:
        typer.echo(f"wrote {out}")
