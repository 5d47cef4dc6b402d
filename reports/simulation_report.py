"""The report of one simulation (plus optional what-if variants): blocks and figures."""

from __future__ import annotations

from moesim.reports import figures
from moesim.reports.document import Block, Figure, Heading, Paragraph, Table
from moesim.reports.text import breakdown_rows, headline, what_if_rows


def _batch(sc) -> str:
    """The batch of one step in words."""
    sv, p = sc.serving, sc.parallel
    if sv is None:
        return f"{p.tokens_per_gpu} tokens per GPU"
    what = "prompts" if sc.mode == "prefill" else "decoding requests"
    return (f"{sv.batch} {what} per attention-DP rank of {p.attention_tp} GPU(s) (isl "
            f"{sv.isl}, osl {sv.osl}, {sv.kv_dtype} KV cache; expert TP {p.moe_tp})")


def _popularity(r) -> str:
    """The synthetic expert popularity in words."""
    if r.assignment == "zipf":
        return f"Zipf expert popularity (exponent {r.zipf_exponent:g})"
    if r.assignment == "power-law":
        return f"power-law expert popularity (exponent {r.power_law_alpha:g})"
    return "uniform expert popularity"


def _device_limit(r) -> str:
    return (f"at most {r.max_devices} {r.limit_scope}s per token"
            if r.max_devices is not None else "no device limit")


def _routing(sc, s: dict) -> str:
    """Where the routing comes from and what limits it, in words (never "None")."""
    r = sc.routing
    if s["routing_source"] == "synthetic":
        words = [f"synthetic routing with {_popularity(r)}", _device_limit(r)]
    else:
        trace = s.get("routing_trace") or sc.trace or "in memory"
        # The balance policy always re-routes a trace's stored scores.
        if s["routing_source"].endswith("(captured)") and r.balance == "none":
            words = [f"routing replayed from trace {trace} (replay captured: the captured "
                     "expert choices as they are, not re-routed)"]
            if r.max_devices is not None:
                words.append(f"checked to reach at most {r.max_devices} {r.limit_scope}s "
                             "per token")
        else:
            words = [f"routing from trace {trace} (replay reroute: its stored scores routed "
                     f"again by gate {s['routing_gate']})", _device_limit(r)]
    if r.balance == "aux-free-bias":
        words.append(f"balance policy aux-free-bias ({r.balance_steps} steps of bias "
                     f"updates at speed {r.bias_update_speed:g})")
    if sc.placement.policy != "contiguous":
        words.append(f"placement {sc.placement.policy} with "
                     f"{sc.placement.redundant_experts} redundant experts")
    if r.capacity_factor is not None:
        scope = "per expert" if r.capacity_scope == "expert" else "per GPU"
        words.append(f"capacity factor {r.capacity_factor:g} {scope} ({r.drop_policy} "
                     "drops first)")
    else:
        words.append("no capacity limit")
    return ", ".join(words)


def _network(sc) -> str:
    """The network model of the scenario in words."""
    if sc.network == "flow":
        return ("flow-level network (max-min fair sharing of every directed link, re-solved "
                "as flows finish)")
    return "analytical network (latency plus the busiest link)"


def _caption(text: str, figure: str) -> str:
    """A figure's caption: what it shows, then how to read it."""
    return f"{text}. {figures.READING[figure]}"


def build_report(result, variants: list[tuple[str, object]] = ()) -> tuple[list[Block], dict]:
    """Blocks of the report and its figures ``{file name: matplotlib Figure}``.

    ``variants`` are (label, SimResult) pairs of what-if runs beside the baseline.
    """
    sc, s = result.scenario, result.summary
    blocks: list[Block] = [
        Heading(f"moesim report: {sc.name}", 1),
        Paragraph(headline(s, sc.topology) + "."),
        Paragraph(
            f"Model {sc.model.name} ({sc.model.num_layers} layers, {sc.model.moe_layers} MoE, "
            f"{sc.model.routed_experts} routed + {sc.model.shared_experts} shared experts, "
            f"top-{sc.model.top_k}); GPU {sc.hardware.name}; "
            f"{_batch(sc)} in {sc.parallel.micro_batches} "
            f"micro-batch(es); {_routing(sc, s)}; {_network(sc)}."
        ),
        *(Paragraph(f"Warning: {w}") for w in result.warnings),
        Heading("Step breakdown"),
        Table(("quantity", "value"), tuple(breakdown_rows(s))),
        Figure("figures/step_breakdown.png",
               _caption("Where the mean GPU's step goes", "step_breakdown")),
    ]
    if variants:
        header, rows = what_if_rows(s, [(label, r.summary) for label, r in variants])
        blocks += [Heading("What if"),
                   Paragraph("Each variant changes the fields named in its column and "
                             "nothing else; changes are relative to the baseline."),
                   Table(header, tuple(rows))]
    figs = {}
    if result.pipeline is not None:
        blocks += [Heading("Pipeline"),
                   Paragraph("The whole training step (docs/training.md): every stage's "
                             "forward (F), backward (BW, or B and W apart) and DualPipe's "
                             "overlapped pairs (FB); pipeline.parquet holds every item."),
                   Figure("figures/pipeline.png",
                          _caption("Pipeline schedule of one step", "pipeline_schedule"))]
        figs["pipeline.png"] = figures.pipeline_schedule(result.pipeline)
    if result.balance is not None:
        blocks += [Heading("Balance policy"),
                   Paragraph(f"routing.balance aux-free-bias: {sc.routing.balance_steps} "
                             f"steps of bias updates at speed {sc.routing.bias_update_speed}; "
                             "the step above is the last one (balance.parquet: every step)."),
                   Figure("figures/balance.png",
                          _caption("Load balance and step time, step by step",
                                   "balance_series"))]
        figs["balance.png"] = figures.balance_series(result.balance)
    blocks += [
        Heading("Imbalance and links"),
        Figure("figures/gpu_load.png",
               _caption("Expert work per GPU under the placement", "gpu_load")),
        Figure("figures/expert_time.png",
               _caption("Forward expert GEMM time per GPU and MoE layer",
                        "expert_time_heatmap")),
        Figure("figures/expert_load.png",
               _caption("Assignments per expert relative to the layer mean", "expert_load")),
        Figure("figures/link_utilization.png",
               _caption("Busy share of each directed link", "link_utilization")),
        Heading("Files"),
        Paragraph("summary.json (all summary keys), scenario.yaml (the resolved scenario), "
                  "spans.parquet, links.parquet, experts.parquet (tables), timeline.json "
                  "(Chrome trace; open in https://ui.perfetto.dev)."),
        Heading("What the model includes"),
        Paragraph(
            "One training step (forward and backward) or one forward pass of every layer on "
            "every GPU (for prefill: whole prompts, the time to first token; for decode: one "
            "new token per request over its KV cache, the time per output token), attention "
            "data-parallel (tensor-parallel in groups of attention_tp when serving), routed "
            f"experts expert-parallel; {_network(sc)}; roofline compute with the efficiencies "
            "of the hardware preset. Not modelled yet: pipeline parallelism, data-parallel "
            "gradient reduction, optimizer step, recomputation, multi-token prediction."
        ),
    ]
    figs |= {
        "step_breakdown.png": figures.step_breakdown(s),
        "gpu_load.png": figures.gpu_load(result.spans, s["placement"]),
        "expert_time.png": figures.expert_time_heatmap(result.spans),
        "expert_load.png": figures.expert_load(result.experts),
        "link_utilization.png": figures.link_utilization(result.links),
    }
    return blocks, figs
