"""The report of one simulation (plus optional what-if variants): blocks and figures."""

from __future__ import annotations

from moesim.reports import figures
from moesim.reports.document import Block, Figure, Heading, Paragraph, Table
from moesim.reports.text import breakdown_rows, headline, nbytes, seconds

_COMPARE = [
    ("step time", "step_time_s", seconds),
    ("tokens/s", "tokens_per_s", lambda v: f"{v:,.0f}"),
    ("MFU", "mfu", lambda v: f"{v:.1%}"),
    ("dispatch", "dispatch_time_s", seconds),
    ("combine", "combine_time_s", seconds),
    ("exposed comm", "comm_exposed_time_s", seconds),
    ("RDMA bytes", "rdma_bytes", nbytes),
    ("dropped", "dropped_token_fraction", lambda v: f"{v:.2%}"),
    ("NVLink bytes", "nvlink_bytes", nbytes),
]


def _batch(sc) -> str:
    """The batch of one step in words."""
    sv, p = sc.serving, sc.parallel
    if sv is None:
        return f"{p.tokens_per_gpu} tokens per GPU"
    what = "prompts" if sc.mode == "prefill" else "decoding requests"
    return (f"{sv.batch} {what} per attention-DP rank of {p.attention_tp} GPU(s) (isl "
            f"{sv.isl}, osl {sv.osl}, {sv.kv_dtype} KV cache; expert TP {p.moe_tp})")


def _limits(sc) -> str:
    """The routing limits of the scenario in words."""
    r = sc.routing
    words = [f"at most {r.max_devices} {r.limit_scope}s per token" if r.max_devices
             else "no device limit"]
    if sc.trace is None:
        words.append(f"{r.assignment} expert popularity")
    words.append(f"capacity factor {r.capacity_factor} ({r.drop_policy} drops first)"
                 if r.capacity_factor else "no capacity limit")
    return ", ".join(words)


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
            f"micro-batch(es); {_limits(sc)}."
        ),
        *(Paragraph(f"Warning: {w}") for w in result.warnings),
        Heading("Step breakdown"),
        Table(("quantity", "value"), tuple(breakdown_rows(s))),
        Figure("figures/step_breakdown.png", "Where the mean GPU's step goes"),
    ]
    if variants:
        names = ["baseline"] + [label for label, _ in variants]
        results = [result] + [r for _, r in variants]
        rows = tuple(
            (label, *(fmt(r.summary[key]) for r in results)) for label, key, fmt in _COMPARE
        )
        blocks += [Heading("What if"), Table(("quantity", *names), rows)]
    figs = {}
    if result.balance is not None:
        blocks += [Heading("Balance policy"),
                   Paragraph(f"routing.balance aux-free-bias: {sc.routing.balance_steps} "
                             f"steps of bias updates at speed {sc.routing.bias_update_speed}; "
                             "the step above is the last one (balance.parquet: every step)."),
                   Figure("figures/balance.png", "Load balance and step time, step by step")]
        figs["balance.png"] = figures.balance_series(result.balance)
    blocks += [
        Heading("Imbalance and links"),
        Figure("figures/gpu_load.png", "Expert work per GPU under the placement"),
        Figure("figures/expert_time.png", "Forward expert GEMM time per GPU and MoE layer"),
        Figure("figures/expert_load.png", "Assignments per expert relative to the layer mean"),
        Figure("figures/link_utilization.png", "Busy share of each directed link"),
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
            "experts expert-parallel; analytical "
            "network (latency plus the busiest link); roofline compute with the efficiencies "
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
