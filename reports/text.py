"""Human-readable numbers and the terminal breakdown of a simulated step."""

from __future__ import annotations


def seconds(value: float) -> str:
    if value >= 1:
        return f"{value:.3f} s"
    if value >= 1e-3:
        return f"{value * 1e3:.2f} ms"
    return f"{value * 1e6:.1f} us"


def nbytes(value: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} B"


def serving_rows(s: dict) -> list[tuple[str, str]]:
    """The serving rows (prefill, decode summaries); none for other modes."""
    if "ttft_s" in s:
        rows = [("time to first token", seconds(s["ttft_s"])),
                ("input tokens/s per GPU", f"{s['input_tokens_per_s_per_gpu']:,.0f}")]
    elif "tpot_s" in s:
        rows = [("time per output token", seconds(s["tpot_s"])),
                ("output tokens/s per GPU", f"{s['output_tokens_per_s_per_gpu']:,.0f}")]
    else:
        return []
    return rows + [
        ("requests", f"{s['requests_per_step']:,} ({s['attention_dp']} attention-DP ranks "
                     f"x TP{s['attention_tp']}; isl {s['isl']}, osl {s['osl']})"),
        ("KV cache per GPU", f"{nbytes(s['kv_cache_bytes_per_gpu'])} ({s['kv_dtype']})"),
        ("TP all-reduces", f"attention {seconds(s['attention_tp_allreduce_time_s'])}, "
                           f"MoE (TP{s['moe_tp']}) {seconds(s['moe_tp_allreduce_time_s'])}"),
    ]


def routing_words(s: dict) -> str:
    """Where the step's routing comes from, in words."""
    if s["routing_source"] == "synthetic":
        words = f"synthetic, gate {s['routing_gate']}, {s['routing_draws']} layer draw(s)"
    else:
        how = ("the captured choices of gate" if s["routing_source"].endswith("(captured)")
               else "its stored scores re-routed by gate")
        words = f"trace {s['routing_trace']}: {how} {s['routing_gate']}"
    if s["placement"] != "contiguous":
        words += f"; placement {s['placement']}, {s['redundant_experts']} redundant experts"
    return words


def whole_step_rows(s: dict) -> list[tuple[str, str]]:
    """The whole training step's pipeline, data-parallel and optimizer rows (none in the
    EP form of a step; docs/training.md)."""
    if "pipeline_time_s" not in s:
        return []
    return [
        ("layout", f"PP{s['pp']}" + (f" x VP{s['vp']}" if s["vp"] > 1 else "")
                   + f" {s['schedule']}, EP{s['ep']}, DP{s['dp']}; {s['micro_batches']} "
                   f"micro-batches of {s['tokens_per_microbatch']:,} tokens per GPU; "
                   f"{s['precision']}, recompute {s['recompute']}"),
        ("pipeline", f"{seconds(s['pipeline_time_s'])} "
                     f"({s['pipeline_bubble_fraction']:.1%} bubble)"),
        ("DP gradients + params", f"{seconds(s['dp_grad_reduce_time_s'])} + "
                                  f"{seconds(s['dp_param_gather_time_s'])} "
                                  f"({seconds(s['dp_exposed_time_s'])} exposed)"),
        ("optimizer step", seconds(s["optimizer_time_s"])),
        ("kernels between GEMMs", seconds(s["elementwise_time_s"])),
        ("recomputation", seconds(s["recompute_time_s"])),
    ]


def breakdown_rows(s: dict) -> list[tuple[str, str]]:
    """(label, value) rows shared by the terminal output and the report."""
    return [("routing", routing_words(s))] + serving_rows(s) + whole_step_rows(s) + [
        ("step time", seconds(s["step_time_s"])),
        ("tokens/s", f"{s['tokens_per_s']:,.0f} ({s['tokens_per_s'] / s['gpus']:,.0f} per GPU)"),
        ("MFU", f"{s['mfu']:.1%} ({s['model_tflops_per_gpu']:.0f} model TFLOP/s per GPU)"),
        ("attention", seconds(s["attention_time_s"])),
        ("expert GEMMs", f"{seconds(s['expert_compute_time_s'])} "
                         f"(slowest GPU {seconds(s['expert_compute_max_time_s'])})"),
        ("shared experts", seconds(s["shared_expert_time_s"])),
        ("dense FFN + LM head", seconds(s["dense_ffn_time_s"] + s["lm_head_time_s"])),
        ("dispatch", seconds(s["dispatch_time_s"])),
        ("combine", seconds(s["combine_time_s"])),
        ("exposed communication", seconds(s["comm_exposed_time_s"])),
        ("waiting for slower peers", seconds(s["comm_wait_time_s"])),
        ("NVLink bytes", nbytes(s["nvlink_bytes"])),
        ("RDMA bytes", nbytes(s["rdma_bytes"])),
        ("busiest link class", s["bottleneck_link"]),
        ("GPU load max/mean", f"{s['max_over_mean_gpu_load']:.3f}"),
        ("dropped assignments", f"{s['tokens_dropped']:,} ({s['dropped_token_fraction']:.2%})"),
        ("memory per GPU", memory_words(s)),
    ]


