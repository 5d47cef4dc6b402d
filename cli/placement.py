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


SLOTS_PER_EXPERT = 4  # replicas beyond 4 per expert even out nothing a real EP group sees
MAX_PLACED = 2**22  # layers x slots: about 15 s of placing on one core
MAX_TABLE = 2**24  # log2phy entries: 128 MiB, and seconds of JSON


def _slot_range(experts: int, gpus: int) -> tuple[int, int]:
    """The fewest and the most slots: multiples of ``gpus``, at least one per expert, at
    most ``SLOTS_PER_EXPERT`` per expert (or the fewest, when that is more)."""
    fewest = -(-experts // gpus) * gpus
    return fewest, max(fewest, SLOTS_PER_EXPERT * experts // gpus * gpus)


def _check(loads_le, *, gpus: int, nodes: int, groups: int, slots: int,
           hierarchical: bool) -> None:
    from moesim.config.parallel import MAX_GPUS  # README "Limits"

    layers, experts = loads_le.shape
    if gpus > MAX_GPUS:
        raise InputError(f"{gpus:,} GPUs", field="--gpus", allowed=f"1 to {MAX_GPUS:,}")
    if gpus % nodes:
        raise InputError(f"{gpus} GPUs do not split over {nodes} nodes", field="--nodes",
                         allowed=f"divisors of {gpus}")
    fewest, most = _slot_range(experts, gpus)
    if not fewest <= slots <= most or slots % gpus:
        raise InputError(f"{slots} slots for {experts} experts on {gpus} GPUs",
                         field="--slots",
                         allowed=f"multiples of {gpus} from {fewest:,} (one per expert) to "
                                 f"{most:,} ({SLOTS_PER_EXPERT} per expert)")
    if layers * slots > MAX_PLACED:
        raise InputError(f"{layers} layers x {slots:,} slots", field="--slots",
                         allowed=f"layers x slots at most {MAX_PLACED:,}")
    if hierarchical and (experts % groups or groups % nodes):
        raise InputError(f"{groups} groups of {experts} experts cannot be packed whole onto "
                         f"{nodes} nodes", field="--groups",
                         allowed=f"divisors of {experts} that {nodes} divides, or --mode "
                                 "global")


def _check_table(phy2log_ls, experts: int) -> None:
    """``log2phy`` is [layers, experts, most replicas]: one very hot expert can get
    almost every extra slot and make it quadratic in the experts."""
    import numpy as np

    most = max(int(np.bincount(p, minlength=experts).max()) for p in phy2log_ls)
    entries = phy2log_ls.shape[0] * experts * most
    if entries > MAX_TABLE:
        raise InputError(f"an expert gets {most:,} replicas: a log2phy table of "
                         f"{entries:,} entries", field="--slots",
                         allowed=f"layers x experts x the most replicas of one expert at "
                                 f"most {MAX_TABLE:,}: fewer slots")


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

    from moesim.placement.eplb import from_phy2log, gpu_loads, place_layers

    loads_le = _loads(loads)
    experts = loads_le.shape[1]
    hierarchical = mode == "hierarchical"
    _check(loads_le, gpus=gpus, nodes=nodes, groups=groups, slots=slots,
           hierarchical=hierarchical)
    phy2log_ls = place_layers(loads_le, slots=slots, groups=groups, nodes=nodes, gpus=gpus,
                              hierarchical=hierarchical)
    _check_table(phy2log_ls, experts)
    placed = from_phy2log(phy2log_ls, experts=experts)

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