def memory_words(s: dict) -> str:
    """The estimated memory per GPU against the GPU's capacity (docs/memory.md)."""
    used = f"{s['memory_gib_per_gpu']:.1f} GiB of {s['memory_capacity_gib']:g}"
    return f"{used} (fits)" if s["fits_in_memory"] else f"{used}: does NOT fit"


def headline(s: dict, topology: str) -> str:
    return (f"{s['scenario']}: {s['mode']} step on {s['gpus']} GPUs "
            f"({s['ep_groups']} x EP{s['ep']}, {s['nodes']} node(s) of {topology}), "
            f"{s['dispatch_kernel']}")


def format_summary(s: dict, topology: str) -> str:
    from moesim.reports.terminal import render_table

    lines = [headline(s, topology), render_table(None, breakdown_rows(s), indent=2,
                                                 justify="ll")]
    passes = "forward+backward" if s["mode"] == "train" else "the forward pass"
    lines.append("  (times are per GPU and per step, summed over layers, micro-batches and "
                 f"{passes}; see docs/metrics.md)")
    return "\n".join(lines)


def _change(s: dict, b: dict, value) -> str:
    """``value(s)`` relative to ``value(b)``; "-" for the baseline itself."""
    if s is b or not value(b):
        return "-"
    return f"{value(s) / value(b) - 1:+.1%}"


def tokens_per_gpu(s: dict) -> float:
    """Tokens per second per GPU (``tokens_per_s`` over ``gpus``; see docs/metrics.md)."""
    return s["tokens_per_s"] / s["gpus"]


# The quantities a what-if compares: (label, cell of one run given the baseline).
WHAT_IF = [
    ("step time", lambda s, b: seconds(s["step_time_s"])),
    ("step time vs baseline", lambda s, b: _change(s, b, lambda x: x["step_time_s"])),
    ("tokens/s per GPU", lambda s, b: f"{tokens_per_gpu(s):,.0f}"),
    ("tokens/s per GPU vs baseline", lambda s, b: _change(s, b, tokens_per_gpu)),
    ("drop rate", lambda s, b: f"{s['dropped_token_fraction']:.2%}"),
    ("tokens/s", lambda s, b: f"{s['tokens_per_s']:,.0f}"),
    ("MFU", lambda s, b: f"{s['mfu']:.1%}"),
    ("dispatch", lambda s, b: seconds(s["dispatch_time_s"])),
    ("combine", lambda s, b: seconds(s["combine_time_s"])),
    ("exposed comm", lambda s, b: seconds(s["comm_exposed_time_s"])),
    ("RDMA bytes", lambda s, b: nbytes(s["rdma_bytes"])),
    ("RDMA bytes vs baseline", lambda s, b: _change(s, b, lambda x: x["rdma_bytes"])),
    ("NVLink bytes", lambda s, b: nbytes(s["nvlink_bytes"])),
]
# What the terminal shows of them, one line per run: (quantity, column header).
WHAT_IF_TERMINAL = (("step time", "step\ntime"), ("step time vs baseline", "step vs\nbaseline"),
                    ("tokens/s per GPU", "tokens/s\nper GPU"),
                    ("tokens/s per GPU vs baseline", "vs\nbaseline"),
                    ("drop rate", "drop\nrate"), ("RDMA bytes vs baseline", "RDMA vs\nbaseline"))


def what_if_rows(base: dict, variants: list[tuple[str, dict]]) -> tuple[tuple[str, ...],
                                                                        list[tuple[str, ...]]]:
    """(header, rows) comparing the baseline summary with each variant's: one row per
    quantity of ``WHAT_IF``, one column per run (the report's orientation)."""
    runs = [("baseline", base), *variants]
    header = ("quantity", *(label for label, _ in runs))
    rows = [(label, *(cell(s, base) for _, s in runs)) for label, cell in WHAT_IF]
    return header, rows


def format_what_if(base: dict, variants: list[tuple[str, dict]]) -> str:
    """The terminal's what-if table: one row per run (a label may hold line breaks), the
    quantities of ``WHAT_IF_TERMINAL`` as columns."""
    from moesim.reports.terminal import render_table

    cells = dict(WHAT_IF)
    runs = [("baseline", base), *variants]
    rows = [(label, *(cells[q](s, base) for q, _ in WHAT_IF_TERMINAL)) for label, s in runs]
    return render_table(("what if", *(head for _, head in WHAT_IF_TERMINAL)), rows, indent=2,
                        justify="l" + "r" * len(WHAT_IF_TERMINAL))
